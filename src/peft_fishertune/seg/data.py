"""Segmentation datasets from their standard on-disk layouts, as ``datasets.Dataset`` of (image, label) paths.

Layouts (``root`` is the folder given to the loader):

    gta5/        images/00001.png           labels/00001.png            (raw ids; `prepare gta5` writes
                                                                           labels_trainids/00001.png)
    cityscapes/  leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
                 gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png  (`prepare cityscapes` writes them
                                                                           from *_gtFine_labelIds.png)
    bdd100k/     images/10k/<split>/<name>.jpg
                 labels/sem_seg/masks/<split>/<name>.png                (train ids already)
    acdc/        rgb_anon/<condition>/<split>/<seq>/<name>_rgb_anon.png
                 gt/<condition>/<split>/<seq>/<name>_gt_labelTrainIds.png
    mapillary/   config_v1.2.json  <training|validation>/images/<name>.jpg
                 <training|validation>/v1.2/labels/<name>.png             (`prepare mapillary` writes
                                                                           <split>/labels_trainids/<name>.png)

Images and labels are decoded on access (``set_transform``); a file that cannot be read, a label whose size
differs from its image, or a label value outside 0..18 and 255 raises ValueError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

from .classes import IGNORE_INDEX, NUM_CLASSES, gta5_to_train_ids, mapillary_lut

INDEX_FILE = "fishertune_index.json"


def _pairs_gta5(root: Path, split: str) -> list[tuple[Path, Path]]:
    labels = root / "labels_trainids"
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels} is missing: run `fishertune-seg prepare gta5 {root}` first")
    return [(image, labels / f"{image.stem}.png") for image in sorted((root / "images").glob("*.png"))]


def _pairs_cityscapes(root: Path, split: str) -> list[tuple[Path, Path]]:
    pairs = []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        name = image.name.removesuffix("_leftImg8bit.png")
        pairs.append((image, root / "gtFine" / split / image.parent.name / f"{name}_gtFine_labelTrainIds.png"))
    return pairs


def _pairs_bdd100k(root: Path, split: str) -> list[tuple[Path, Path]]:
    masks = root / "labels" / "sem_seg" / "masks" / split
    return [(image, masks / f"{image.stem}.png") for image in sorted((root / "images" / "10k" / split).glob("*.jpg"))]


def _pairs_acdc(root: Path, split: str) -> list[tuple[Path, Path]]:
    pairs = []
    for image in sorted((root / "rgb_anon").glob(f"*/{split}/*/*_rgb_anon.png")):
        condition, sequence = image.parts[-4], image.parent.name
        name = image.name.removesuffix("_rgb_anon.png")
        pairs.append((image, root / "gt" / condition / split / sequence / f"{name}_gt_labelTrainIds.png"))
    return pairs


def _pairs_mapillary(root: Path, split: str) -> list[tuple[Path, Path]]:
    split = {"train": "training", "val": "validation"}.get(split, split)
    labels = root / split / "labels_trainids"
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels} is missing: run `fishertune-seg prepare mapillary {root}` first")
    return [(image, labels / f"{image.stem}.png") for image in sorted((root / split / "images").glob("*.jpg"))]


LAYOUTS = {
    "gta5": _pairs_gta5,
    "cityscapes": _pairs_cityscapes,
    "bdd100k": _pairs_bdd100k,
    "acdc": _pairs_acdc,
    "mapillary": _pairs_mapillary,
}
DEFAULT_SPLITS = {"gta5": "train", "cityscapes": "val", "bdd100k": "val", "acdc": "val", "mapillary": "validation"}


def load_segmentation_dataset(name: str, root: str | Path, split: str | None = None) -> Dataset:
    """The (image, label) pairs of dataset ``name`` under ``root`` as a Dataset that decodes on access.

    Items: ``pixel_values`` (3, H, W) float in [0, 1], ``labels`` (H, W) int64 train ids, ``name``.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    pairs = LAYOUTS[name](root, split or DEFAULT_SPLITS[name])
    if not pairs:
        raise FileNotFoundError(f"no {name} images found under {root} (split {split or DEFAULT_SPLITS[name]!r})")
    missing = [str(label) for _, label in pairs if not label.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {name} labels are missing, e.g. {missing[0]}")
    dataset = Dataset.from_dict(
        {"image": [str(i) for i, _ in pairs], "label": [str(t) for _, t in pairs], "name": [i.stem for i, _ in pairs]}
    )
    dataset.set_transform(decode_batch)
    return dataset


def decode_batch(batch: dict) -> dict:
    pixels, labels = [], []
    for image_path, label_path in zip(batch["image"], batch["label"]):
        image, label = read_pair(image_path, label_path)
        pixels.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)  # (3, H, W)
        labels.append(torch.from_numpy(label.astype(np.int64)))  # (H, W)
    return {"pixel_values": pixels, "labels": labels, "name": batch["name"]}


def read_pair(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 train-id label, checked."""
    image = _read(image_path, "RGB")
    label = _read(label_path, None)
    if label.ndim != 2:
        raise ValueError(f"{label_path}: a label must be a single-channel image, got shape {label.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{label_path}: label size {label.shape[::-1]} differs from its image {image_path} {image.shape[1::-1]}"
        )
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"{label_path}: label value {int(label[bad][0])} is not a train id (0..18 or 255)")
    return image, label


def _read(path: str, mode: str | None) -> np.ndarray:
    try:
        with Image.open(path) as handle:
            return np.asarray(handle.convert(mode) if mode else handle)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot be read as an image ({error})") from error


def prepare(name: str, root: str | Path) -> int:
    """Write train-id labels once (GTA5: labels_trainids/; Cityscapes: *_gtFine_labelTrainIds.png from
    *_gtFine_labelIds.png) and an index of the pairs; returns how many labels were written."""
    root = Path(root)
    written = 0
    if name == "gta5":
        out = root / "labels_trainids"
        out.mkdir(exist_ok=True)
        for raw in sorted((root / "labels").glob("*.png")):
            Image.fromarray(gta5_to_train_ids(_read(str(raw), None))).save(out / raw.name)
            written += 1
    elif name == "cityscapes":
        for raw in sorted((root / "gtFine").glob("*/*/*_gtFine_labelIds.png")):
            target = raw.with_name(raw.name.replace("_labelIds.png", "_labelTrainIds.png"))
            Image.fromarray(gta5_to_train_ids(_read(str(raw), None))).save(target)
            written += 1
    elif name == "mapillary":
        config = root / "config_v1.2.json"
        if not config.exists():
            raise FileNotFoundError(f"{config} is missing: it names the Mapillary v1.2 classes")
        lut = mapillary_lut([label["readable"] for label in json.loads(config.read_text())["labels"]])
        for split in ("training", "validation"):
            out = root / split / "labels_trainids"
            for raw in sorted((root / split / "v1.2" / "labels").glob("*.png")):
                out.mkdir(exist_ok=True)
                Image.fromarray(lut[_read(str(raw), None)]).save(out / raw.name)
                written += 1
    elif name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LAYOUTS)}")
    splits = {"gta5": ["train"], "mapillary": ["training", "validation"]}.get(name, ["train", "val"])
    index = {}
    for split in splits:
        try:
            index[split] = [[str(i), str(t)] for i, t in LAYOUTS[name](root, split)]
        except FileNotFoundError:  # a split the download does not include
            continue
    (root / INDEX_FILE).write_text(json.dumps({"dataset": name, "splits": index}, indent=1))
    return written
