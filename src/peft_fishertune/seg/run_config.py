"""The flat, typed run configuration of ``fishertune-seg train``, read from a YAML file plus overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("fishertune", "full", "frozen", "lora")


@dataclass
class SegRunConfig:
    """Every setting of a segmentation run; defaults are the paper's GTA5 -> Cityscapes/BDD/Mapillary setup."""

    backbone: str = "facebook/dinov2-large"  # transformers name or local path
    method: str = "fishertune"  # fishertune | full | frozen | lora (baselines from the same script)
    classes: list[str] | None = None  # class names; None: the 19 Cityscapes classes
    ignore_index: int = 255  # the label value left out of the loss and the metric
    label_map: dict[int, int] | None = None  # raw label value -> class index or ignore_index; unlisted values kept
    palette: list[list[int]] | None = None  # one [r, g, b] per class; generated when absent
    train_dataset: str = "gta5"  # a layout: gta5 | cityscapes | bdd100k | acdc | mapillary | folder
    train_root: str = "data/gta5"
    train_split: str = "train"
    # name -> a root folder (the layout is the name), or {layout: ..., root: ..., split: ..., short_side: ...}
    eval_datasets: dict[str, str | dict] = field(
        default_factory=lambda: {
            "cityscapes": "data/cityscapes",
            "bdd100k": "data/bdd100k",
            "mapillary": "data/mapillary",
        }
    )
    output_dir: str = "runs/gta2cs"
    decoder: str = "paper"  # paper (Mask2Former defaults) | tiny (tests, CPU demos)
    crop: int = 512  # training crop (images smaller than it are padded with the ignore value)
    train_scale: list[int] = field(default_factory=lambda: [2048, 512])  # [long, short] side before the 0.5-2x rescale
    test_short_side: int | None = None  # keep-ratio resize at test time for folder datasets; None: as they are
    window: int = 512  # sliding window at test time (an image smaller than it is one window)
    stride: int = 341
    batch_size: int = 4
    lr: float = 1e-4  # decoder (and full fine-tuning)
    backbone_lr: float = 1e-5  # FisherTune deltas / LoRA
    weight_decay: float = 0.05
    warmup_steps: int = 10_000
    calibration_steps: int = 2_000
    tuning_steps: int = 28_000
    density_min: float = 0.01
    density_max: float = 0.15
    schedule: str = "exponential"
    estimator: str = "closed_form"
    gamma: float = 0.01
    tau: float = 0.01
    lam: float = 0.5
    fisher_scale: str = "median"  # ours: Eq. 15's floor at the median Fisher; "loss" for the literal reading
    allocation: str = "global"  # the paper's global top-k; "per_matrix": the same density in every matrix
    recalibrate_every: int = 0  # the paper's sequential execution; k > 0 re-calibrates every k tuning steps
    # "auto": the backbone's patch embedding, whatever the family calls it (DINOv2/ViT "patch_embeddings",
    # CLIP/SigLIP "patch_embedding"); a module name; or None for the pixel-level shift.
    perturb_module: str | None = "auto"
    augment_shift: bool = False
    lora_r: int = 16
    bf16: bool = False
    seed: int = 0
    logging_steps: int = 50
    save_steps: int = 2_000

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.decoder not in ("paper", "tiny"):
            raise ValueError(f"decoder must be 'paper' or 'tiny', got {self.decoder!r}")
        for name in ("crop", "batch_size", "tuning_steps", "calibration_steps", "window", "stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.label_map is not None:
            self.label_map = {int(k): int(v) for k, v in self.label_map.items()}
        _ = self.label_space  # validates classes, ignore_index, label_map and palette, naming the bad value
        for name in self.eval_datasets:
            self.eval_dataset(name)
        if len(self.train_scale) != 2 or min(self.train_scale) <= 0:
            raise ValueError(f"train_scale must be [long side, short side], got {self.train_scale!r}")

    @property
    def label_space(self):
        from .classes import CITYSCAPES_CLASSES, LabelSpace

        names = tuple(self.classes) if self.classes is not None else CITYSCAPES_CLASSES
        palette = tuple(tuple(c) for c in self.palette) if self.palette is not None else None
        return LabelSpace(names, self.ignore_index, self.label_map, palette)

    def eval_dataset(self, name: str) -> dict:
        """{layout, root, split, short_side} of the evaluation dataset ``name``."""
        from .data import DEFAULT_SPLITS, LAYOUTS

        spec = self.eval_datasets[name]
        spec = {"layout": name, "root": spec} if isinstance(spec, str) else dict(spec)
        unknown = set(spec) - {"layout", "root", "split", "short_side"}
        if unknown or "root" not in spec:
            raise ValueError(
                f"eval_datasets[{name!r}] must be a root folder or a mapping with root (and layout, split, "
                f"short_side), got {self.eval_datasets[name]!r}"
            )
        spec.setdefault("layout", name)
        if spec["layout"] not in LAYOUTS:
            raise ValueError(f"eval_datasets[{name!r}]: unknown layout {spec['layout']!r}; known: {sorted(LAYOUTS)}")
        spec.setdefault("split", DEFAULT_SPLITS[spec["layout"]])
        spec.setdefault("short_side", self.test_short_side if spec["layout"] == "folder" else None)
        return spec

    @property
    def max_steps(self) -> int:
        """Optimizer steps. FisherTune: T1 + T3 (its T2 calibration batches are not optimizer steps).
        Baselines: T1 + T2 + T3, the paper's 40k iterations, so that every method sees as many batches."""
        if self.method == "fishertune":
            return self.warmup_steps + self.tuning_steps
        return self.warmup_steps + self.calibration_steps + self.tuning_steps

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> SegRunConfig:
        """Fields from a YAML file (unknown keys are an error naming the file), then the overrides."""
        values = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text()) or {}
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown settings {unknown}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))
