"""Dataset layouts on disk -> datasets.Dataset; prepare; clear errors naming the bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from peft_fishertune.seg.classes import RAW_IDS
from peft_fishertune.seg.data import INDEX_FILE, load_segmentation_dataset, prepare

H, W = 8, 12


def write_image(path, seed=0, size=(H, W), suffix_jpg=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def write_label(path, values, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.choice(values, size).astype(np.uint8)).save(path)


TRAIN_IDS = list(range(19)) + [255]


def make_tree(tmp_path, name):
    root = tmp_path / name
    for i in range(2):
        if name == "gta5":
            write_image(root / "images" / f"0000{i}.png", i)
            write_label(root / "labels" / f"0000{i}.png", list(RAW_IDS) + [0, 1, 34])
        elif name == "cityscapes":
            write_image(root / "leftImg8bit" / "val" / "aachen" / f"aachen_{i}_leftImg8bit.png", i)
            write_label(root / "gtFine" / "val" / "aachen" / f"aachen_{i}_gtFine_labelIds.png", list(RAW_IDS) + [0])
        elif name == "bdd100k":
            write_image(root / "images" / "10k" / "val" / f"b{i}.jpg", i)
            write_label(root / "labels" / "sem_seg" / "masks" / "val" / f"b{i}.png", TRAIN_IDS)
        elif name == "acdc":
            write_image(root / "rgb_anon" / "fog" / "val" / "GOPR0475" / f"GOPR0475_{i}_rgb_anon.png", i)
            write_label(root / "gt" / "fog" / "val" / "GOPR0475" / f"GOPR0475_{i}_gt_labelTrainIds.png", TRAIN_IDS)
    return root


@pytest.mark.parametrize("name", ["gta5", "cityscapes", "bdd100k", "acdc"])
def test_layouts_load_after_prepare(tmp_path, name):
    """Each layout loads into a Dataset of (3, H, W) images and (H, W) train-id labels."""
    root = make_tree(tmp_path, name)
    prepare(name, root)
    index = json.loads((root / INDEX_FILE).read_text())
    assert index["dataset"] == name
    dataset = load_segmentation_dataset(name, root)
    assert len(dataset) == 2
    item = dataset[0]
    assert item["pixel_values"].shape == (3, H, W) and item["labels"].shape == (H, W)
    values = set(item["labels"].unique().tolist())
    assert values <= set(range(19)) | {255} and len(values) > 1


def test_gta5_prepare_maps_raw_ids(tmp_path):
    root = make_tree(tmp_path, "gta5")
    assert prepare("gta5", root) == 2
    raw = np.asarray(Image.open(root / "labels" / "00000.png"))
    train = np.asarray(Image.open(root / "labels_trainids" / "00000.png"))
    assert (train[raw == 7] == 0).all() and (train[raw == 33] == 18).all() and (train[raw == 34] == 255).all()


def test_gta5_without_prepare_says_so(tmp_path):
    root = make_tree(tmp_path, "gta5")
    with pytest.raises(FileNotFoundError, match="prepare gta5"):
        load_segmentation_dataset("gta5", root)


@pytest.mark.parametrize(
    "damage,message", [("corrupt", "cannot be read"), ("size", "differs from its image"), ("value", "label value 40")]
)
def test_bad_files_named(tmp_path, damage, message):
    """A corrupt image, a size mismatch or a label value outside 0..18/255 raises naming the file."""
    root = make_tree(tmp_path, "bdd100k")
    image = root / "images" / "10k" / "val" / "b1.jpg"
    label = root / "labels" / "sem_seg" / "masks" / "val" / "b1.png"
    if damage == "corrupt":
        image.write_bytes(b"not an image")
    elif damage == "size":
        write_label(label, TRAIN_IDS, size=(H + 1, W))
    else:
        write_label(label, [40, 3])
    dataset = load_segmentation_dataset("bdd100k", root)
    dataset[0]  # the good file decodes
    with pytest.raises(ValueError, match=message) as error:
        dataset[1]
    assert "b1" in str(error.value)


def test_missing_folder_and_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmentation_dataset("cityscapes", tmp_path / "nope")
    root = make_tree(tmp_path, "cityscapes")  # labelIds only, not prepared
    with pytest.raises(FileNotFoundError, match="labels are missing"):
        load_segmentation_dataset("cityscapes", root)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_segmentation_dataset("kitti", root)


MAPILLARY_NAMES = [
    "Bird",
    "Curb",
    "Fence",
    "Road",
    "Lane Marking - General",
    "Person",
    "Bicyclist",
    "Traffic Sign (Front)",
    "Traffic Sign (Back)",
    "Traffic Light",
    "Street Light",
    "Utility Pole",
    "On Rails",
    "Car",
    "Sky",
    "Vegetation",
    "Water",
    "Pedestrian Area",
    "Service Lane",
]
MAPILLARY_TRAIN = [255, 1, 4, 0, 0, 11, 12, 7, 7, 6, 5, 5, 16, 13, 10, 8, 255, 1, 0]


def test_mapillary_mapping_by_name():
    """Class names map to the 19 by exact name, then the protocol's substring rules; others to 255."""
    from peft_fishertune.seg.classes import mapillary_train_id

    assert [mapillary_train_id(n) for n in MAPILLARY_NAMES] == MAPILLARY_TRAIN


def test_mapillary_layout(tmp_path):
    root = tmp_path / "mapillary"
    root.mkdir()
    (root / "config_v1.2.json").write_text(json.dumps({"labels": [{"readable": n} for n in MAPILLARY_NAMES]}))
    for i in range(2):
        write_image(root / "validation" / "images" / f"m{i}.jpg", i)
        write_label(root / "validation" / "v1.2" / "labels" / f"m{i}.png", list(range(len(MAPILLARY_NAMES))))
    assert prepare("mapillary", root) == 2
    raw = np.asarray(Image.open(root / "validation" / "v1.2" / "labels" / "m0.png"))
    item = load_segmentation_dataset("mapillary", root)[0]
    assert (item["labels"].numpy() == np.array(MAPILLARY_TRAIN, dtype=np.uint8)[raw]).all()
