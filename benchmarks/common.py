"""What the benchmark scripts share: ViT-L weight shapes and random-init DINOv2 segmenters by size."""

from __future__ import annotations

import torch
from transformers import Dinov2Config, Dinov2Model

from peft_fishertune.naming import vit_target_modules
from peft_fishertune.quickstart import TinySegmenter

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names
# One ViT-L block's candidate weights; 24 blocks hold 302M entries.
VIT_L_SHAPES = {
    "q_proj": (1024, 1024),
    "k_proj": (1024, 1024),
    "v_proj": (1024, 1024),
    "o_proj": (1024, 1024),
    "fc1": (4096, 1024),
    "fc2": (1024, 4096),
}
DINOV2_SIZES = {"tiny": (32, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def dinov2_segmenter(size: str, image: int = 224, num_classes: int = 19, seed: int = 0) -> TinySegmenter:
    """A random-init DINOv2 of the given size (hidden, blocks, heads) with a 1x1-conv head."""
    hidden, layers, heads = DINOV2_SIZES[size]
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image,
        patch_size=14,
    )
    return TinySegmenter(Dinov2Model(config), num_classes=num_classes)
