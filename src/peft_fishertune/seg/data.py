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
    folder/      images/<split>/**/<name>.{png,jpg,jpeg}                  (your own data, any classes:
                 labels/<split>/**/<name>.png                              the same relative path and stem)
                 <split>.txt (optional: "image label" relative paths a line; it decides the split)

Images and labels are decoded on access (``set_transform``). Labels go through the label space's
``label_map`` (``classes.LabelSpace``); a file that cannot be read, a label whose size differs from its image,
or a label value that is neither a class index nor the ignore value raises ValueError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

from .classes import LabelSpace, gta5_to_train_ids, mapillary_lut

INDEX_FILE = "fishertune_index.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def _pairs_folder(root: Path, split: str) -> list[tuple[Path, Path]]:
    listing = root / f"{split}.txt"
    if listing.is_file():
        pairs = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{listing}, line {number}: expected 'image label' (two relative paths), got {line!r}")
            pairs.append((root / parts[0], root / parts[1]))
        if not pairs:
            raise ValueError(f"{listing} lists no image/label pairs: the split {split!r} is empty")
        missing = [str(image) for image, _ in pairs if not image.is_file()]
        if missing:
            raise FileNotFoundError(f"{listing} names {len(missing)} missing images, e.g. {missing[0]}")
        return pairs
    images = root / "images" / split
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist (and there is no {listing}): no split {split!r} in {root}")
    found = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"{images} holds no .png/.jpg/.jpeg images: the split {split!r} is empty")
    labels = root / "labels" / split
    return [(image, (labels / image.relative_to(images)).with_suffix(".png")) for image in found]


def folder_splits(root: str | Path) -> list[str]:
    """The splits of a folder dataset: the ``<split>.txt`` lists, else the folders under ``images/``."""
    root = Path(root)
    listed = sorted(p.stem for p in root.glob("*.txt"))
    if listed:
        return listed
    return sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []


LAYOUTS = {
    "gta5": _pairs_gta5,
    "cityscapes": _pairs_cityscapes,
    "bdd100k": _pairs_bdd100k,
    "acdc": _pairs_acdc,
    "mapillary": _pairs_mapillary,
    "folder": _pairs_folder,
}
DEFAULT_SPLITS = {
    "gta5": "train",
    "cityscapes": "val",
    "bdd100k": "val",
    "acdc": "val",
    "mapillary": "validation",
    "folder": "val",
}


def load_segmentation_dataset(
    name: str, root: str | Path, split: str | None = None, labels: LabelSpace | None = None
) -> Dataset:
    """The (image, label) pairs of dataset ``name`` (a layout of ``LAYOUTS``) under ``root`` as a Dataset that
    decodes on access.

    Items: ``pixel_values`` (3, H, W) float in [0, 1], ``labels`` (H, W) int64 class indices (through the
    ``labels`` label space's map; the 19 Cityscapes train ids by default), ``name``.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {name!r}; known: {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    split = split or DEFAULT_SPLITS[name]
    pairs = LAYOUTS[name](root, split)
    if not pairs:
        raise FileNotFoundError(f"no {name} images found under {root} (split {split!r})")
    missing = [str(label) for _, label in pairs if not label.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {name} labels are missing, e.g. {missing[0]}")
    dataset = Dataset.from_dict(
        {"image": [str(i) for i, _ in pairs], "label": [str(t) for _, t in pairs], "name": [i.stem for i, _ in pairs]}
    )
    space = labels or LabelSpace()
    dataset.set_transform(lambda batch: decode_batch(batch, space))
    return dataset


def decode_batch(batch: dict, labels: LabelSpace | None = None) -> dict:
    pixels, targets = [], []
    for image_path, label_path in zip(batch["image"], batch["label"]):
        image, label = read_pair(image_path, label_path, labels)
        pixels.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)  # (3, H, W)
        targets.append(torch.from_numpy(label))  # (H, W) int64
    return {"pixel_values": pixels, "labels": targets, "name": batch["name"]}


def read_pair(image_path: str, label_path: str, labels: LabelSpace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) int64 class-index label (after the label map), checked."""
    labels = labels or LabelSpace()
    image = _read(image_path, "RGB")
    label = _read(label_path, None)
    if label.ndim != 2:
        raise ValueError(f"{label_path}: a label must be a single-channel image, got shape {label.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{label_path}: label size {label.shape[::-1]} differs from its image {image_path} {image.shape[1::-1]}"
        )
    mapped = labels.map_labels(label)
    bad = labels.invalid(mapped)
    if bad.size:
        raise ValueError(
            f"{label_path}: label value {int(bad[0])} is not a class index (0..{labels.num_classes - 1}) or the "
            f"ignore value {labels.ignore_index}" + (" after the label map" if labels.label_map else "")
        )
    return image, mapped


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file; ValueError naming the file when it cannot be read."""
    return _read(path, "RGB")


def _read(path: str, mode: str | None) -> np.ndarray:
    try:
        with Image.open(path) as handle:
            return np.array(handle.convert(mode) if mode else handle)  # a writable copy (torch.from_numpy)
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
    elif name == "folder":
        prepare_folder(root)
        return 0
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


def prepare_folder(root: str | Path, labels: LabelSpace | None = None) -> dict:
    """Check a ``folder`` dataset and write its index; returns, per split, the image count and the pixels of
    each class (after the label map; the last entry counts the ignore value).

    Every image must have a label of the same size whose values, after the label map, are class indices or the
    ignore value; the first offence raises, naming the file.
    """
    root = Path(root)
    labels = labels or LabelSpace()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    splits = folder_splits(root)
    if not splits:
        raise FileNotFoundError(f"{root}: no images/<split>/ folders and no <split>.txt lists")
    index, report = {}, {}
    for split in splits:
        pairs = _pairs_folder(root, split)
        pixels = np.zeros(labels.num_classes + 1, dtype=np.int64)
        for image, label in pairs:
            if not label.is_file():
                raise FileNotFoundError(f"{label} is missing: the label of {image}")
            _, mapped = read_pair(str(image), str(label), labels)
            classes = np.where(mapped == labels.ignore_index, labels.num_classes, mapped)
            pixels += np.bincount(classes.reshape(-1), minlength=labels.num_classes + 1)
        index[split] = [[str(i.relative_to(root)), str(t.relative_to(root))] for i, t in pairs]
        report[split] = {"images": len(pairs), "pixels": pixels.tolist()}
    record = {"dataset": "folder", "classes": list(labels.names), "ignore_index": labels.ignore_index, "splits": index}
    (root / INDEX_FILE).write_text(json.dumps(record, indent=1))
    return report
