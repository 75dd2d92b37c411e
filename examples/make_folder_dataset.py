"""Write a tiny dataset in the ``folder`` layout, to try ``fishertune-seg`` on your own kind of data.

    python examples/make_folder_dataset.py data/mycity            # 11 classes, 360x480, domains "day" and "dusk"
    fishertune-seg prepare folder data/mycity --config configs/folder_example.yaml
    fishertune-seg prepare folder data/mycity_dusk --config configs/folder_example.yaml
    fishertune-seg train configs/folder_example.yaml --backbone DIR_OF_A_DINOV2   # e.g. facebook/dinov2-small

Layout written (the same relative path and stem for an image and its label):

    ROOT/images/{train,val}/scene_000.png       ROOT/labels/{train,val}/scene_000.png
    ROOT_dusk/images/test/scene_000.png         ROOT_dusk/labels/test/scene_000.png

Labels are single-channel PNGs of raw values 0..11: 0..10 are the 11 classes of ``configs/folder_example.yaml``,
and 11 stands for "void", which its ``label_map`` sends to the ignore value. Each class has a colour and a
texture, so a few training steps learn something; the "dusk" copy is darker and bluer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 11
VOID = 11


def scene(index: int, size=(360, 480), dusk: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) image and its (H, W) raw label: blocks of classes (and some void) on a coarse grid."""
    rng = np.random.default_rng(index)
    height, width = size
    grid = rng.integers(0, CLASSES + 1, (height // 40 + 1, width // 40 + 1))
    label = np.kron(grid, np.ones((40, 40), dtype=np.int64))[:height, :width]
    hue = np.linspace(0, 1, CLASSES + 1, endpoint=False)
    colours = (255 * np.stack([hue, (hue * 3) % 1, (hue * 7) % 1], 1)).astype(np.float64)
    image = colours[label] + rng.normal(0, 12, (height, width, 3))
    if dusk:
        image = image * np.array([0.45, 0.5, 0.8]) + np.array([5, 10, 40])
    return np.clip(image, 0, 255).astype(np.uint8), label.astype(np.uint8)


def write(root: Path, split: str, count: int, size=(360, 480), dusk: bool = False, offset: int = 0) -> None:
    for i in range(count):
        image, label = scene(offset + i, size, dusk)
        for kind, array in (("images", image), ("labels", label)):
            path = root / kind / split / f"scene_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int, default=4, help="images per split")
    parser.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args(argv)
    size = tuple(args.size)
    write(args.root, "train", args.count, size)
    write(args.root, "val", args.count, size, offset=1000)
    dusk = args.root.with_name(args.root.name + "_dusk")
    write(dusk, "test", args.count, size, dusk=True, offset=2000)
    print(f"wrote {args.root} (train, val) and {dusk} (test): {args.count} images each, {size[0]}x{size[1]}")


if __name__ == "__main__":
    main()
