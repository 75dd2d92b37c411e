"""Procedural street-like scenes in several visual domains, made by the package (no downloads).

A scene's layout (which class covers which pixel) depends only on the seed and the scene index, never on the
domain, so every domain holds the very same label maps and only the rendering differs. The domain
generalisation gap is then purely visual, as in GTA5 -> Cityscapes.

Classes: road, sidewalk, building, vegetation, sky, car, person (7). Domains:

- ``source``: flat daylight palette with mild texture (the training domain);
- ``palette``: other colours and stronger textures;
- ``night``: dark, blue-shifted, with bright light spots;
- ``fog``: colours fade to grey with distance (towards the horizon);
- ``rain``: streaks and pixel noise;
- ``blur``: out of focus.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch.nn import functional as F

CLASSES = ("road", "sidewalk", "building", "vegetation", "sky", "car", "person")
DOMAINS = ("source", "palette", "night", "fog", "rain", "blur")
PALETTES = {
    "source": [
        (90, 90, 95),
        (170, 160, 150),
        (150, 90, 70),
        (60, 140, 60),
        (130, 180, 235),
        (200, 30, 30),
        (240, 200, 60),
    ],
    "palette": [
        (120, 100, 140),
        (110, 170, 170),
        (200, 190, 110),
        (150, 110, 40),
        (230, 150, 120),
        (40, 60, 200),
        (250, 120, 230),
    ],
}


def layout(seed: int, index: int, size: int = 64) -> np.ndarray:
    """The (size, size) class map of one scene: sky, buildings, vegetation, sidewalks, road, cars, people."""
    rng = np.random.default_rng([seed, index])
    label = np.full((size, size), CLASSES.index("sky"), dtype=np.uint8)
    horizon = int(size * rng.uniform(0.35, 0.5))
    rows = np.arange(size)[:, None]
    cols = np.arange(size)[None, :]
    x = 0
    while x < size:  # a skyline of buildings and trees
        width = int(rng.integers(size // 10, size // 4))
        top = int(horizon - rng.uniform(0.1, 0.35) * size)
        kind = CLASSES.index("vegetation") if rng.random() < 0.3 else CLASSES.index("building")
        label[max(top, 0) : horizon, x : x + width] = kind
        x += width
    ground = rows >= horizon
    depth = (rows - horizon + 1) / (size - horizon + 1)  # 0 at the horizon, 1 at the bottom
    centre = size / 2 + rng.uniform(-0.15, 0.15) * size
    half_road = (0.05 + 0.45 * depth) * size
    half_walk = half_road + (0.03 + 0.2 * depth) * size
    label[ground & (np.abs(cols - centre) <= half_walk)] = CLASSES.index("sidewalk")
    label[ground & (np.abs(cols - centre) <= half_road)] = CLASSES.index("road")
    label[ground & (np.abs(cols - centre) > half_walk)] = CLASSES.index("vegetation")
    for _ in range(int(rng.integers(1, 4))):  # cars on the road, larger when nearer
        y = int(rng.uniform(horizon + 2, size - 2))
        scale = (y - horizon) / (size - horizon)
        h, w = max(2, int(scale * size * 0.18)), max(3, int(scale * size * 0.3))
        x0 = int(centre + rng.uniform(-0.6, 0.3) * (0.05 + 0.45 * scale) * size)
        _paint(label, y - h, y, x0, x0 + w, CLASSES.index("car"))
    for _ in range(int(rng.integers(1, 4))):  # people on the sidewalks
        y = int(rng.uniform(horizon + 1, size - 1))
        scale = (y - horizon) / (size - horizon)
        h, w = max(3, int(scale * size * 0.25)), max(1, int(scale * size * 0.1))
        side = 1 if rng.random() < 0.5 else -1
        x0 = int(centre + side * ((0.05 + 0.45 * scale) * size + (0.02 + 0.1 * scale) * size))
        _paint(label, y - h, y, x0, x0 + w, CLASSES.index("person"))
    return label


def _paint(label: np.ndarray, y0: int, y1: int, x0: int, x1: int, value: int) -> None:
    """Fill the rectangle [y0, y1) x [x0, x1), clipped to the image (an empty clip paints nothing)."""
    height, width = label.shape
    y0, y1, x0, x1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if y0 < y1 and x0 < x1:
        label[y0:y1, x0:x1] = value


def render(label: np.ndarray, domain: str, seed: int, index: int) -> np.ndarray:
    """(3, H, W) float image in [0, 1] of a class map in a domain."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {DOMAINS}")
    rng = np.random.default_rng([seed, index, DOMAINS.index(domain) + 1])
    palette = np.array(PALETTES["palette" if domain == "palette" else "source"], dtype=np.float32) / 255
    image = palette[label]  # (H, W, 3)
    texture = 0.12 if domain == "palette" else 0.05
    image = image + texture * rng.standard_normal(image.shape[:2] + (1,)).astype(np.float32)
    size = label.shape[0]
    if domain == "night":
        image = image * np.array([0.25, 0.28, 0.45], dtype=np.float32)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0, size, 2)
            yy, xx = np.mgrid[:size, :size]
            image += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * 0.04) ** 2))[..., None]
    elif domain == "fog":
        horizon_weight = np.clip(1.0 - np.arange(size) / size, 0, 1)[:, None, None] ** 0.7
        fog = 0.25 + 0.6 * horizon_weight
        image = image * (1 - fog) + 0.75 * fog
    elif domain == "rain":
        image = image * 0.8 + 0.1 * rng.standard_normal(image.shape).astype(np.float32)
        for _ in range(int(size * 1.5)):
            x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
            image[y : y + size // 8, x] = image[y : y + size // 8, x] * 0.4 + 0.5
    tensor = torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1).float()
    if domain == "blur":
        kernel = torch.ones(3, 1, 5, 5) / 25
        tensor = F.conv2d(F.pad(tensor[None], (2, 2, 2, 2), mode="replicate"), kernel, groups=3)[0]
    return tensor.clamp(0, 1)


def synthetic_dataset(domain: str, count: int, seed: int = 0, size: int = 64, offset: int = 0) -> Dataset:
    """``count`` scenes (indices ``offset``.. ``offset + count - 1``) of ``domain`` as a Dataset with
    ``pixel_values`` (3, size, size) and ``labels`` (size, size), deterministic in (seed, index, domain)."""
    labels = [layout(seed, offset + i, size) for i in range(count)]
    images = [render(label, domain, seed, offset + i).numpy() for i, label in enumerate(labels)]
    dataset = Dataset.from_dict({"pixel_values": images, "labels": [lab.astype(np.int64) for lab in labels]})
    return dataset.with_format("torch")
