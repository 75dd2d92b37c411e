"""The embedded multi-domain benchmark: the shipped backbone, procedural scenes, and every method on one budget.

One run (``run_method``) for a method and a seed:

1. data: ``train_images`` source scenes (horizontal flips as augmentation), ``eval_images`` held-out scenes in
   every domain (the same layouts in each);
2. warm-up (stage 1): the backbone frozen, ``decode_head`` trained for ``warmup_steps``. The warm-up depends
   only on the seed, so ``warmup`` is computed once per seed and every method starts from the same head;
3. the method, for ``tuning_steps`` steps, with the head still training:

   - ``frozen``: the head only;
   - ``full``: every backbone weight;
   - ``lora``: peft LoRA (rank ``lora_rank``) on the same linear layers FisherTune may pick;
   - ``random``: a random global subset on FisherTune's density schedule (the same code path, random scores);
   - ``fisher``: FisherTune with lambda = 0 (ranked by F(x) alone);
   - ``fishertune``: FisherTune, closed-form DR-FIM (stage 2 on ``calibration_steps`` source batches);
   - ``fishertune-variational``: FisherTune with the variational estimator.

   Every method gets the same steps, batches, learning rates (``head_lr`` for the head, ``backbone_lr`` for
   whatever backbone weights train; ``lora_lr`` for LoRA's factors, as LoRA needs a larger rate) and, when
   ``augment`` is on, the same feature-statistics shift as augmentation in stage 3 (the paper adds it to
   its baselines "for fairness").
   The decoder (``TokenSegmenter.decode_head``) is a linear read-out of the LAST block's tokens. The last block
   was shaped by the 4-class pre-training, so the 7-class task needs the backbone to adapt: with the frozen
   backbone the source mIoU stays well below what tuning reaches (a benchmark in which freezing is nearly
   enough would reward learning less, see the README).
4. evaluation: mIoU (7 classes) on the source domain and on each unseen domain, after the warm-up, every
   ``eval_every`` steps (the source/unseen curve) and at the end.

The learning rates are larger than the paper's (1e-4/1e-5 for 40k steps) because the budget is a few hundred
steps; they are the same for every method.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..naming import ROLES, block_role
from .foundation import TokenSegmenter, load_foundation, progress_bar
from .metric import IoUAccumulator
from .synthetic import CLASSES, DOMAINS, synthetic_dataset

METHODS = ("frozen", "full", "lora", "random", "fisher", "fishertune", "fishertune-variational")
SOURCE = DOMAINS[0]
UNSEEN = DOMAINS[1:]
PERTURB_MODULE = "backbone.embeddings.patch_embeddings"
EVAL_OFFSET = 1_000_000  # evaluation scenes never overlap the training ones


@dataclass
class Budget:
    train_images: int = 512
    eval_images: int = 64
    batch_size: int = 16
    warmup_steps: int = 150
    calibration_steps: int = 25
    tuning_steps: int = 300
    eval_every: int = 75
    head_lr: float = 1e-3
    backbone_lr: float = 1e-4
    lora_lr: float = 1e-3
    lora_rank: int = 8
    density_min: float = 0.01
    density_max: float = 0.15
    augment: bool = True
    perturb_strength: float = 1.0
    feature_blocks: tuple = (6,)
    head_width: int | None = None

    def __post_init__(self):
        for name in ("train_images", "eval_images", "batch_size", "calibration_steps", "tuning_steps", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Budget.{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"Budget.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.batch_size > self.train_images:
            raise ValueError(f"Budget.batch_size ({self.batch_size}) exceeds train_images ({self.train_images})")
        for name in ("head_lr", "backbone_lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Budget.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.density_min <= self.density_max <= 1:
            raise ValueError(f"need 0 < density_min <= density_max <= 1, got {self.density_min}, {self.density_max}")

    @classmethod
    def reduced(cls) -> Budget:
        """A budget for tests and the notebook: a few steps of every stage."""
        return cls(
            train_images=32,
            eval_images=8,
            batch_size=8,
            warmup_steps=4,
            calibration_steps=2,
            tuning_steps=6,
            eval_every=3,
        )


def make_data(seed: int, budget: Budget):
    train = synthetic_dataset(SOURCE, budget.train_images, seed=seed)
    evaluation = {d: synthetic_dataset(d, budget.eval_images, seed=seed, offset=EVAL_OFFSET) for d in DOMAINS}
    return train, evaluation


class _Batches:
    """Endless shuffled source batches with random horizontal flips, seeded."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.images = dataset["pixel_values"]
        self.labels = dataset["labels"]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(self.images), generator=self.generator), 0

    def __next__(self) -> dict:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.images), generator=self.generator), 0
        pick = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        x, y = self.images[pick].clone(), self.labels[pick].clone()
        flip = torch.rand(len(pick), generator=self.generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        return {"pixel_values": x, "labels": y}


@torch.no_grad()
def evaluate(model, evaluation: dict, batch_size: int = 64) -> dict[str, float]:
    """mIoU per domain, plus ``unseen`` (the mean over the unseen domains).

    Whole 64x64 images in batches: ``evaluation.evaluate_domains`` implements the real protocol (keep-ratio
    resize, 512 windows) one image at a time, which would make the curve points here many times slower."""
    was_training = model.training
    model.eval()
    result = {}
    for domain, dataset in evaluation.items():
        accumulator = IoUAccumulator(len(CLASSES))
        images, labels = dataset["pixel_values"], dataset["labels"]
        for i in range(0, len(images), batch_size):
            logits = model(pixel_values=images[i : i + batch_size]).logits
            accumulator.update(logits.argmax(1), labels[i : i + batch_size])
        result[domain] = float(accumulator.compute()["mean_iou"])
    result["unseen"] = float(np.mean([result[d] for d in evaluation if d != SOURCE]))
    model.train(was_training)
    return result


def warmup(seed: int, budget: Budget, data=None, backbone_path: str | None = None, progress: bool = True):
    """Stage 1: train the head on the frozen backbone. Returns (model, curve point after the warm-up)."""
    train, evaluation = data or make_data(seed, budget)
    torch.manual_seed(seed)
    model = TokenSegmenter(
        load_foundation(backbone_path),
        num_labels=len(CLASSES),
        feature_blocks=budget.feature_blocks,
        head_width=budget.head_width,
    )
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.decode_head.parameters(), lr=budget.head_lr, weight_decay=0.0)
    batches = _Batches(train, budget.batch_size, seed)
    bar = progress_bar(budget.warmup_steps, f"warm-up (seed {seed})", progress)
    model.train()
    for _ in range(budget.warmup_steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model, evaluate(model, evaluation)


def fishertune_config(method: str, budget: Budget, seed: int, **overrides):
    """The FisherTuneConfig of a FisherTune-family method on this budget; ``overrides`` replace any field."""
    from peft_fishertune import FisherTuneConfig

    from .model import backbone_target_modules

    fields = dict(
        target_modules=backbone_target_modules(),
        modules_to_save=["decode_head"],
        density_min=budget.density_min,
        density_max=budget.density_max,
        estimator="variational" if method == "fishertune-variational" else "closed_form",
        lam=0.0 if method == "fisher" else 0.5,
        perturb_module=PERTURB_MODULE,
        perturb_strength=budget.perturb_strength,
        warmup_steps=0,
        calibration_steps=budget.calibration_steps,
        tuning_steps=budget.tuning_steps,
        seed=seed,
    )
    return FisherTuneConfig(**{**fields, **overrides})


def run_method(
    method: str,
    seed: int,
    budget: Budget,
    warm=None,
    data=None,
    progress: bool = True,
    backbone_path: str | None = None,
    overrides: dict | None = None,
    label: str | None = None,
    scores=None,
) -> dict:
    """Stages 2-3 of one method from the seed's warm-up; returns its final mIoU per domain, curve and timing.

    ``overrides``: FisherTuneConfig fields for the FisherTune-family methods (e.g. ``{"perturb_module": None}``);
    ``label``: the name the result carries (default: the method); ``scores``: a calibration of this seed's
    warmed-up model (``calibrate_warm``) for the FisherTune-family methods, ranked under the run's gamma, tau,
    lambda, eps and Fisher scale instead of calibrating again (the same selection: stage 2 runs on the same
    batches either way)."""
    from peft import LoraConfig, get_peft_model

    from .model import backbone_target_modules

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
    train, evaluation = data or make_data(seed, budget)
    if warm is None:
        warm = warmup(seed, budget, (train, evaluation), backbone_path, progress)
    start = time.perf_counter()
    model = copy.deepcopy(warm[0])
    torch.manual_seed(seed + 1)
    stages = None
    if method in ("frozen", "full"):
        model.backbone.requires_grad_(method == "full")
        trainable = model
    elif method == "lora":
        config = LoraConfig(
            r=budget.lora_rank,
            lora_alpha=2 * budget.lora_rank,
            target_modules=backbone_target_modules(),
            modules_to_save=["decode_head"],
        )
        trainable = get_peft_model(model, config)
    else:
        from peft_fishertune import FisherTuneStages
        from peft_fishertune.selection import initial_scores

        trainable = get_peft_model(model, fishertune_config(method, budget, seed, **(overrides or {})))
        loader = calibration_loader(train, budget, seed + 2)
        stages = FisherTuneStages(trainable, calibration_data=loader, calibration_kwargs={"progress": progress})
        if method == "random":
            weights = {name: layer.get_base_layer().weight for name, layer in trainable.base_model._layers().items()}
            trainable.base_model.select(initial_scores(weights, "random", seed + 3))
        elif scores is not None:
            config = trainable.peft_config["default"]
            stages.scores = scores.rescored(
                **{k: getattr(config, k) for k in ("gamma", "tau", "lam", "eps")}
                | {"fisher_scale": config.fisher_scale}
            )
            trainable.base_model.select(stages.scores)
    optimizer = _optimizer(trainable, method, budget)
    if stages is not None:
        stages.step(0, optimizer)  # calibration and selection (or the random selection's first density)
    calibrated = time.perf_counter()
    shift = _StageShift(trainable, budget, seed) if budget.augment else None
    batches = _Batches(train, budget.batch_size, seed + 4)
    curve = [{"step": 0, **warm[1]}]
    bar = progress_bar(budget.tuning_steps, f"{method} (seed {seed})", progress)
    trainable.train()
    for step in range(budget.tuning_steps):
        if shift is not None:
            shift.step = step
        loss = trainable(**next(batches)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method} (seed {seed}): non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stages is not None:
            stages.step(step + 1, optimizer)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % budget.eval_every == 0 or step + 1 == budget.tuning_steps:
            curve.append({"step": step + 1, **evaluate(trainable, evaluation)})
    bar.close()
    if shift is not None:
        shift.remove()
    result = {
        "method": label or method,
        "seed": seed,
        "final": curve[-1],
        "curve": curve,
        "trainable_backbone": _trainable_backbone(trainable, method),
        "seconds": time.perf_counter() - start,
        "calibration_seconds": calibrated - start,
    }
    if stages is not None:
        result["selected_fraction"] = selected_fraction(trainable)
        result["scores"] = stages.scores
        stages.close()
    return result | {"model": trainable}


def calibration_loader(train, budget: Budget, seed: int) -> DataLoader:
    """The source batches of stage 2 for a seed (shuffled by a generator of its own)."""
    return DataLoader(train, batch_size=budget.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def calibrate_warm(warm, train, budget: Budget, seed: int, calibration_seed: int | None = None, **overrides):
    """Stage 2 alone on a copy of the seed's warmed-up model: the scores ``run_method`` would compute.

    ``calibration_seed`` (default: the run's) picks other batches and other shift draws, for a second,
    independent calibration of the same model."""
    from peft import get_peft_model

    from peft_fishertune import calibrate

    other = seed if calibration_seed is None else calibration_seed
    model = get_peft_model(copy.deepcopy(warm[0]), fishertune_config("fishertune", budget, other, **overrides))
    return calibrate(model, calibration_loader(train, budget, other + 2), budget.calibration_steps, progress=False)


def _optimizer(model, method: str, budget: Budget):
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if "decode_head" in name else backbone).append(param)
    lr = budget.lora_lr if method == "lora" else budget.backbone_lr
    groups = [{"params": head, "lr": budget.head_lr}] + ([{"params": backbone, "lr": lr}] if backbone else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


class _StageShift:
    """The DSU-style shift on the patch embeddings, a new draw every step (training only)."""

    def __init__(self, model, budget: Budget, seed: int):
        from peft_fishertune import DomainShift

        root = model.base_model.model if hasattr(model, "base_model") else model
        self.step = 0
        shift = DomainShift(budget.perturb_strength, seed + 5)
        self.handle = shift.attach(root, PERTURB_MODULE, lambda: shift.draw(self.step) if root.training else None)

    def remove(self):
        self.handle.remove()


def _trainable_backbone(model, method: str) -> int:
    """Backbone weights that moved or could move: all of them (full), LoRA's factors, or FisherTune's active
    entries at the end."""
    if method == "frozen":
        return 0
    if method == "full":
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone."))
    if method == "lora":
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return sum(model.base_model.active_counts().values())


def selected_fraction(model) -> np.ndarray:
    """(blocks, 6) fraction of each block's q, k, v, o, fc1, fc2 weight entries active now."""
    layers = model.base_model._layers()
    counts = model.base_model.active_counts()
    fractions = {name: count / layers[name].get_base_layer().weight.numel() for name, count in counts.items()}
    return block_matrix(fractions, model.base_model.model.backbone.config.num_hidden_layers)


def block_matrix(values: dict[str, float], blocks: int) -> np.ndarray:
    """(blocks, 6) table of a number per candidate module, by block and q, k, v, o, fc1, fc2."""
    table = np.zeros((blocks, len(ROLES)))
    for name, value in values.items():
        place = block_role(name)
        if place is None:
            raise ValueError(f"{name!r} is not a q, k, v, o, fc1 or fc2 linear of a backbone block")
        table[place[0], ROLES.index(place[1])] = value
    return table


def summarise(results: list[dict]) -> dict:
    """Mean and std over seeds of each method's final source and unseen mIoU (and each domain), and the unseen
    mIoU at a matched source mIoU: the lowest final source mIoU among the methods that tune the backbone, with
    each run's unseen score interpolated along its source/unseen curve where it first reaches that level."""
    methods = list(dict.fromkeys(r["method"] for r in results))  # in the order they ran
    tuned = [m for m in methods if m != "frozen"]
    by = {m: [r for r in results if r["method"] == m] for m in methods}
    level = min((np.mean([r["final"][SOURCE] for r in by[m]]) for m in tuned), default=float("nan"))
    table = {}
    for m in methods:
        runs = by[m]
        row = {key: _mean_std([r["final"][key] for r in runs]) for key in (*DOMAINS, "unseen")}
        matched = [_unseen_at(r["curve"], level) for r in runs]
        row["unseen_at_matched_source"] = _mean_std([v for v in matched if v is not None])
        row["runs_reaching_matched_source"] = sum(v is not None for v in matched)
        row["trainable_backbone"] = int(np.mean([r["trainable_backbone"] for r in runs]))
        row["seconds"] = float(np.mean([r["seconds"] for r in runs]))
        row["seeds"] = len(runs)
        table[m] = row
    return {"matched_source_level": float(level), "methods": table}


def _mean_std(values) -> list[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def _unseen_at(curve: list[dict], level: float):
    previous = None
    for point in curve:
        if point[SOURCE] >= level:
            if previous is None:
                return point["unseen"]
            span = point[SOURCE] - previous[SOURCE]
            t = (level - previous[SOURCE]) / span if span > 0 else 1.0
            return previous["unseen"] + t * (point["unseen"] - previous["unseen"])
        previous = point
    return None


def markdown_table(summary: dict) -> str:
    def cell(pair):
        return "n/a" if math.isnan(pair[0]) else f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"

    level = summary["matched_source_level"]
    lines = [
        f"| method | backbone weights trained | source | unseen (mean of {len(UNSEEN)}) | "
        + " | ".join(UNSEEN)
        + f" | unseen at source = {100 * level:.1f} | s / run |",
        "|---|---|---|---|" + "---|" * len(UNSEEN) + "---|---|",
    ]
    for method, row in summary["methods"].items():
        matched = cell(row["unseen_at_matched_source"])
        if row["runs_reaching_matched_source"] < row["seeds"]:
            matched += f" ({row['runs_reaching_matched_source']}/{row['seeds']} runs)"
        lines.append(
            f"| {method} | {row['trainable_backbone']:,} | {cell(row[SOURCE])} | {cell(row['unseen'])} | "
            + " | ".join(cell(row[d]) for d in UNSEEN)
            + f" | {matched} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)
