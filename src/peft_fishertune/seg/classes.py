"""The 19 Cityscapes evaluation classes, their colours, and the raw-id -> train-id mapping.

GTA5 labels use the Cityscapes label ids, so one mapping serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a segmentation task: names, the ignore value, an optional raw-value map and colours.

    - ``names``: the K class names; class indices are 0..K-1.
    - ``ignore_index``: the label value left out of the loss and the metric (K..65535; 255 by default).
    - ``label_map``: raw label value -> class index or ``ignore_index``; values not listed are kept as they are.
    - ``palette``: K (r, g, b) colours for ``colorize``; generated (well spread hues) when absent.

    The default is the 19 Cityscapes classes, ignore 255, no map, the Cityscapes palette.
    """

    names: tuple[str, ...] = CITYSCAPES_CLASSES
    ignore_index: int = IGNORE_INDEX
    label_map: dict | None = None
    palette: tuple | None = None

    def __post_init__(self):
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names or any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"classes must be distinct non-empty names, got {list(names)!r}")
        if not isinstance(self.ignore_index, int) or not len(names) <= self.ignore_index <= 65535:
            raise ValueError(
                f"ignore_index must be an int in [{len(names)}, 65535] (not a class index), got {self.ignore_index!r}"
            )
        for raw, target in (self.label_map or {}).items():
            if not isinstance(raw, int) or not 0 <= raw <= 65535:
                raise ValueError(f"label_map keys must be raw label values 0..65535, got {raw!r}")
            if not isinstance(target, int) or not (0 <= target < len(names) or target == self.ignore_index):
                raise ValueError(
                    f"label_map[{raw}] = {target!r} is neither a class index (0..{len(names) - 1}) nor "
                    f"ignore_index ({self.ignore_index})"
                )
        if self.palette is not None:
            palette = np.asarray(self.palette)
            if palette.shape != (len(names), 3) or palette.min() < 0 or palette.max() > 255:
                raise ValueError(
                    f"palette must hold {len(names)} (r, g, b) colours in 0..255, got shape {palette.shape}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colours(self) -> np.ndarray:
        """(K, 3) uint8 colours: the palette, the Cityscapes palette for the default classes, else generated."""
        if self.palette is not None:
            return np.asarray(self.palette, dtype=np.uint8)
        if self.names == CITYSCAPES_CLASSES:
            return PALETTE
        return generated_palette(len(self.names))

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> class indices (int64) through ``label_map``; unlisted values are kept."""
        raw = np.asarray(raw)
        if not self.label_map:
            return raw.astype(np.int64)
        lut = np.arange(max(256, int(raw.max(initial=0)) + 1, max(self.label_map) + 1), dtype=np.int64)
        for value, target in self.label_map.items():
            lut[value] = target
        return lut[raw]

    def invalid(self, labels: np.ndarray) -> np.ndarray:
        """The values of ``labels`` (class indices) that are neither a class nor the ignore value."""
        values = np.unique(labels)
        return values[((values < 0) | (values >= len(self.names))) & (values != self.ignore_index)]

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) class indices -> (H, W, 3) uint8 colours; the ignore value and anything else is black."""
        labels = np.asarray(labels, dtype=np.int64)
        colours = np.zeros((len(self.names) + 1, 3), dtype=np.uint8)
        colours[:-1] = self.colours
        return colours[np.where((labels >= 0) & (labels < len(self.names)), labels, len(self.names))]


def generated_palette(count: int) -> np.ndarray:
    """``count`` distinct colours: hues spread by the golden ratio, alternating brightness."""
    import colorsys

    colours = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, value)])
    return np.asarray(colours, dtype=np.uint8)
