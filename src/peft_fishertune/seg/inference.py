"""The test-time protocol: keep-ratio resize, sliding-window logits, logits resized to the label size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F


def keep_ratio_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Output (height, width) fitting (long side, short side) = ``scale`` with the aspect ratio kept.

    The factor is min(long / max(h, w), short / min(h, w)); ``float("inf")`` leaves a side unconstrained,
    e.g. (inf, 512) sets the short side to 512.
    """
    long_side, short_side = scale
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_keep_ratio(images: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Bilinear keep-ratio resize of (B, C, H, W) images."""
    size = keep_ratio_size(images.shape[-2], images.shape[-1], scale)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def slide_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    crop: int = 512,
    stride: int = 341,
    windows_per_batch: int = 8,
) -> torch.Tensor:
    """Average the logits of overlapping crop x crop windows, stride apart, over (B, C, H, W) images.

    Windows start every ``stride`` pixels; the last one in each direction is moved back to end at the image
    border, and an image smaller than the crop is one window. All windows have the same size, so they go
    through ``logits_fn`` in batches of ``windows_per_batch`` x B crops. ``logits_fn`` maps (N, C, h, w)
    crops to (N, num_classes, h, w) logits at the crop's resolution.
    """
    batch, _, height, width = images.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    total = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for start in range(0, len(boxes), windows_per_batch):
        chunk = boxes[start : start + windows_per_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # (len(chunk) * B, C, h, w)
        logits = logits_fn(crops)
        if logits.shape[-2:] != crops.shape[-2:]:
            raise ValueError(f"logits_fn returned {tuple(logits.shape[-2:])} for {tuple(crops.shape[-2:])} crops")
        for (y1, y2, x1, x2), part in zip(chunk, logits.split(batch)):
            total[:, :, y1:y2, x1:x2] += part
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def predict_labels(logits: torch.Tensor, label_size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, K, h, w) logits to the label's (H, W) before the argmax, as the protocol requires."""
    if tuple(logits.shape[-2:]) != tuple(label_size):
        logits = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)  # (B, H, W)
