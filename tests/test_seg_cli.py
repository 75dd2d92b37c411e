"""fishertune-seg end to end on tiny fixture trees in the real layouts and a tiny random-config backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from peft_fishertune.seg.classes import CITYSCAPES_CLASSES, RAW_IDS
from peft_fishertune.seg.cli import main
from peft_fishertune.seg.run_config import SegRunConfig

from .models import save_tiny_dinov2

SIZE = (64, 96)


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def scene(seed):
    """An image whose colour follows its label, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.repeat(rng.choice(len(RAW_IDS), (4, 6)), 16, 0), 16, 1)  # (64, 96) train ids
    image = np.stack([(label * 13) % 255, (label * 29) % 255, (label * 7) % 255], -1).astype(np.uint8)
    return image, label


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    for i in range(4):
        image, label = scene(i)
        write(root / "gta5" / "images" / f"{i:05d}.png", image)
        write(root / "gta5" / "labels" / f"{i:05d}.png", np.array(RAW_IDS, dtype=np.uint8)[label])
        write(root / "cityscapes" / "leftImg8bit" / "val" / "x" / f"x_{i}_leftImg8bit.png", image)
        write(
            root / "cityscapes" / "gtFine" / "val" / "x" / f"x_{i}_gtFine_labelIds.png",
            np.array(RAW_IDS, dtype=np.uint8)[label],
        )
    save_tiny_dinov2(root / "backbone", image_size=64)
    assert main(["prepare", "gta5", str(root / "gta5")]) == 0
    assert main(["prepare", "cityscapes", str(root / "cityscapes")]) == 0
    return root


def run_config(root, method):
    config = {
        "backbone": str(root / "backbone"),
        "method": method,
        "train_dataset": "gta5",
        "train_root": str(root / "gta5"),
        "eval_datasets": {"cityscapes": str(root / "cityscapes")},
        "output_dir": str(root / f"run_{method}"),
        "decoder": "tiny",
        "crop": 64,
        "batch_size": 2,
        "lr": 1e-3,
        "backbone_lr": 1e-3,
        "warmup_steps": 2,
        "calibration_steps": 1,
        "tuning_steps": 3,
        "density_max": 0.2,
        "logging_steps": 1,
        "save_steps": 100,
    }
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", ["fishertune", "lora", "full"])
def test_train_eval_predict(workspace, method, capsys):
    """train writes the adapter (or weights) with its run config; eval prints per-domain mIoU; predict a PNG."""
    assert main(["train", str(run_config(workspace, method))]) == 0
    folder = workspace / f"run_{method}" / "adapter"
    assert (folder / "seg_config.yaml").exists()
    capsys.readouterr()
    assert main(["eval", str(folder), "--datasets", "cityscapes"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| class | cityscapes | mean |"
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[2:]}
    assert list(rows) == [*CITYSCAPES_CLASSES, "**mIoU**"] and 0 <= float(rows["**mIoU**"]) <= 100
    out = workspace / f"{method}.png"
    assert (
        main(
            [
                "predict",
                str(folder),
                str(workspace / "cityscapes" / "leftImg8bit" / "val" / "x" / "x_0_leftImg8bit.png"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(out)).shape == (*SIZE, 3)


def test_run_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown settings"):
        SegRunConfig.load(bad)
    with pytest.raises(ValueError, match="method"):
        SegRunConfig(method="adapter")
    paper = Path(__file__).parent.parent / "configs" / "gta2cs_dinov2_large.yaml"
    assert SegRunConfig.load(paper).max_steps == 38_000  # + 2k calibration batches
    assert SegRunConfig.load(paper, method="full").max_steps == 40_000
