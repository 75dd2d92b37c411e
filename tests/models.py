"""Tiny models built from configs (no downloads), shared by the tests and their subprocesses."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel
from transformers.pytorch_utils import Conv1D

from peft_fishertune.quickstart import TinySegmenter


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 4, 3, stride=2, groups=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv1(torch.relu(self.conv0(x)))  # (B, 4, H', W')
        return self.head(h.mean(dim=(2, 3)))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(12, 6)  # (in 6 -> out 12), weight stored (6, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.c_attn(x)))


def tiny_dinov2(blocks: int = 2, image_size: int = 28) -> Dinov2Model:
    """A random DINOv2 of width 32 (2 heads, MLP 64, patch 14)."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=14,
    )
    return Dinov2Model(config)


def save_tiny_dinov2(path, image_size: int = 56) -> None:
    """A 4-block tiny DINOv2 (seed 0) saved with save_pretrained: the recipe's test backbone."""
    torch.manual_seed(0)
    tiny_dinov2(blocks=4, image_size=image_size).save_pretrained(path)


def synthetic_trainer_data(size: int):
    """A datasets.Dataset of ``size`` quickstart images and labels, as a Trainer takes it."""
    from datasets import Dataset

    from peft_fishertune.quickstart import synthetic_batch

    images, labels = synthetic_batch(size, torch.Generator().manual_seed(0))
    return Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()}).with_format("torch")


def tiny_vit() -> ViTModel:
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    return ViTModel(config, add_pooling_layer=False)


class ViTWrapper(nn.Module):
    """Returns a tensor so the generic checks can compare outputs of transformers backbones directly."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(pixel_values=x).last_hidden_state


MODELS = {
    "mlp": (MLP, lambda: torch.randn(4, 10)),
    "conv": (ConvNet, lambda: torch.randn(2, 3, 9, 9)),
    "conv1d": (Conv1DNet, lambda: torch.randn(3, 5, 6)),
    "dinov2": (lambda: ViTWrapper(tiny_dinov2()), lambda: torch.randn(2, 3, 28, 28)),
    "vit": (tiny_vit, lambda: torch.randn(2, 3, 28, 28)),
    "segmenter": (lambda: TinySegmenter(tiny_dinov2(), num_classes=3), lambda: torch.randn(2, 3, 28, 28)),
}


def build(model_id: str, seed: int = 0):
    """The model and an input batch, both a deterministic function of ``seed``."""
    factory, make_input = MODELS[model_id]
    torch.manual_seed(seed)
    model = factory().eval()
    return model, make_input()


def tensor_of(out) -> torch.Tensor:
    """The tensor to compare from a model output: logits, a last hidden state, or the tensor itself."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out
