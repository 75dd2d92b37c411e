"""``fishertune-seg study``: the paper's sensitivity studies on the embedded benchmark, in one command.

Every row is FisherTune (closed form) with some FisherTuneConfig fields changed, or a reference method, run by
``embedded.run_method`` on the benchmark's budget from the seed's shared warm-up. The DR-FIM calibration runs
once per seed: lambda, gamma, tau, eps, the Fisher scale and the allocation only change how F(x), F(x') and w
are ranked, so every such row reuses those scores (``Scores.rescored``). Rows that change the training itself
(schedule, re-calibration, density) train from the same scores too; re-calibrations during tuning run anew.

Sections (the paper's figure or table in brackets):

- ``references``: frozen backbone, full fine-tuning, LoRA and random sparse tuning on FisherTune's schedule;
- ``lambda`` [Table 1]: lambda in 0, 0.1, 0.3, 0.5, 0.7, 0.9, 1;
- ``scale``: the domain term read in units of the median F (default) or in the loss's units (literal);
- ``allocation`` (ours): one global top-k (the paper's) or the same density in every matrix, at lambda 0, 0.5, 1;
- ``gamma_tau`` [Fig. 3]: gamma, tau in 0.005, 0.01, 0.02, and 0.1 for each as the too-large value;
- ``schedule`` [Table 2]: exponential, linear, cosine, and re-calibration every k tuning steps (Alter-2K/4K/6K
  of the paper's 28k tuning steps, scaled to ours);
- ``density`` [Fig. 2]: density_max in 1, 5, 10, 15, 20, 30 %, FisherTune and random sparse.

``references``, ``lambda``, ``scale`` and ``allocation`` run on every seed; the other sections on the first
seed only (their tables say so). Unseen mIoU is also read at a matched source level: the lowest final source
mIoU of the random sparse runs, so that every random run reaches it; a row's "vs random" is the paired
difference to random sparse tuning of the same seed (same warm-up, same data).

Writes ``study.json`` (every run and curve), ``study.md`` (the tables, beside the paper's numbers) and
``study.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import embedded
from .embedded import SOURCE, Budget

SECTIONS = ("references", "lambda", "scale", "allocation", "gamma_tau", "schedule", "density", "calibration")
PAPER_SECTIONS = SECTIONS[:-1]  # the default: the paper's studies and ours that reuse one calibration per seed
ALL_SEEDS = ("references", "lambda", "scale", "allocation", "calibration")
CALIBRATION_STEPS = (400,)  # stage 2 longer than the budget's 25 batches (the paper: 2,000)
LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
GAMMA_TAU = (0.005, 0.01, 0.02)
TOO_LARGE = 0.1
DENSITIES = (0.01, 0.05, 0.10, 0.15, 0.20, 0.30)
ALTERNATE = (2_000, 4_000, 6_000)  # the paper's Alter-2K/4K/6K ...
PAPER_TUNING_STEPS = 28_000  # ... of its T3
# The paper's numbers (supplementary material): Table 1 (CS -> ACDC, DINOv2) and Table 2 (DINOv2, CS -> BDD and
# CS -> ACDC). Fig. 2 and Fig. 3 give no numbers in the text; their findings are quoted in the tables' notes.
PAPER_LAMBDA = {0.0: 71.4, 0.1: 72.8, 0.3: 74.9, 0.5: 77.5, 0.7: 77.0, 0.9: 76.6, 1.0: 76.1}
PAPER_SCHEDULE = {
    "exponential": (67.7, 77.5),
    "linear": (67.6, 77.3),
    "cosine": (66.1, 76.2),
    "alter-2k": (65.2, 76.1),
    "alter-4k": (65.4, 76.2),
    "alter-6k": (65.9, 76.8),
}
DEFAULTS = {
    "lam": 0.5,
    "gamma": 0.01,
    "tau": 0.01,
    "fisher_scale": "median",
    "allocation": "global",
    "schedule": "exponential",
    "recalibrate_every": 0,
}
# The fields that matter to each method; the rest of a row's config is ignored for it (and for sharing runs).
FIELDS = {"random": ("density_max", "schedule"), "fishertune": (*DEFAULTS, "density_max")}


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    method: str = "fishertune"
    config: dict = field(default_factory=dict)
    first_seed_only: bool = False  # a row of an every-seed section that runs on the first seed alone
    reference: Row | None = None  # what "vs random" pairs it with; None: random sparse tuning at the defaults

    def key(self, budget: Budget) -> tuple:
        """What decides the run: rows with equal keys share one run per seed."""
        if self.method not in FIELDS:
            return (self.method,)
        full = {**DEFAULTS, "density_max": budget.density_max, **self.config}
        key = (self.method, *((name, full[name]) for name in FIELDS[self.method]))
        steps = self.config.get("calibration_steps", budget.calibration_steps)
        return key + ((("calibration_steps", steps),) if steps != budget.calibration_steps else ())


def study_rows(budget: Budget, sections=SECTIONS) -> list[Row]:
    rows = []
    if "references" in sections:
        rows += [Row("references", m, m) for m in ("frozen", "full", "lora", "random")]
        rows += [Row("references", "FisherTune (defaults)")]
    if "lambda" in sections:
        rows += [Row("lambda", f"λ = {lam:g}", config={"lam": lam}) for lam in LAMBDAS]
    if "scale" in sections:
        rows += [
            Row("scale", "median (default), λ = 0.5"),
            Row("scale", "loss (literal), λ = 0.5", config={"fisher_scale": "loss"}),
            Row("scale", "loss (literal), λ = 1", config={"fisher_scale": "loss", "lam": 1.0}, first_seed_only=True),
        ]
    if "allocation" in sections:
        for lam in (0.0, 0.5, 1.0):
            for allocation in ("global", "per_matrix"):
                rows.append(
                    Row("allocation", f"{allocation}, λ = {lam:g}", config={"allocation": allocation, "lam": lam})
                )
    if "gamma_tau" in sections:
        pairs = [(g, t) for g in GAMMA_TAU for t in GAMMA_TAU] + [(TOO_LARGE, 0.01), (0.01, TOO_LARGE)]
        rows += [Row("gamma_tau", f"γ = {g:g}, τ = {t:g}", config={"gamma": g, "tau": t}) for g, t in pairs]
    if "schedule" in sections:
        rows += [Row("schedule", name, config={"schedule": name}) for name in ("exponential", "linear", "cosine")]
        for steps in ALTERNATE:
            every = max(1, round(budget.tuning_steps * steps / PAPER_TUNING_STEPS))
            rows.append(Row("schedule", f"alter-{steps // 1000}k", config={"recalibrate_every": every}))
    if "density" in sections:
        for density in DENSITIES:
            random = Row("density", f"random, {density:.0%}", "random", {"density_max": density})
            rows.append(Row("density", f"FisherTune, {density:.0%}", config={"density_max": density}, reference=random))
            rows.append(replace(random, reference=random))
    if "calibration" in sections:
        for steps in (budget.calibration_steps, *CALIBRATION_STEPS):
            for allocation, lam in (("global", 0.5), ("global", 1.0), ("per_matrix", 1.0)):
                config = {"calibration_steps": steps, "allocation": allocation, "lam": lam}
                rows.append(Row("calibration", f"{steps} batches, {allocation}, λ = {lam:g}", config=config))
    if not any(row.method == "random" and not row.config for row in rows):
        rows.append(Row("references", "random", "random"))  # the reference of every comparison
    return rows


def run_study(
    out: str | os.PathLike = "fishertune_study",
    budget: Budget | None = None,
    seeds=(0, 1, 2),
    sections=PAPER_SECTIONS,
    progress: bool = True,
    backbone_path: str | None = None,
    workers: int = 1,
) -> dict:
    """Run the study; returns the record written to ``study.json``.

    ``workers`` > 1 runs the (seed, configuration) runs on that many processes of one thread each (this
    benchmark's small model trains almost as fast on one thread as on two). Each seed's warm-up and calibration
    and every finished run are kept under ``out/.study-cache``, so an interrupted study resumes where it stopped
    (the cache is cleared when the budget or the backbone differ).
    """
    from .demo import _begin

    out, budget, start = _begin(out, budget)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown study sections {sorted(unknown)}; sections: {SECTIONS}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    seeds = list(seeds)
    rows = study_rows(budget, sections)
    cache = _cache(out, budget, backbone_path)
    tasks = [
        (seed, key)
        for i, seed in enumerate(seeds)
        for key in dict.fromkeys(row.key(budget) for row in rows if i == 0 or _every_seed(row, rows, budget))
    ]
    print(f"{len(tasks)} runs on {workers} process(es); cache: {cache}", flush=True)
    with _pool(workers) as pool:
        lengths = sorted({dict(key[1:]).get("calibration_steps", budget.calibration_steps) for _, key in tasks})
        first = [(cache, seed, budget, backbone_path, budget.calibration_steps) for seed in seeds]
        more = [
            (cache, seed, budget, backbone_path, n) for n in lengths if n != budget.calibration_steps for seed in seeds
        ]
        diagnostics = list(_map(pool, _prepare_seed, first)) + list(_map(pool, _prepare_seed, more))
        arguments = [(cache, seed, key, budget, backbone_path) for seed, key in tasks]
        runs = dict(zip(tasks, _map(pool, _run_task, arguments, progress=progress)))
    record = {
        "budget": asdict(budget),
        "seeds": seeds,
        "sections": list(sections),
        "rows": [_row_record(row, budget) for row in rows],
        "runs": [run | {"key": _describe(key)} for (_, key), run in runs.items()],
        "diagnostics": diagnostics,
        "workers": workers,
        "torch_threads": 1 if workers > 1 else torch.get_num_threads(),
        "reference": _describe(Row("references", "random", "random").key(budget)),
    }
    record["summary"] = summarise_study(record)
    record["seconds"] = time.perf_counter() - start
    (out / "study.json").write_text(json.dumps(record, indent=1))
    text = markdown(record)
    (out / "study.md").write_text(text)
    path = plot_study(record, out / "study.png")
    print("\n" + text)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {path}; took {record['seconds'] / 60:.1f} min")
    return record


def _row_record(row: Row, budget: Budget) -> dict:
    reference = _describe(row.reference.key(budget)) if row.reference else None
    return {
        "section": row.section,
        "label": row.label,
        "method": row.method,
        "config": row.config,
        "key": _describe(row.key(budget)),
        "reference": reference,
    }


# ------------------------------------------------------------------------------------------------ running
def _cache(out: Path, budget: Budget, backbone_path: str | None) -> Path:
    """``out/.study-cache``, emptied first when it was made for another budget or backbone."""
    cache = out / ".study-cache"
    settings = json.dumps({"budget": asdict(budget), "backbone": backbone_path}, sort_keys=True)
    marker = cache / "settings.json"
    if cache.exists() and (not marker.is_file() or marker.read_text() != settings):
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    marker.write_text(settings)
    return cache


@contextlib.contextmanager
def _pool(workers: int):
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads are running
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield pool


def _map(pool, function, arguments: list[tuple], progress: bool = False):
    """``function(*a)`` for each tuple, in order; on the pool's processes when there is a pool."""
    if pool is None:
        for a in arguments:
            yield function(*a, progress=progress)
        return
    futures = [pool.submit(function, *a) for a in arguments]
    for future in futures:
        yield future.result()


def _calibration_files(folder: Path, steps: int, budget: Budget) -> tuple[Path, Path]:
    """(scores, diagnostics) of one calibration length; the budget's own length has the plain names."""
    tag = "" if steps == budget.calibration_steps else f"_T{steps}"
    return folder / f"scores{tag}.safetensors", folder / f"diagnostics{tag}.json"


def _prepare_seed(cache: Path, seed: int, budget: Budget, backbone_path, steps: int, progress: bool = False) -> dict:
    """The seed's warm-up (once) and a calibration of ``steps`` batches with a second, independent one, stored
    in the cache; returns the score diagnostics."""
    folder = cache / f"seed{seed}"
    scores_file, done = _calibration_files(folder, steps, budget)
    if done.is_file():
        return json.loads(done.read_text())
    data, warm = _warm(cache, seed, budget, backbone_path, progress)
    length = replace(budget, calibration_steps=steps)
    scores = embedded.calibrate_warm(warm, data[0], length, seed)
    second = embedded.calibrate_warm(warm, data[0], length, seed, calibration_seed=seed + 1000)
    scores.save(scores_file)
    diagnostics = score_diagnostics(scores, second, budget.density_max) | {"seed": seed, "calibration_steps": steps}
    done.write_text(json.dumps(diagnostics))
    print(f"seed {seed}: calibration of {steps} batches done", flush=True)
    return diagnostics


def _warm(cache: Path, seed: int, budget: Budget, backbone_path, progress: bool = False):
    """(data, (model, curve point)) of the seed's warm-up: trained and stored once, loaded afterwards."""
    from .foundation import TokenSegmenter, load_foundation
    from .synthetic import CLASSES

    path = cache / f"seed{seed}" / "warm.pt"
    data = embedded.make_data(seed, budget)
    if not path.is_file():
        model, point = embedded.warmup(seed, budget, data, backbone_path, progress)
        path.parent.mkdir(exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "point": point}, path)
    stored = torch.load(path, weights_only=True)
    model = TokenSegmenter(load_foundation(backbone_path), len(CLASSES), budget.feature_blocks, budget.head_width)
    model.load_state_dict(stored["state_dict"])
    model.backbone.requires_grad_(False)
    return data, (model, stored["point"])


_SEEDS: dict = {}  # (cache, seed) -> (data, warm), per process
_SCORES: dict = {}  # (cache, seed, calibration steps) -> Scores, per process


def _seed_state(cache: Path, seed: int, budget: Budget, backbone_path, steps: int):
    from peft_fishertune import Scores

    if (cache, seed) not in _SEEDS:
        _SEEDS[(cache, seed)] = _warm(cache, seed, budget, backbone_path)
    if (cache, seed, steps) not in _SCORES:
        _SCORES[(cache, seed, steps)] = Scores.load(_calibration_files(cache / f"seed{seed}", steps, budget)[0])
    return (*_SEEDS[(cache, seed)], _SCORES[(cache, seed, steps)])


def _run_task(cache: Path, seed: int, key: tuple, budget: Budget, backbone_path, progress: bool = False) -> dict:
    """One run of the study, from the cache when it finished before."""
    name = hashlib.sha1(_describe(key).encode()).hexdigest()[:16]
    path = cache / f"seed{seed}" / "runs" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    method, overrides = key[0], dict(key[1:])
    steps = overrides.pop("calibration_steps", budget.calibration_steps)
    data, warm, scores = _seed_state(cache, seed, budget, backbone_path, steps)
    run = embedded.run_method(
        method, seed, budget, warm, data, progress, backbone_path, overrides=overrides, scores=scores
    )
    for field_name in ("model", "scores", "selected_fraction"):
        run.pop(field_name, None)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(run))
    final = run["final"]
    print(
        f"seed {seed} {_short(key, budget):42s} source {100 * final[SOURCE]:5.1f}  unseen {100 * final['unseen']:5.1f}"
        f"  ({run['seconds']:.0f} s)",
        flush=True,
    )
    return run


def _describe(key: tuple) -> str:
    return key[0] + "".join(f" {name}={value}" for name, value in key[1:])


def _every_seed(row: Row, rows: list[Row], budget: Budget) -> bool:
    """Whether ``row``'s run is needed on every seed: some row with its key runs on every seed."""
    key = row.key(budget)
    return any(r.key(budget) == key and r.section in ALL_SEEDS and not r.first_seed_only for r in rows)


def _short(key: tuple, budget: Budget) -> str:
    """The method and the settings of ``key`` that differ from the defaults."""
    defaults = {**DEFAULTS, "density_max": budget.density_max}
    return key[0] + "".join(f" {name}={value}" for name, value in key[1:] if defaults.get(name) != value)


def score_diagnostics(scores, second, density: float) -> dict:
    """What the domain term does to the ranking, under both Fisher scales, and how much of it is noise: the
    agreement of two calibrations of the same model on other batches and other shift draws."""
    result = {}
    for scale in ("median", "loss"):
        summary = scores.rescored(fisher_scale=scale).summary(density)
        result[scale] = {k: v for k, v in summary.items() if k != "modules"}
    from peft_fishertune.scores import _spearman

    def flat(s, kind):
        return torch.cat([t.reshape(-1).double() for t in getattr(s, kind).values()])

    a, b = scores.rescored(fisher_scale="median"), second.rescored(fisher_scale="median")
    k = max(1, round(density * flat(a, "drf").numel()))
    agreement = {}
    for kind in ("fisher", "domain", "drf"):
        x, y = flat(a, kind), flat(b, kind)
        top_x, top_y = torch.topk(x, k).indices, torch.topk(y, k).indices
        agreement[kind] = {
            "spearman": _spearman(x, y),
            "top_overlap": float(torch.isin(top_x, top_y).double().mean()),
        }
    result["between_calibrations"] = agreement
    return result


# ------------------------------------------------------------------------------------------------ summary
def summarise_study(record: dict) -> dict:
    """Per row: mean ± std of final source and unseen mIoU, unseen at the matched source level, and the paired
    difference to random sparse tuning of the same seed ("vs random"): both runs' unseen mIoU read where their
    source/unseen curves reach the lower of the two final source scores, so that neither is credited for
    fitting the source less. A density row is paired with random sparse tuning of the same density.

    Rows of the one-seed sections are summarised on the first seed only, the default row among them, so that
    every table compares like with like."""
    by_key: dict[str, dict[int, dict]] = {}
    for run in record["runs"]:
        by_key.setdefault(run["key"], {})[run["seed"]] = run
    random_runs = by_key[record["reference"]]
    level = min(run["final"][SOURCE] for run in random_runs.values())
    first = record["seeds"][0]
    rows = []
    for row in record["rows"]:
        runs = by_key.get(row["key"], {})
        if row["section"] not in ALL_SEEDS:
            runs = {seed: run for seed, run in runs.items() if seed == first}
        references = by_key.get(row.get("reference") or record["reference"], {})
        matched = {seed: embedded._unseen_at(run["curve"], level) for seed, run in runs.items()}
        rows.append(
            {
                "section": row["section"],
                "label": row["label"],
                "key": row["key"],
                "seeds": sorted(runs),
                "source": embedded._mean_std([r["final"][SOURCE] for r in runs.values()]),
                "unseen": embedded._mean_std([r["final"]["unseen"] for r in runs.values()]),
                "palette": embedded._mean_std([r["final"]["palette"] for r in runs.values()]),
                "matched": embedded._mean_std([v for v in matched.values() if v is not None]),
                "reached": sum(v is not None for v in matched.values()),
                "vs_random": embedded._mean_std(
                    [_paired(run, references[seed]) for seed, run in runs.items() if seed in references]
                ),
            }
        )
    return {"matched_source_level": level, "rows": rows}


def _paired(run: dict, reference: dict) -> float:
    """Unseen mIoU of ``run`` minus that of ``reference`` where both curves reach the lower final source score."""
    level = min(run["final"][SOURCE], reference["final"][SOURCE])
    return embedded._unseen_at(run["curve"], level) - embedded._unseen_at(reference["curve"], level)


def _pct(pair, signed=False) -> str:
    mean, std = pair
    if mean is None or math.isnan(mean):
        return "n/a"
    mean = round(100 * mean, 1) + 0.0  # no "-0.0"
    sign = "+" if signed and mean >= 0 else ""
    return f"{sign}{mean:.1f} ± {100 * std:.1f}"


def _table(rows: list[dict], extra: dict[str, callable] | None = None) -> list[str]:
    extra = extra or {}
    head = ["row", *extra, "seeds", "source", "unseen", "palette", "unseen at matched source", "vs random (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        matched = _pct(row["matched"])
        if row["reached"] < len(row["seeds"]):
            matched += f" ({row['reached']}/{len(row['seeds'])} runs)"
        cells = [
            row["label"],
            *(f(row) for f in extra.values()),
            str(len(row["seeds"])),
            _pct(row["source"]),
            _pct(row["unseen"]),
            _pct(row["palette"]),
            matched,
            _pct(row["vs_random"], signed=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(record: dict) -> str:
    summary = record["summary"]
    level = 100 * summary["matched_source_level"]
    seeds = record["seeds"]
    budget = record["budget"]
    lines = [
        f"# FisherTune sensitivity study on the embedded benchmark (seeds {seeds})",
        "",
        f"mIoU %, mean ± std over the seeds a row ran on. Unseen = the mean of 5 unseen domains. Matched source "
        f"level: {level:.1f} (the lowest final source mIoU of the random sparse runs). 'vs random': the paired "
        f"difference to random sparse tuning of the same seed (same warm-up, same data), read where both runs' "
        f"source/unseen curves reach the lower of their two final source scores. Budget: "
        f"{budget['tuning_steps']} tuning steps, {budget['calibration_steps']} calibration batches, density "
        f"{budget['density_min']:.0%} -> {budget['density_max']:.0%}.",
    ]
    by_section: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        by_section.setdefault(row["section"], []).append(row)
    notes = {
        "references": ("## References", None),
        "lambda": (
            "## λ (supplementary Table 1)",
            {"paper CS→ACDC (DINOv2)": lambda r: f"{PAPER_LAMBDA.get(_lam(r['label']), '')}"},
        ),
        "scale": ("## The Fisher scale of the domain term (ours)", None),
        "allocation": ("## Allocation: global top-k (paper) or the same density in every matrix (ours)", None),
        "gamma_tau": (
            "## γ and τ (supplementary Fig. 3; the paper: 0.005-0.02 acceptable, too-large γ −1.7, too-large τ "
            "−1.3 mIoU)",
            {"floor γτ⁻² (x median F)": lambda r: f"{_floor(r['key']):g}"},
        ),
        "schedule": (
            "## Schedules and re-calibration (supplementary Table 2)",
            {"paper CS→BDD / CS→ACDC": lambda r: "{} / {}".format(*PAPER_SCHEDULE.get(r["label"], ("", "")))},
        ),
        "density": (
            "## δmax (supplementary Fig. 2; the paper: ~3M weights above frozen, ~15M above Rein, ~30M no "
            "further gain)",
            None,
        ),
        "calibration": (
            f"## A longer stage 2 (ours; the budget's {budget['calibration_steps']} batches, the paper's 2,000)",
            None,
        ),
    }
    for section in SECTIONS:
        if section not in by_section:
            continue
        title, extra = notes[section]
        lines += ["", title, "", *_table(by_section[section], extra)]
    steps = budget["calibration_steps"]
    lines += [
        "",
        "## What the domain term does to the ranking (per seed, top δmax)",
        "",
        *_diagnostics_table(record, steps),
    ]
    return "\n".join(lines) + "\n"


def _lam(label: str) -> float | None:
    try:
        return float(label.split("=")[1])
    except (IndexError, ValueError):
        return None


def _floor(key: str) -> float:
    """gamma * tau^-2 over its value at the defaults: where the floor sits, in multiples of the median F."""
    fields = dict(item.split("=") for item in key.split()[1:])
    return float(fields["gamma"]) * float(fields["tau"]) ** -2 / (0.01 * 0.01**-2)


def _diagnostics_table(record: dict, steps: int) -> list[str]:
    lines = [
        "| seed | batches | scale | Spearman(F, D) | top by F kept by DR-FIM | top by F kept by D | above the floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in record["diagnostics"]:
        for scale in ("median", "loss"):
            s = d[scale]
            cells = [d["seed"], d.get("calibration_steps", steps), scale, f"{s['spearman_fisher_domain']:.3f}"]
            cells += [f"{s[k]:.1%}" for k in ("overlap_fisher_drf", "overlap_fisher_domain", "above_floor")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Two calibrations of the same warmed-up model on other batches and shift draws (median scale):",
        "",
        "| seed | batches | Spearman F | Spearman D | Spearman DR-FIM | top kept: F | top kept: D | top kept: DR-FIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in record["diagnostics"]:
        a = d["between_calibrations"]
        kinds = ("fisher", "domain", "drf")
        cells = [d["seed"], d.get("calibration_steps", steps)]
        cells += [f"{a[k]['spearman']:.3f}" for k in kinds] + [f"{a[k]['top_overlap']:.1%}" for k in kinds]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ figure
def plot_study(record: dict, path) -> Path:
    """Four panels: unseen mIoU at the matched source level against lambda, the floor gamma * tau^-2, the
    schedule and density_max, with random sparse tuning as the reference line or curve."""
    from .demo import _figure

    rows = record["summary"]["rows"]
    random_row = next(r for r in rows if r["key"] == record["reference"])
    fig = _figure(figsize=(12, 8))
    axes = fig.subplots(2, 2).ravel()

    def reference(ax):
        mean, std = random_row["matched"]
        if not math.isnan(mean):
            ax.axhspan(100 * (mean - std), 100 * (mean + std), color="grey", alpha=0.2)
            ax.axhline(100 * mean, color="grey", linestyle="--", label="random sparse")

    def errorbars(ax, xs, section_rows, label, **style):
        pts = [(x, r["matched"]) for x, r in zip(xs, section_rows) if not math.isnan(r["matched"][0])]
        if pts:
            ax.errorbar(
                [p[0] for p in pts],
                [100 * p[1][0] for p in pts],
                yerr=[100 * p[1][1] for p in pts],
                capsize=3,
                label=label,
                **style,
            )

    def section(name):
        return [r for r in rows if r["section"] == name]

    lam_rows = section("lambda")
    reference(axes[0])
    errorbars(axes[0], [_lam(r["label"]) for r in lam_rows], lam_rows, "global top-k (the paper's)", fmt="-o")
    balanced = [r for r in section("allocation") if r["label"].startswith("per_matrix")]
    errorbars(axes[0], [_lam(r["label"]) for r in balanced], balanced, "same density per matrix (ours)", fmt="--s")
    axes[0].set_xlabel("λ")
    axes[0].set_title("λ (Table 1) and the allocation", fontsize=10)

    gt = section("gamma_tau")
    reference(axes[1])
    order = sorted(range(len(gt)), key=lambda i: _floor(gt[i]["key"]))
    errorbars(axes[1], [_floor(gt[i]["key"]) for i in order], [gt[i] for i in order], "FisherTune", fmt="o")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("floor γτ⁻² in multiples of the median F")
    axes[1].set_title("γ and τ (Fig. 3)", fontsize=10)

    schedule = section("schedule")
    reference(axes[2])
    errorbars(axes[2], list(range(len(schedule))), schedule, "FisherTune", fmt="o")
    axes[2].set_xticks(range(len(schedule)), [r["label"] for r in schedule], fontsize=8)
    axes[2].set_title("schedules and re-calibration (Table 2)", fontsize=10)

    density = [r for r in section("density") if r["label"].startswith("FisherTune")]
    xs = [float(r["label"].split(", ")[1].rstrip("%")) for r in density]
    axes[3].plot(xs, [100 * r["vs_random"][0] for r in density], "-o", label="FisherTune minus random, same δmax")
    axes[3].axhline(0, color="grey", linestyle="--")
    axes[3].set_xlabel("δmax (%)")
    axes[3].set_title("δmax (Fig. 2): paired difference at the common source level", fontsize=10)
    level = 100 * record["summary"]["matched_source_level"]
    for ax in axes[:3]:
        ax.set_ylabel(f"unseen mIoU (%) at source = {level:.1f}")
    axes[3].set_ylabel("unseen mIoU difference (points)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)
