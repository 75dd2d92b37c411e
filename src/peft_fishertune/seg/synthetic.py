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


def structure(label: np.ndarray, seed: int, index: int) -> np.ndarray:
    """(H, W) multiplicative shading of a scene, a function of its layout only (the same in every domain).

    Each class has its own pattern, so that a class can be told from another by its structure and not only by
    its colour: windows on buildings, leafy blobs on vegetation, a dashed centre line on the road, paving lines
    on sidewalks, dark wheels and light windows on cars, a light head on people, a gradient in the sky.
    """
    rng = np.random.default_rng([seed, index, 0])
    size = label.shape[0]
    rows, cols = np.mgrid[:size, :size]
    shade = np.ones(label.shape, dtype=np.float32)
    building = label == CLASSES.index("building")
    windows = ((rows % 5) >= 2) & ((rows % 5) <= 3) & ((cols % 4) >= 1) & ((cols % 4) <= 2)
    shade[building & windows] = 0.45
    vegetation = label == CLASSES.index("vegetation")
    blobs = rng.uniform(0.55, 1.45, (size // 4 + 1, size // 4 + 1)).astype(np.float32)
    blobs = np.kron(blobs, np.ones((4, 4), dtype=np.float32))[:size, :size]
    shade[vegetation] = blobs[vegetation]
    road = label == CLASSES.index("road")
    road_cols = np.where(road, cols, -1)
    for y in range(size):
        xs = np.flatnonzero(road_cols[y] >= 0)
        if xs.size >= 5 and (y // 3) % 2 == 0:
            mid = (xs[0] + xs[-1]) // 2
            shade[y, mid : mid + 1] = 2.2
    sidewalk = label == CLASSES.index("sidewalk")
    shade[sidewalk & (rows % 3 == 0)] = 0.7
    sky = label == CLASSES.index("sky")
    shade[sky] = (1.15 - 0.5 * rows / size)[sky]
    for name, low, high in (("car", 0.35, 1.5), ("person", 1.0, 1.6)):
        mask = label == CLASSES.index(name)
        for y0, y1, x0, x1 in _boxes(mask):
            height = y1 - y0
            if name == "car":
                shade[y1 - max(1, height // 3) : y1, x0:x1] *= low  # wheels
                shade[y0 : y0 + max(1, height // 3), x0:x1] *= high  # windows
            else:
                shade[y0 : y0 + max(1, height // 4), x0:x1] *= high  # head
    return shade


def _boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes of the connected runs of rows of ``mask`` (cars and people are axis-aligned boxes)."""
    boxes = []
    visited = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        if visited[y, x]:
            continue
        x1 = x
        while x1 < mask.shape[1] and mask[y, x1]:
            x1 += 1
        y1 = y
        while y1 < mask.shape[0] and mask[y1, x:x1].all():
            y1 += 1
        visited[y:y1, x:x1] = True
        boxes.append((int(y), int(y1), int(x), int(x1)))
    return boxes


def render(label: np.ndarray, domain: str, seed: int, index: int) -> np.ndarray:
    """(3, H, W) float image in [0, 1] of a class map in a domain."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {DOMAINS}")
    rng = np.random.default_rng([seed, index, DOMAINS.index(domain) + 1])
    palette = np.array(PALETTES["palette" if domain == "palette" else "source"], dtype=np.float32) / 255
    texture = 0.12 if domain == "palette" else 0.05
    effects = {"night": "night", "fog": "fog", "rain": "rain", "blur": "blur"}
    return _draw(label, structure(label, seed, index), palette, texture, effects.get(domain), rng)


def _draw(label, shade, palette, texture, effect, rng, strength: float = 1.0) -> torch.Tensor:
    """Colour a layout with a palette and its structure, add texture, then one visual effect (or none)."""
    image = palette[label] * shade[..., None]  # (H, W, 3)
    image = image + texture * rng.standard_normal(image.shape[:2] + (1,)).astype(np.float32)
    size = label.shape[0]
    if effect == "night":
        image = image * (np.array([0.25, 0.28, 0.45], dtype=np.float32) ** strength)
        yy, xx = np.mgrid[:size, :size]
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0, size, 2)
            image += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * 0.04) ** 2))[..., None]
    elif effect == "fog":
        horizon_weight = np.clip(1.0 - np.arange(size) / size, 0, 1)[:, None, None] ** 0.7
        fog = np.clip(strength * (0.25 + 0.6 * horizon_weight), 0, 0.95)
        image = image * (1 - fog) + 0.75 * fog
    elif effect == "rain":
        image = image * 0.8 + 0.1 * strength * rng.standard_normal(image.shape).astype(np.float32)
        for _ in range(int(size * 1.5 * strength)):
            x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
            image[y : y + size // 8, x] = image[y : y + size // 8, x] * 0.4 + 0.5
    tensor = torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1).float()
    if effect == "blur":
        width = 2 * max(1, round(2 * strength)) + 1
        kernel = torch.ones(3, 1, width, width) / width**2
        pad = width // 2
        tensor = F.conv2d(F.pad(tensor[None], (pad,) * 4, mode="replicate"), kernel, groups=3)[0]
    return tensor.clamp(0, 1)


def synthetic_dataset(domain: str, count: int, seed: int = 0, size: int = 64, offset: int = 0) -> Dataset:
    """``count`` scenes (indices ``offset``.. ``offset + count - 1``) of ``domain`` as a Dataset with
    ``pixel_values`` (3, size, size) and ``labels`` (size, size), deterministic in (seed, index, domain)."""
    labels = [layout(seed, offset + i, size) for i in range(count)]
    images = [render(label, domain, seed, offset + i).numpy() for i, label in enumerate(labels)]
    dataset = Dataset.from_dict({"pixel_values": images, "labels": [lab.astype(np.int64) for lab in labels]})
    return dataset.with_format("torch")


# Pre-training data for the small foundation backbone: the same world, any look, and a coarser label space.
COARSE_CLASSES = ("flat", "upright", "sky", "object")
# road, sidewalk -> flat; building, vegetation -> upright; sky -> sky; car, person -> object
COARSE_OF_CLASS = np.array([0, 0, 1, 1, 2, 3, 3], dtype=np.uint8)
PRETRAINING_SEED = 1_000_003  # its scenes are never those of the benchmark's seeds


def pretraining_scene(index: int, size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """One pre-training scene: a layout in a random look (a random colour per class, random texture and a random
    effect of random strength, or none) and its coarse label map (``COARSE_CLASSES``)."""
    rng = np.random.default_rng([PRETRAINING_SEED, index, 99])
    label = layout(PRETRAINING_SEED, index, size)
    palette = rng.uniform(0.05, 0.95, (len(CLASSES), 3)).astype(np.float32)
    effect = [None, "night", "fog", "rain", "blur"][int(rng.integers(0, 5))]
    image = _draw(
        label,
        structure(label, PRETRAINING_SEED, index),
        palette,
        float(rng.uniform(0.0, 0.15)),
        effect,
        rng,
        strength=float(rng.uniform(0.5, 1.5)),
    )
    return image, COARSE_OF_CLASS[label]
