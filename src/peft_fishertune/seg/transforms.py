"""Training augmentation of (image, label) pairs, as pure functions of a seeded torch Generator.

The usual domain-generalised segmentation pipeline: random rescale (ratio 0.5-2.0 of a base scale, aspect
kept), a random crop whose largest class covers at most ``cat_max_ratio`` of the labelled pixels (up to 10
tries), a horizontal flip, and photometric jitter (brightness, contrast, saturation, hue). Images are
(3, H, W) floats in [0, 1]; labels (H, W) int64 train ids, 255 ignored; crops smaller than the crop size are
padded (image 0, label 255).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .classes import IGNORE_INDEX
from .inference import keep_ratio_size


def random_rescale(image, label, generator, scale=(2048, 512), ratio=(0.5, 2.0)):
    low, high = ratio
    factor = low + (high - low) * float(torch.rand((), generator=generator))
    size = keep_ratio_size(image.shape[-2], image.shape[-1], (scale[0] * factor, scale[1] * factor))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def random_crop(image, label, generator, size=512, cat_max_ratio=0.75, tries=10, ignore_index=IGNORE_INDEX):
    height, width = label.shape
    for _ in range(tries):
        y = int(torch.randint(max(height - size, 0) + 1, (), generator=generator))
        x = int(torch.randint(max(width - size, 0) + 1, (), generator=generator))
        crop = label[y : y + size, x : x + size]
        counts = torch.bincount(crop[crop != ignore_index].reshape(-1))
        if counts.numel() > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    image, label = image[:, y : y + size, x : x + size], label[y : y + size, x : x + size]
    pad_h, pad_w = size - label.shape[0], size - label.shape[1]
    if pad_h > 0 or pad_w > 0:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


def random_flip(image, label, generator, probability=0.5):
    if float(torch.rand((), generator=generator)) < probability:
        return image.flip(-1), label.flip(-1)
    return image, label


def photometric_jitter(image, generator, brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18 / 360):
    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator))

    image = image + uniform(-brightness, brightness)
    mean = image.mean()
    image = (image - mean) * uniform(*contrast) + mean
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
    image = (image - grey) * uniform(*saturation) + grey
    image = _shift_hue(image.clamp(0, 1), uniform(-hue, hue))
    return image.clamp(0, 1)


def _shift_hue(image, shift):
    """Rotate the hue of a (3, H, W) RGB image by ``shift`` turns (YIQ rotation)."""
    import math

    angle = 2 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    to_yiq = image.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rotate = image.new_tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    transform = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("ij,jhw->ihw", transform, image)


def train_transform(image, label, generator, crop=512, scale=(2048, 512), ignore_index=IGNORE_INDEX):
    """Rescale, crop, flip, jitter: the training pipeline for one pair (labels resized nearest-neighbour)."""
    image, label = random_rescale(image, label, generator, scale)
    image, label = random_crop(image, label, generator, crop, ignore_index=ignore_index)
    image, label = random_flip(image, label, generator)
    return photometric_jitter(image, generator), label
