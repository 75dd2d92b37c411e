"""Quickstart: FisherTune on a tiny random DINOv2 segmenter, end to end on CPU in seconds, no downloads.

    python -m peft_fishertune.quickstart [--out DIR] [--steps N]

Builds a tiny DINOv2 (random weights) with a 1x1-conv decode head, wraps it with FisherTune (a
magnitude selection stands in for the DR-FIM calibration that a later stage provides), trains the sparse
delta and the head on a synthetic task, saves the adapter, reloads it into a fresh base model and merges
it, checking that all three give the same predictions.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Dinov2Config, Dinov2Model
from transformers.modeling_outputs import SemanticSegmenterOutput

IGNORE_INDEX = 255


class TinySegmenter(nn.Module):
    """A ViT backbone from transformers plus a 1x1-conv head over its patch tokens."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.decode_head = nn.Conv2d(backbone.config.hidden_size, num_classes, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        batch, _, height, width = pixel_values.shape
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, h*w, C), CLS dropped
        patch = self.backbone.config.patch_size
        grid = tokens.transpose(1, 2).reshape(batch, -1, height // patch, width // patch)  # (B, C, h, w)
        logits = F.interpolate(self.decode_head(grid), size=(height, width), mode="bilinear", align_corners=False)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return SemanticSegmenterOutput(loss=loss, logits=logits)  # logits: (B, K, H, W)


def build_model(seed: int = 0, num_classes: int = 3) -> TinySegmenter:
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
    )
    return TinySegmenter(Dinov2Model(config), num_classes)


def synthetic_batch(batch: int, generator: torch.Generator, size: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose per-pixel label is the brightest colour channel (a task the random backbone must learn)."""
    coarse = torch.rand(batch, 3, size // 14, size // 14, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="nearest")  # (B, 3, H, W)
    return images, images.argmax(dim=1)  # (B, H, W)


def main(argv: list[str] | None = None) -> dict:
    from peft import PeftModel, get_peft_model

    import peft_fishertune  # noqa: F401  (registers the method)
    from peft_fishertune import FisherTuneConfig, vit_target_modules

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="adapter folder (a temporary one by default)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="fishertune-quickstart-")

    config = FisherTuneConfig(
        target_modules=vit_target_modules("backbone"),  # the blocks' q, k, v, o, fc1, fc2 (transformers 4.x or 5.x)
        modules_to_save=["decode_head"],
        init_selection="magnitude",
        density_max=0.15,
    )
    model = get_peft_model(build_model(), config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        images, labels = synthetic_batch(8, generator)
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    images, labels = synthetic_batch(16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=images).logits
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(build_model(), out).eval()
    merged = PeftModel.from_pretrained(build_model(), out).merge_and_unload().eval()
    with torch.no_grad():
        reload_diff = (reloaded(pixel_values=images).logits - logits).abs().max().item()
        merge_diff = (merged(pixel_values=images).logits - logits).abs().max().item()
    adapter_bytes = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
    entries = sum(config.selection_counts.values())
    print(f"pixel accuracy {accuracy:.3f} | selected entries {entries} of {model.base_model.num_candidates()}")
    print(f"adapter saved to {out} ({adapter_bytes} bytes)")
    print(f"max |reloaded - trained| = {reload_diff:.2e}, max |merged - trained| = {merge_diff:.2e}")
    return {"accuracy": accuracy, "reload_diff": reload_diff, "merge_diff": merge_diff, "out": out}


if __name__ == "__main__":
    main()
