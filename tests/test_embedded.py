"""The embedded benchmark: shipped backbone, its pre-training, the demo, the benchmark summary and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import peft_fishertune  # noqa: F401  (registers FISHERTUNE)
from peft_fishertune.seg import embedded
from peft_fishertune.seg.foundation import FOUNDATION_PATH, foundation_config, load_foundation, pretrain
from peft_fishertune.seg.synthetic import COARSE_CLASSES, COARSE_OF_CLASS, layout, pretraining_scene


def test_shipped_backbone_loads_with_from_pretrained():
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(FOUNDATION_PATH, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (128, 6, 8, 64)
    size = (Path(FOUNDATION_PATH) / "model.safetensors").stat().st_size
    assert 1e6 < size < 10e6
    torch.manual_seed(0)
    fresh = Dinov2Model(foundation_config())
    moved = [
        (p - q).abs().max().item()
        for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters())
        if n.endswith("weight") and p.ndim == 2
    ]
    assert min(moved) > 1e-3  # every matrix was trained, none is the initialisation


def test_missing_backbone_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_foundation(str(tmp_path))


def test_pretraining_script_runs_a_few_steps(tmp_path):
    summary = pretrain(str(tmp_path / "bb"), steps=3, batch_size=4, pool=8, progress=False)
    assert summary["steps"] == 3 and math.isfinite(summary["loss"]) and 0 <= summary["held_out_coarse_miou"] <= 1
    model = load_foundation(str(tmp_path / "bb"))
    assert model.config.num_hidden_layers == 6


def test_pretraining_scenes_are_deterministic_with_coarse_labels():
    image_a, label_a = pretraining_scene(7)
    image_b, label_b = pretraining_scene(7)
    assert torch.equal(image_a, image_b) and np.array_equal(label_a, label_b)
    assert set(np.unique(label_a)) <= set(range(len(COARSE_CLASSES)))
    assert np.array_equal(label_a, COARSE_OF_CLASS[layout(1_000_003, 7)])
    assert not torch.equal(pretraining_scene(8)[0], image_a)


def _curve(*points):
    return [{"step": 10 * i, "source": s, "unseen": u} for i, (s, u) in enumerate(points)]


def _run(method, seed, points):
    curve = _curve(*points)
    final = {d: curve[-1]["unseen"] for d in embedded.UNSEEN} | {"source": curve[-1]["source"]}
    final["unseen"] = curve[-1]["unseen"]
    return {"method": method, "seed": seed, "final": final, "curve": curve, "trainable_backbone": 5, "seconds": 1.0}


def test_summary_interpolates_unseen_at_the_matched_source_level():
    runs = [
        _run("frozen", 0, [(0.5, 0.4), (0.6, 0.5)]),
        _run("full", 0, [(0.5, 0.4), (0.7, 0.6), (0.9, 0.3)]),
        _run("fishertune", 0, [(0.5, 0.4), (0.6, 0.5), (0.8, 0.7)]),
    ]
    summary = embedded.summarise(runs)
    assert summary["matched_source_level"] == pytest.approx(0.8)  # the lowest final source among tuned methods
    rows = summary["methods"]
    assert rows["full"]["unseen_at_matched_source"][0] == pytest.approx(0.6 + 0.5 * (0.3 - 0.6))
    assert rows["fishertune"]["unseen_at_matched_source"][0] == pytest.approx(0.7)
    assert rows["frozen"]["runs_reaching_matched_source"] == 0
    assert math.isnan(rows["frozen"]["unseen_at_matched_source"][0])
    table = embedded.markdown_table(summary)
    assert "| frozen |" in table and "n/a (0/1 runs)" in table and "| 80.0 ± 0.0 |" not in table.split("\n")[0]


def test_given_scores_give_the_run_that_calibrates_itself():
    """run_method with the seed's calibration (``calibrate_warm``) trains exactly like the run that calibrates in
    stage 2 itself; a rescoring for another lambda selects differently."""
    budget = embedded.Budget.reduced()
    data = embedded.make_data(0, budget)
    warm = embedded.warmup(0, budget, data, progress=False)
    inside = embedded.run_method("fishertune", 0, budget, warm, data, progress=False)
    scores = embedded.calibrate_warm(warm, data[0], budget, 0)
    given = embedded.run_method("fishertune", 0, budget, warm, data, progress=False, scores=scores)
    assert given["curve"] == inside["curve"]
    assert all(torch.equal(given["scores"].drf[n], inside["scores"].drf[n]) for n in scores)
    other = embedded.run_method("fishertune", 0, budget, warm, data, False, overrides={"lam": 1.0}, scores=scores)
    assert other["scores"].meta["lam"] == 1.0
    assert not np.array_equal(other["selected_fraction"], given["selected_fraction"])


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'adapterx'"):
        embedded.run_method("adapterx", 0, embedded.Budget.reduced())


def test_demo_and_benchmark_end_to_end_on_a_reduced_budget(tmp_path, capsys):
    """The demo's three stages, its table, adapter and figures; a two-method benchmark; then the demo's method
    figure drawn from the benchmark's record."""
    from peft import PeftModel

    from peft_fishertune.seg.demo import run_benchmark, run_demo

    budget = embedded.Budget.reduced()
    out = tmp_path / "demo"
    result = run_demo(out, budget, progress=False)
    printed = capsys.readouterr().out
    assert "| FisherTune |" in printed and "stage 1" in printed and "stage 2" in printed
    assert "Spearman(F, domain term)" in printed and "weights above the prior floor" in printed
    for name in ("miou.md", "predictions.png", "selection.png", "drfim.png", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert "methods" not in result["paths"]
    fraction = result["selected_fraction"]
    assert fraction.shape == (6, 6) and result["active_fraction"] == pytest.approx(budget.density_max, abs=2e-3)
    for domain_result in result["results"].values():
        assert all(0 <= domain_result[d] <= 1 for d in (*embedded.DOMAINS, "unseen"))

    # the saved adapter reproduces the trained model
    model = result["model"].eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        reloaded = PeftModel.from_pretrained(_fresh_base(budget), out / "adapter").eval()
        assert torch.allclose(reloaded(pixel_values=x).logits, expected, atol=1e-5)

    record = run_benchmark(out, budget, seeds=(0, 1), methods=("frozen", "random"), progress=False)
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [
        ("frozen", 0),
        ("random", 0),
        ("frozen", 1),
        ("random", 1),
    ]
    on_disk = json.loads((out / "benchmark.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(record["summary"]))
    assert (out / "benchmark.png").is_file() and "| random |" in (out / "benchmark.md").read_text()
    assert record["runs"][0]["trainable_backbone"] == 0 and record["runs"][1]["trainable_backbone"] > 0
    for run in record["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 3, 6]
    for seed in (0, 1):  # one warm-up per seed, shared by the methods
        first = [r["curve"][0] for r in record["runs"] if r["seed"] == seed]
        assert first[0] == first[1]

    again = run_demo(out, budget, progress=False)
    assert (out / "methods.png").is_file() and "methods" in again["paths"]


def _fresh_base(budget):
    from peft_fishertune.seg.foundation import TokenSegmenter
    from peft_fishertune.seg.synthetic import CLASSES

    return TokenSegmenter(load_foundation(), len(CLASSES), budget.feature_blocks, budget.head_width)


def test_cli_demo_reduced(tmp_path, capsys):
    from peft_fishertune.seg.cli import main

    assert main(["demo", "--reduced", "--out", str(tmp_path), "--no-progress", "--tuning-steps", "3"]) == 0
    assert "| FisherTune |" in capsys.readouterr().out and (tmp_path / "selection.png").is_file()
    with pytest.raises(SystemExit, match="adapterx"):
        main(["benchmark", "--reduced", "--out", str(tmp_path), "--methods", "adapterx"])


@pytest.mark.parametrize(
    "field, value",
    [("tuning_steps", 0), ("eval_every", 0), ("batch_size", 1000), ("head_lr", 0.0), ("warmup_steps", -1)],
)
def test_bad_budget_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        embedded.Budget(**{field: value})


def test_cli_rejects_a_bad_budget_override(tmp_path):
    from peft_fishertune.seg.cli import main

    with pytest.raises(ValueError, match="tuning_steps"):
        main(["demo", "--reduced", "--out", str(tmp_path), "--tuning-steps", "0"])


def test_demo_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from peft_fishertune.seg.demo import run_demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"peft-fishertune\[demo\]"):
        run_demo(tmp_path, embedded.Budget.reduced(), progress=False)
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_cli_pretrain_writes_a_loadable_backbone(tmp_path, capsys):
    from peft_fishertune.seg.cli import main

    out = tmp_path / "backbone"
    assert (
        main(["pretrain", "--out", str(out), "--steps", "2", "--batch-size", "4", "--pool", "8", "--no-progress"]) == 0
    )
    assert "held_out_coarse_miou" in capsys.readouterr().out
    assert load_foundation(str(out)).config.hidden_size == 128
