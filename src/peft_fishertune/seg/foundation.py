"""The small "foundation" backbone shipped with the package, its pre-training, and the segmenter built on it.

The embedded benchmark needs what FisherTune assumes: a backbone pre-trained on broad data, whose features are
general but which has never learned the task. ``FOUNDATION_PATH`` holds such a backbone in Hugging Face format
(``config.json`` + ``model.safetensors``), loaded with ``Dinov2Model.from_pretrained`` like any real checkpoint.
It is a Dinov2 with 6 blocks of width 128 (4 heads, MLP 512) and 8x8 patches on 64x64 images.

``pretrain`` reproduces it (``fishertune-seg pretrain``): the procedural scenes of ``synthetic`` in random
looks (a random colour per class, random texture, night/fog/rain/blur of random strength or none) with the
COARSE 4-class label space (flat, upright, sky, object). So the backbone learns features that do not depend on
colour or weather, but not the benchmark's 7 classes: road vs sidewalk, building vs vegetation and car vs person
are never told apart in pre-training.

``TokenSegmenter`` is the segmentation model of the embedded benchmark: the backbone plus ``decode_head``, a
small MLP on the concatenated (layer-normed) tokens of blocks 2, 4 and 6 that predicts an 8x8 patch of logits
per token. It is light enough for a CPU and reads nothing but the backbone's features (no pixel shortcut).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .synthetic import COARSE_CLASSES, pretraining_scene

FOUNDATION_PATH = str(Path(__file__).parent / "pretrained")
IMAGE_SIZE = 64


def foundation_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=8,
        image_size=IMAGE_SIZE,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layerscale_value=1.0,
        drop_path_rate=0.0,
    )


def load_foundation(path: str | None = None):
    """The shipped backbone (or the one at ``path``), as a ``transformers.Dinov2Model``."""
    from transformers import Dinov2Model

    path = path or FOUNDATION_PATH
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no backbone at {path}: expected config.json and model.safetensors there")
    return Dinov2Model.from_pretrained(path)


@dataclass
class SegmenterOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, num_labels, H, W)


class TokenSegmenter(nn.Module):
    """A ViT backbone and a light per-token decoder; ``forward(pixel_values, labels=None)`` like transformers'
    segmentation models (mean cross-entropy over the labelled pixels, ``ignore_index`` 255)."""

    def __init__(self, backbone, num_labels: int, feature_blocks=(2, 4, 6), head_width: int | None = 192):
        super().__init__()
        self.backbone = backbone
        self.num_labels = num_labels
        self.feature_blocks = tuple(feature_blocks)
        config = backbone.config
        self.patch_size = config.patch_size
        width = config.hidden_size * len(self.feature_blocks)
        outputs = num_labels * self.patch_size**2
        if head_width:
            layers = [nn.LayerNorm(width), nn.Linear(width, head_width), nn.GELU(), nn.Linear(head_width, outputs)]
        else:
            layers = [nn.LayerNorm(width), nn.Linear(width, outputs)]
        self.decode_head = nn.Sequential(*layers)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
        tokens = [out.hidden_states[i][:, 1:] for i in self.feature_blocks]  # drop the CLS token
        return torch.cat(tokens, dim=-1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        batch, _, height, width = pixel_values.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        logits = self.decode_head(self.features(pixel_values))  # (B, N, C * p * p)
        logits = logits.transpose(1, 2).reshape(batch, self.num_labels * self.patch_size**2, grid_h, grid_w)
        logits = F.pixel_shuffle(logits, self.patch_size)  # (B, C, H, W)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=255)
        return SegmenterOutput(loss, logits)


def pretraining_pool(count: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pre-training scenes as (images (N, 3, 64, 64), coarse labels (N, 64, 64))."""
    scenes = [pretraining_scene(offset + i, IMAGE_SIZE) for i in range(count)]
    images = torch.stack([image for image, _ in scenes])
    labels = torch.from_numpy(np.stack([label for _, label in scenes]).astype(np.int64))
    return images, labels


def pretrain(
    out: str,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    pool: int = 6000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Pre-train a backbone from scratch on random looks and coarse labels; save it to ``out`` (HF format).

    Returns a summary: steps, final loss (mean of the last 50 steps), held-out coarse mIoU and seconds.
    """
    from transformers import Dinov2Model

    from .metric import IoUAccumulator

    if steps < 1 or batch_size < 1 or pool < batch_size:
        raise ValueError(f"need steps >= 1 and pool >= batch_size >= 1, got {steps}, {pool}, {batch_size}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = TokenSegmenter(Dinov2Model(foundation_config()), num_labels=len(COARSE_CLASSES))
    images, labels = pretraining_pool(pool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = progress_bar(steps, "pre-training", progress)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, pool, (batch_size,), generator=generator)
        x, y = images[pick], labels[pick]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    model.eval()
    held_images, held_labels = pretraining_pool(256, offset=pool)
    accumulator = IoUAccumulator(len(COARSE_CLASSES))
    with torch.no_grad():
        for i in range(0, len(held_images), 64):
            accumulator.update(model(held_images[i : i + 64]).logits.argmax(1), held_labels[i : i + 64])
    model.backbone.save_pretrained(out)
    return {
        "steps": steps,
        "loss": float(np.mean(losses[-50:])),
        "held_out_coarse_miou": float(accumulator.compute()["mean_iou"]),
        "seconds": time.perf_counter() - start,
    }


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
