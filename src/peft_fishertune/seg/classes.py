"""The 19 Cityscapes evaluation classes, their colours, and the raw-id -> train-id mapping.

GTA5 labels use the Cityscapes label ids, so one mapping serves both.
"""

from __future__ import annotations

import numpy as np

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)
IGNORE_INDEX = 255
# The Cityscapes label ids of the 19 classes, in train-id order.
RAW_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)

_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_LUT[list(RAW_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)


def gta5_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """Map raw Cityscapes/GTA5 label ids to train ids 0..18; every other id becomes 255."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"raw label ids must lie in 0..255, got {raw.min()}..{raw.max()}")
        raw = raw.astype(np.uint8)
    return _LUT[raw]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 colours; 255 is black."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:NUM_CLASSES] = PALETTE
    return colours[np.asarray(train_ids, dtype=np.uint8)]


# Mapillary Vistas v1.2 -> the 19 classes, by the normalised "readable" class name of config_v1.2.json
# (lower case, spaces and hyphens removed), following the rule the domain-generalisation literature (Rein's
# protocol) uses: an exact name match first, then these substring rules in order; everything else -> 255.
_EXACT = {name.replace(" ", ""): train_id for train_id, name in enumerate(CITYSCAPES_CLASSES)}
_SUBSTRING_RULES = (
    (("trafficsign", "front", "back"), "traffic sign"),
    (("onrail",), "train"),
    (("cyclist", "rider"), "rider"),
    (("pole", "streetlight"), "pole"),
    (("curb", "pedestrianarea"), "sidewalk"),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
)


def mapillary_train_id(readable_name: str) -> int:
    """The train id of one Mapillary v1.2 class, given its readable name (e.g. "Lane Marking - General")."""
    name = readable_name.lower().replace(" ", "").replace("-", "")
    if name in _EXACT:
        return _EXACT[name]
    for substrings, target in _SUBSTRING_RULES:
        if any(part in name for part in substrings):
            return CITYSCAPES_CLASSES.index(target)
    return IGNORE_INDEX


def mapillary_lut(readable_names: list[str]) -> np.ndarray:
    """A 256-entry table from Mapillary v1.2 label ids (positions in config_v1.2.json) to train ids."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(readable_names)] = [mapillary_train_id(name) for name in readable_names]
    return lut
