"""``fishertune-seg demo`` and ``fishertune-seg benchmark`` on the embedded data and backbone (no downloads).

demo: FisherTune's three stages on the source domain (warm-up of the head, DR-FIM calibration and selection,
growing sparse tuning), the DR-FIM diagnostics (``Scores.describe``), then mIoU on every domain, the adapter
saved with ``save_pretrained`` and four figures: ``predictions.png`` (each domain beside the ground truth),
``selection.png`` (fraction of each block's q, k, v, o, fc1, fc2 weights selected), ``drfim.png`` (where F,
the domain term and DR-FIM each put the top weights) and ``methods.png`` (source vs unseen mIoU per method,
drawn from ``benchmark.json`` when ``fishertune-seg benchmark`` has written one in the same folder).

benchmark: every method of ``embedded.METHODS`` on the same data, warm-up and budget, for several seeds;
writes ``benchmark.json``, ``benchmark.md`` (the table) and ``benchmark.png``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..naming import ROLES
from . import embedded
from .classes import CITYSCAPES_CLASSES, PALETTE
from .embedded import DOMAINS, METHODS, SOURCE, Budget
from .synthetic import CLASSES

# each embedded class in its Cityscapes colour
COLOURS = PALETTE[[CITYSCAPES_CLASSES.index(name) for name in CLASSES]]
LABELS = {
    "frozen": "frozen backbone",
    "full": "full fine-tuning",
    "lora": "LoRA",
    "random": "random sparse",
    "fisher": "Fisher only (λ=0)",
    "fishertune": "FisherTune (closed form)",
    "fishertune-variational": "FisherTune (variational)",
}


def _require_matplotlib() -> None:
    """Fail before any training rather than after it when the figures cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the demo and the benchmark draw figures with matplotlib: pip install 'peft-fishertune[demo]'"
        ) from error


def _begin(out, budget: Budget | None) -> tuple[Path, Budget, float]:
    """What the demo and the benchmark do first: check for matplotlib, make the folder, start the clock."""
    _require_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, budget or Budget(), time.perf_counter()


def _figure(**kwargs):
    """A matplotlib Figure outside pyplot: no global backend switch, nothing left open in a notebook."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def domain_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model, one column per domain, then the unseen mean."""
    lines = ["| model | " + " | ".join(DOMAINS) + " | unseen mean |", "|---|" + "---|" * (len(DOMAINS) + 1)]
    for name, result in rows.items():
        cells = " | ".join(f"{100 * result[d]:.1f}" for d in (*DOMAINS, "unseen"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def run_demo(
    out: str | os.PathLike = "fishertune_demo",
    budget: Budget | None = None,
    seed: int = 0,
    progress: bool = True,
    backbone_path: str | None = None,
) -> dict:
    """The demo; returns the per-domain results, the selected fractions and the paths written."""
    out, budget, start = _begin(out, budget)
    print(
        f"data: {budget.train_images} source scenes for training, {budget.eval_images} held-out scenes in each "
        f"of {len(DOMAINS)} domains ({', '.join(DOMAINS)}); backbone: {backbone_path or 'the shipped one'}"
    )
    data = embedded.make_data(seed, budget)
    print(f"stage 1: warm-up, {budget.warmup_steps} steps, backbone frozen, decoder trained")
    warm = embedded.warmup(seed, budget, data, backbone_path, progress)
    print(
        f"stage 2: DR-FIM (closed form), {budget.calibration_steps} batches clean and shifted; "
        f"stage 3: {budget.tuning_steps} steps, density {budget.density_min:.0%} -> {budget.density_max:.0%}"
    )
    result = embedded.run_method("fishertune", seed, budget, warm, data, progress)
    model = result.pop("model")
    scores = result.pop("scores")
    print("\n" + scores.describe(budget.density_max))
    rows = {"after warm-up (frozen backbone)": warm[1], "FisherTune": result["final"]}
    table = domain_table(rows)
    print("\nmIoU (%) per domain, seed", seed)
    print(table)
    (out / "miou.md").write_text(table + "\n")
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    size = sum(f.stat().st_size for f in adapter.iterdir())
    print(
        f"\nadapter: {result['trainable_backbone']:,} backbone weights of {model.base_model.num_candidates():,} "
        f"candidates, saved to {adapter} ({size / 1e6:.2f} MB with the decoder)"
    )
    active_fraction = result["trainable_backbone"] / model.base_model.num_candidates()
    paths = {
        "predictions": plot_predictions(model, data[1], out / "predictions.png"),
        "selection": plot_selection(result["selected_fraction"], out / "selection.png", active_fraction),
        "drfim": plot_drfim(
            scores, budget.density_max, model.base_model.model.backbone.config.num_hidden_layers, out / "drfim.png"
        ),
    }
    benchmark = out / "benchmark.json"
    if benchmark.is_file():
        paths["methods"] = plot_methods(json.loads(benchmark.read_text()), out / "methods.png")
    else:
        print(f"(no {benchmark}: run `fishertune-seg benchmark --out {out}` for the per-method figure)")
    for path in paths.values():
        print(f"wrote {path}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return {
        "results": rows,
        "selected_fraction": result["selected_fraction"],
        "active_fraction": active_fraction,
        "paths": paths,
        "model": model,
    }


def run_benchmark(
    out: str | os.PathLike = "fishertune_demo",
    budget: Budget | None = None,
    seeds=(0, 1, 2),
    methods=METHODS,
    progress: bool = True,
    backbone_path: str | None = None,
) -> dict:
    out, budget, start = _begin(out, budget)
    results = []
    for seed in seeds:
        data = embedded.make_data(seed, budget)
        warm = embedded.warmup(seed, budget, data, backbone_path, progress)
        for method in methods:
            run = embedded.run_method(method, seed, budget, warm, data, progress)
            run.pop("model")
            if "selected_fraction" in run:
                run["selected_fraction"] = run["selected_fraction"].tolist()
            results.append(run)
            final = run["final"]
            print(
                f"seed {seed} {method:24s} source {100 * final[SOURCE]:5.1f}  unseen {100 * final['unseen']:5.1f}"
                f"  ({run['seconds']:.0f} s)"
            )
    summary = embedded.summarise(results)
    seconds = time.perf_counter() - start
    record = {
        "budget": asdict(budget),
        "seeds": list(seeds),
        "summary": summary,
        "runs": results,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "benchmark.json").write_text(json.dumps(record, indent=1))
    table = embedded.markdown_table(summary)
    (out / "benchmark.md").write_text(table + "\n")
    print(f"\nmIoU (%), mean ± std over seeds {list(seeds)}; unseen = mean of {', '.join(DOMAINS[1:])}")
    print(table)
    path = plot_methods(record, out / "benchmark.png")
    print(f"\nwrote {out / 'benchmark.json'}, {out / 'benchmark.md'} and {path}; took {seconds / 60:.1f} min")
    return record


# ---------------------------------------------------------------------------------------------------- figures
def colourise(labels: np.ndarray) -> np.ndarray:
    return COLOURS[np.asarray(labels, dtype=np.int64).clip(0, len(COLOURS) - 1)]


@torch.no_grad()
def plot_predictions(model, evaluation: dict, path, scenes: int = 2) -> Path:
    from matplotlib.patches import Rectangle

    model.eval()
    fig = _figure(figsize=(2.0 * 3 * scenes, 2.0 * len(DOMAINS)))
    axes = fig.subplots(len(DOMAINS), 3 * scenes)
    for row, domain in enumerate(DOMAINS):
        images = evaluation[domain]["pixel_values"][:scenes]
        predictions = model(pixel_values=images).logits.argmax(1).numpy()
        for s in range(scenes):
            panels = [
                (images[s].permute(1, 2, 0).numpy(), domain),
                (colourise(evaluation[domain]["labels"][s].numpy()), "ground truth"),
                (colourise(predictions[s]), "FisherTune"),
            ]
            for c, (picture, title) in enumerate(panels):
                ax = axes[row, 3 * s + c]
                ax.imshow(picture, interpolation="nearest")
                ax.set_title(title, fontsize=8)
                ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=COLOURS[i] / 255) for i in range(len(CLASSES))]
    fig.legend(handles, CLASSES, loc="lower center", ncol=len(CLASSES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=80)
    return Path(path)


def plot_selection(fraction: np.ndarray, path, overall: float | None = None) -> Path:
    """Heat map of the active fraction of each block's q, k, v, o, fc1, fc2 matrix; ``overall`` (the active
    fraction of all candidates) goes into the title when given."""
    fraction = np.asarray(fraction)
    fig = _figure(figsize=(5, 0.5 * len(fraction) + 1.2))
    ax = fig.subplots()
    total = "" if overall is None else f" (all: {overall:.0%} of candidates)"
    image = _heatmap(ax, fraction, f"selected fraction per weight matrix{total}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_drfim(scores, density: float, blocks: int, path) -> Path:
    """Where each term puts its weights: the fraction of each matrix in the global top ``density`` by F(x), by the
    domain term alone and by DR-FIM, side by side, with the diagnostics of ``Scores.summary`` in the title."""
    summary = scores.summary(density)
    fig = _figure(figsize=(13, 0.5 * blocks + 1.8))
    axes = fig.subplots(1, 3)
    tables = {
        kind: embedded.block_matrix({n: m[f"{kind}_selected"] for n, m in summary["modules"].items()}, blocks)
        for kind in ("fisher", "domain", "drf")
    }
    top = max(t.max() for t in tables.values())
    titles = {
        "fisher": "by F(x) (λ = 0)",
        "domain": "by the domain term (λ = 1)",
        "drf": f"by DR-FIM (λ = {scores.meta['lam']:g})",
    }
    for ax, (kind, table) in zip(axes, tables.items()):
        _heatmap(ax, table, f"top {density:.0%} {titles[kind]}", vmax=top)
    fig.suptitle(
        f"fisher_scale={summary['fisher_scale']!r}: Spearman(F, D) = {summary['spearman_fisher_domain']:.2f}, "
        f"top by F kept by DR-FIM {summary['overlap_fisher_drf']:.0%}, weights above the floor "
        f"{summary['above_floor']:.0%}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def _heatmap(ax, fraction: np.ndarray, title: str, vmax: float | None = None):
    vmax = fraction.max() if vmax is None else vmax
    image = ax.imshow(fraction, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
    ax.set_xticks(range(len(ROLES)), list(ROLES))
    ax.set_yticks(range(len(fraction)), [f"block {i}" for i in range(len(fraction))])
    for (i, j), value in np.ndenumerate(fraction):
        colour = "white" if value < vmax / 2 else "black"
        ax.text(j, i, f"{100 * value:.0f}%", ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(title, fontsize=9)
    return image


def plot_methods(record: dict, path) -> Path:
    """Left: final source vs unseen mIoU, mean ± std over seeds. Right: the curves over stage 3 (mean over
    seeds), from the shared warm-up point to the end, so that "learned less" reads apart from "generalised"."""
    from matplotlib import colormaps

    summary = record["summary"]["methods"]
    fig = _figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    colours = colormaps["tab10"]
    for i, method in enumerate(summary):
        row = summary[method]
        (sm, ss), (um, us) = row[SOURCE], row["unseen"]
        left.errorbar(
            100 * sm,
            100 * um,
            xerr=100 * ss,
            yerr=100 * us,
            fmt="o",
            color=colours(i),
            capsize=3,
            label=LABELS.get(method, method),
        )
        runs = [r for r in record["runs"] if r["method"] == method]
        steps = len(min((r["curve"] for r in runs), key=len))
        source = np.mean([[p[SOURCE] for p in r["curve"][:steps]] for r in runs], axis=0)
        unseen = np.mean([[p["unseen"] for p in r["curve"][:steps]] for r in runs], axis=0)
        right.plot(100 * source, 100 * unseen, "-o", markersize=3, color=colours(i), label=LABELS.get(method, method))
    level = record["summary"]["matched_source_level"]
    for ax in (left, right):
        ax.set_xlabel("source mIoU (%)")
        ax.set_ylabel("unseen mIoU (%), mean of 5 domains")
        ax.grid(alpha=0.3)
    right.axvline(100 * level, color="grey", linestyle=":", linewidth=1)
    left.set_title(f"after stage 3, mean ± std over {len(record['seeds'])} seeds", fontsize=10)
    right.set_title("during stage 3 (every eval point, mean over seeds)", fontsize=10)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)
