"""Your own data: the ``folder`` layout with 11 classes, a label map, 360x480 images and two domains, through
prepare, train (every method), eval and predict; bad inputs named; any image size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from peft_fishertune.seg.classes import LabelSpace
from peft_fishertune.seg.cli import main
from peft_fishertune.seg.data import load_segmentation_dataset, prepare_folder
from peft_fishertune.seg.run_config import SegRunConfig

from .models import save_tiny_dinov2, tiny_dinov2

EXAMPLE = Path(__file__).parent.parent / "examples" / "make_folder_dataset.py"
EXAMPLE_CONFIG = Path(__file__).parent.parent / "configs" / "folder_example.yaml"
NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]


def _example():
    spec = importlib.util.spec_from_file_location("make_folder_dataset", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mycity(tmp_path_factory):
    """The example script's fixture (11 classes, raw 11 = void, 360x480, day and dusk) and a tiny backbone."""
    root = tmp_path_factory.mktemp("own") / "mycity"
    _example().main([str(root), "--count", "3"])
    save_tiny_dinov2(root.parent / "backbone")
    return root


def run_config(root: Path, method: str) -> Path:
    """The example config, made tiny: the fixture's folders, a random backbone, a few steps."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config.update(
        backbone=str(root.parent / "backbone"),
        method=method,
        decoder="tiny",
        train_root=str(root),
        eval_datasets={
            "day": {"layout": "folder", "root": str(root), "split": "val"},
            "dusk": {"layout": "folder", "root": f"{root}_dusk", "split": "test", "short_side": 180},
        },
        output_dir=str(root.parent / f"run_{method}"),
        crop=112,
        train_scale=[240, 180],
        window=512,  # larger than the 360x480 day images: one window each
        stride=341,
        batch_size=2,
        lr=1e-3,
        backbone_lr=1e-3,
        warmup_steps=1,
        calibration_steps=1,
        tuning_steps=2,
        density_max=0.2,
        logging_steps=1,
        save_steps=100,
    )
    path = root.parent / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prepare_folder_reports_splits_and_class_pixels(mycity, capsys):
    """prepare folder checks every pair and prints the images per split and the pixel share of each class."""
    assert main(["prepare", "folder", str(mycity), "--config", str(run_config(mycity, "fishertune"))]) == 0
    printed = capsys.readouterr().out
    assert "train 3 images, val 3 images" in printed and "| bicyclist |" in printed and "(ignore 255)" in printed
    index = yaml.safe_load((mycity / "fishertune_index.json").read_text())
    assert index["classes"] == NAMES and len(index["splits"]["train"]) == 3
    report = prepare_folder(mycity, SegRunConfig.load(EXAMPLE_CONFIG).label_space)
    pixels = report["train"]["pixels"]
    assert len(pixels) == 12 and pixels[-1] > 0 and sum(pixels) == 3 * 360 * 480  # raw 11 -> ignore


def test_label_map_sends_void_to_ignore(mycity):
    space = SegRunConfig.load(EXAMPLE_CONFIG).label_space
    item = load_segmentation_dataset("folder", mycity, "train", space)[0]
    raw = np.asarray(Image.open(mycity / "labels" / "train" / "scene_000.png"))
    assert item["pixel_values"].shape == (3, 360, 480)
    assert torch.equal(item["labels"] == 255, torch.from_numpy(raw == 11))
    assert set(item["labels"].unique().tolist()) <= set(range(11)) | {255}


@pytest.mark.parametrize("method", ["fishertune", "full", "lora", "frozen"])
def test_train_eval_predict_on_own_classes(mycity, method, capsys):
    """Every method trains on the folder dataset; eval prints per-class IoU with the class names for both
    domains; predict writes the mask in the config's colours, at the image's size."""
    config = run_config(mycity, method)
    assert main(["train", str(config)]) == 0
    folder = mycity.parent / f"run_{method}" / "adapter"
    capsys.readouterr()
    assert main(["eval", str(folder), "--datasets", "day", "dusk"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| class | day | dusk | mean |"
    assert [line.split("|")[1].strip() for line in table[2:]] == [*NAMES, "**mIoU**"]
    out = mycity.parent / f"{method}.png"
    assert main(["predict", str(folder), str(mycity / "images" / "val" / "scene_000.png"), "-o", str(out)]) == 0
    colours = np.asarray(Image.open(out))
    assert colours.shape == (360, 480, 3)
    palette = {tuple(c) for c in yaml.safe_load(EXAMPLE_CONFIG.read_text())["palette"]}
    assert {tuple(c) for c in colours.reshape(-1, 3)} <= palette


def _folder(tmp_path, damage=None):
    root = tmp_path / "data"
    _example().write(root, "train", 2, size=(40, 60))
    if damage:
        damage(root)
    return root


def _unlink(path):
    return lambda root: (root / path).unlink()


def _resize_label(root):
    Image.fromarray(np.zeros((30, 60), dtype=np.uint8)).save(root / "labels" / "train" / "scene_001.png")


def _bad_value(root):
    Image.fromarray(np.full((40, 60), 42, dtype=np.uint8)).save(root / "labels" / "train" / "scene_001.png")


def _garbage_image(root):
    (root / "images" / "train" / "scene_001.png").write_bytes(b"not an image")


def _empty_split(root):
    for path in (root / "images" / "train").iterdir():
        path.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_unlink("labels/train/scene_001.png"), r"scene_001.png is missing: the label of .*scene_001.png"),
        (_resize_label, r"labels/train/scene_001.png: label size \(60, 30\) differs"),
        (_bad_value, r"labels/train/scene_001.png: label value 42 is not a class index \(0..10\) .* after the label"),
        (_garbage_image, r"images/train/scene_001.png: cannot be read"),
        (_empty_split, r"images/train holds no .png/.jpg/.jpeg images: the split 'train' is empty"),
    ],
    ids=["missing label", "size mismatch", "value outside the classes", "unreadable image", "empty split"],
)
def test_bad_folder_data_names_the_file(tmp_path, damage, message):
    space = LabelSpace(tuple(NAMES), 255, {11: 255})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        prepare_folder(_folder(tmp_path, damage), space)


def test_split_lists_decide_the_split(tmp_path):
    """ROOT/<split>.txt pairs (relative paths) replace the folders; a bad line is named with its number."""
    root = _folder(tmp_path)
    (root / "mine.txt").write_text("images/train/scene_001.png labels/train/scene_001.png\n")
    dataset = load_segmentation_dataset("folder", root, "mine", LabelSpace(tuple(NAMES), 255, {11: 255}))
    assert len(dataset) == 1 and dataset[0]["name"] == "scene_001"
    (root / "mine.txt").write_text("images/train/scene_001.png\n")
    with pytest.raises(ValueError, match=r"mine.txt, line 1: expected 'image label'"):
        load_segmentation_dataset("folder", root, "mine")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("classes", ["a", "a"], "distinct"),
        ("ignore_index", 3, "ignore_index"),
        ("label_map", {7: 40}, r"label_map\[7\] = 40"),
        ("palette", [[0, 0, 0]], "palette"),
        ("eval_datasets", {"x": {"layout": "folder"}}, r"eval_datasets\['x'\]"),
        ("eval_datasets", {"x": {"layout": "nope", "root": "r"}}, "unknown layout 'nope'"),
    ],
)
def test_bad_class_settings_are_named(field, value, message):
    settings = {"classes": ["a", "b", "c", "d", "e"], field: value} if field != "classes" else {field: value}
    with pytest.raises(ValueError, match=message):
        SegRunConfig(**settings)


@pytest.mark.parametrize("size", [(360, 480), (375, 1242)])
def test_any_image_size(size):
    """Training crops of any image (padded with the ignore value when smaller), and sliding-window logits at the
    image's own size, windows larger than the image included, through the recipe's model."""
    from peft_fishertune.seg.inference import predict_labels, slide_inference
    from peft_fishertune.seg.model import ViTMask2Former, tiny_decoder_config
    from peft_fishertune.seg.transforms import train_transform

    generator = torch.Generator().manual_seed(0)
    image, label = torch.rand(3, *size), torch.randint(0, 11, size)
    crop, target = train_transform(image, label, generator, crop=400, scale=(1242, 375), ignore_index=250)
    assert crop.shape == (3, 400, 400) and target.shape == (400, 400)
    assert set(target.unique().tolist()) <= set(range(11)) | {250}
    torch.manual_seed(0)
    model = ViTMask2Former(tiny_dinov2(blocks=4), num_classes=11, decoder_config=tiny_decoder_config(11)).eval()
    with torch.no_grad():
        for window in (512, 2048):
            logits = slide_inference(lambda x: model(pixel_values=x).logits, image[None], 11, window, 341)
            assert logits.shape == (1, 11, *size)
            assert predict_labels(logits, size).shape == (1, *size)
