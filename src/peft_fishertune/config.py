"""FisherTuneConfig: every hyper-parameter of the method, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._peft_registry import FISHERTUNE
from .drfim import FISHER_SCALES

SCHEDULES = ("exponential", "linear", "cosine")
ESTIMATORS = ("closed_form", "variational")
INIT_SELECTIONS = ("none", "random", "magnitude")
VALUE_DTYPES = ("float32", "bfloat16", "float16")
INDEX_ENCODINGS = ("auto", "int32")
ALLOCATIONS = ("global", "per_matrix")


@dataclass
class FisherTuneConfig(PeftConfig):
    """Configuration of a FisherTune adapter.

    FisherTune ("FisherTune: Fisher-Guided Robust Tuning of Vision Foundation Models for Domain
    Generalized Segmentation", Zhao et al., CVPR 2025, https://arxiv.org/abs/2503.17940) trains a sparse
    delta on the backbone's own weights. The trained entries are the top fraction of all candidate weights
    ranked globally by the domain-related Fisher score (DR-FIM); the fraction grows from ``density_min``
    to ``density_max`` over the tuning stage. The decoder is trained in full through ``modules_to_save``.

    Densities are fractions of ALL candidate weights together (one global ranking), not per layer.

    ``selection_counts`` is written by the model, not by users: after a selection it holds, per adapted
    module, how many entries that module owns at ``density_max``. peft builds adapter tensors from the
    config before it loads weights, so these counts are what let a saved adapter load without the
    calibration data.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Candidate modules: names (suffix match) or one regex (full match). nn.Linear, nn.Conv2d and "
                "transformers' Conv1D are supported. None uses the architecture default (DINOv2/ViT: "
                "q/k/v/output projections and the two MLP layers)."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to exclude from the candidates."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter, e.g. the decoder ['decode_head']."},
    )
    density_min: float = field(
        default=0.01,
        metadata={"help": "Fraction of candidate weights trainable at the start of tuning, in (0, 1]."},
    )
    density_max: float = field(
        default=0.15,
        metadata={"help": "Fraction of candidate weights trainable at the end of tuning, in [density_min, 1]."},
    )
    schedule: Literal["exponential", "linear", "cosine"] = field(
        default="exponential",
        metadata={"help": f"Growth of the density over the tuning steps, one of {SCHEDULES}."},
    )
    gamma: float = field(
        default=0.01,
        metadata={"help": "Weight of KL(q || p) in the variational objective (supplementary Eq. 5); > 0."},
    )
    tau: float = field(
        default=0.01,
        metadata={"help": "Standard deviation of the prior N(theta_pt, tau^2 I) (supplementary Eq. 3); > 0."},
    )
    lam: float = field(
        default=0.5,
        metadata={
            "help": "lambda of (1 - lambda) * F + lambda * dF, the task/domain weighting (supplementary Table 1); "
            "in [0, 1]. 0 ranks by the plain Fisher score."
        },
    )
    eps: float = field(
        default=1e-8,
        metadata={"help": "Added to min(F(x), F(x')) in the domain-sensitivity ratio (Eq. 14); > 0."},
    )
    fisher_scale: Literal["median", "loss"] = field(
        default="median",
        metadata={
            "help": "Units in which Eq. 15's domain term reads F(x) and F(x'). 'median' (ours): F divided by "
            "median(F) / 100, so that at gamma = tau = 0.01 the prior floor gamma * tau^-2 equals the median "
            "Fisher of the candidates, whatever the loss reduction, image or batch size. 'loss': F as the loss "
            "returns it (the literal reading; with a mean loss the floor then swamps F and the domain term "
            "follows F)."
        },
    )
    allocation: Literal["global", "per_matrix"] = field(
        default="global",
        metadata={
            "help": "How the density is spread over the candidate matrices. 'global' (the paper's): one top-k "
            "over all candidate weights. 'per_matrix' (ours): every matrix gets the same density and the scores "
            "choose the entries within it."
        },
    )
    recalibrate_every: int = field(
        default=0,
        metadata={
            "help": "Re-run the DR-FIM calibration every this many tuning steps (the paper's alternating "
            "execution, Alter-2K/4K/6K); 0 (the paper's default, sequential execution) never does. A "
            "re-calibration keeps the active entries and their values and re-ranks the rest."
        },
    )
    estimator: Literal["closed_form", "variational"] = field(
        default="closed_form",
        metadata={"help": f"How the precision Lambda is estimated, one of {ESTIMATORS}."},
    )
    perturb_module: str | None = field(
        default=None,
        metadata={
            "help": "Name of the module whose output features get the DSU-style statistics shift that makes x'. "
            "None shifts the input pixels."
        },
    )
    perturb_strength: float = field(
        default=1.0,
        metadata={"help": "Scale of the noise eps_mu, eps_sigma ~ N(0, 1) applied to the feature statistics; >= 0."},
    )
    augment_shift: bool = field(
        default=False,
        metadata={
            "help": "Apply the same feature-statistics shift as augmentation to every training forward of the "
            "tuning stage (a new draw per step), as the paper's comparison suggests its training does."
        },
    )
    warmup_steps: int = field(default=10_000, metadata={"help": "T1: decoder-only steps before calibration; >= 0."})
    calibration_steps: int = field(default=2_000, metadata={"help": "T2: batches of the DR-FIM calibration pass; > 0."})
    tuning_steps: int = field(
        default=28_000, metadata={"help": "T3: sparse-tuning steps over which the density grows; > 0."}
    )
    init_selection: Literal["none", "random", "magnitude"] = field(
        default="none",
        metadata={
            "help": "Selection made when no calibration scores are given: 'none' (empty delta until select()), "
            "'random' or 'magnitude' (top |w|), both global over all candidates, at density_max, fully active."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the delta starts at zero. False: a non-zero random delta (for tests)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the random selection, the random delta and the perturbation noise."}
    )
    save_value_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": f"dtype of the delta values in the saved file, one of {VALUE_DTYPES}; they load back into "
            "the adapter's working dtype."
        },
    )
    index_encoding: Literal["auto", "int32"] = field(
        default="auto",
        metadata={
            "help": "How saved indices are coded: 'auto' picks per layer the smallest of int32, bit-packed, "
            "bitmask and Rice gap codes (a uint8 'fishertune_code' tensor); 'int32' writes plain int32 "
            "'fishertune_indices' tensors."
        },
    )
    selection_counts: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Written by the model: entries per adapted module at density_max (loading needs it)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FISHERTUNE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        _check_range("density_min", self.density_min, 0.0, 1.0, low_open=True)
        _check_range("density_max", self.density_max, self.density_min, 1.0)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("init_selection", self.init_selection, INIT_SELECTIONS)
        _check_choice("save_value_dtype", self.save_value_dtype, VALUE_DTYPES)
        _check_choice("index_encoding", self.index_encoding, INDEX_ENCODINGS)
        _check_choice("fisher_scale", self.fisher_scale, FISHER_SCALES)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_int("recalibrate_every", self.recalibrate_every, minimum=0)
        for name in ("gamma", "tau", "eps"):
            _check_range(name, getattr(self, name), 0.0, math.inf, low_open=True)
        _check_range("lam", self.lam, 0.0, 1.0)
        _check_range("perturb_strength", self.perturb_strength, 0.0, math.inf)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("calibration_steps", self.calibration_steps, minimum=1)
        _check_int("tuning_steps", self.tuning_steps, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name in ("init_weights", "augment_shift"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.perturb_module is not None and not (isinstance(self.perturb_module, str) and self.perturb_module):
            raise ValueError(f"perturb_module must be a module name or None, got {self.perturb_module!r}")
        if not isinstance(self.selection_counts, dict):
            raise ValueError(f"selection_counts must be a dict of module name -> count, got {self.selection_counts!r}")
        for name, count in self.selection_counts.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"selection_counts[{name!r}] must be a non-negative int, got {count!r}")


def _check_range(name, value, low, high, low_open=False) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or math.isnan(value) or (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def _check_choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name, value, minimum) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
