"""The sensitivity study: its rows, how runs are shared and paired with random sparse tuning, and a reduced run."""

from __future__ import annotations

import json

import pytest

import peft_fishertune  # noqa: F401  (registers FISHERTUNE)
from peft_fishertune.seg import study
from peft_fishertune.seg.embedded import UNSEEN, Budget


def test_rows_cover_the_papers_studies_and_share_equal_runs():
    """Every value the paper varies is a row; rows that mean the same run (the default config under several
    names) share one key; Alter-2K/4K/6K of 28k steps become every 21/43/64 of our 300."""
    budget = Budget()
    rows = study.study_rows(budget)
    by_section = {}
    for row in rows:
        by_section.setdefault(row.section, []).append(row)
    assert [r.config["lam"] for r in by_section["lambda"]] == list(study.LAMBDAS)
    assert len(by_section["gamma_tau"]) == 9 + 2
    assert [r.config.get("recalibrate_every") for r in by_section["schedule"][3:]] == [21, 43, 64]
    assert {r.config["density_max"] for r in by_section["density"]} == set(study.DENSITIES)
    default = study.Row("x", "default").key(budget)
    same = [r.label for r in rows if r.key(budget) == default]
    assert {"FisherTune (defaults)", "λ = 0.5", "γ = 0.01, τ = 0.01", "exponential", "FisherTune, 15%"} <= set(same)
    assert study.Row("x", "r", "random", {"lam": 0.0}).key(budget) == study.Row("x", "r", "random").key(budget)
    assert len({r.key(budget) for r in rows if study._every_seed(r, rows, budget)}) == 15


def _run(key, seed, curve, unseen_final):
    final = {"source": curve[-1][0], "unseen": unseen_final, **dict.fromkeys(UNSEEN, unseen_final)}
    points = [{"step": i, "source": s, "unseen": u} for i, (s, u) in enumerate(curve)]
    return {"key": key, "seed": seed, "final": final, "curve": points}


def test_summary_pairs_each_row_with_random_of_the_same_seed():
    """The matched level is random's lowest final source; a row's 'vs random' is the mean of per-seed differences
    at that level; a run that never reaches it is left out and counted."""
    record = {
        "reference": "random",
        "rows": [
            {"section": "references", "label": "random", "key": "random"},
            {"section": "lambda", "label": "λ = 1", "key": "ft"},
        ],
        "runs": [
            _run("random", 0, [(0.5, 0.5), (0.8, 0.6)], 0.6),
            _run("random", 1, [(0.5, 0.5), (0.9, 0.7)], 0.7),
            _run("ft", 0, [(0.5, 0.5), (0.9, 0.9)], 0.9),  # at 0.8: 0.8
            _run("ft", 1, [(0.5, 0.5), (0.7, 0.9)], 0.9),  # never reaches 0.8
        ],
    }
    summary = study.summarise_study(record)
    assert summary["matched_source_level"] == 0.8
    ft = summary["rows"][1]
    assert ft["matched"][0] == pytest.approx(0.8) and ft["reached"] == 1
    assert ft["vs_random_matched"][0] == pytest.approx(0.8 - 0.6)  # seed 0 only
    assert ft["vs_random_final"] == pytest.approx([0.25, (0.05**2 * 2) ** 0.5])


def test_reduced_study_end_to_end(tmp_path, capsys):
    """``fishertune-seg study --reduced``: every section's table beside the paper's numbers, the diagnostics of
    both Fisher scales and of two calibrations, the JSON record and the figure; an unknown section is named."""
    from peft_fishertune.seg.cli import main

    assert main(["study", "--reduced", "--seeds", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    text = (tmp_path / "study.md").read_text()
    assert text in capsys.readouterr().out
    for title in ("## λ", "## γ and τ", "## Schedules", "## δmax", "## Allocation", "## The Fisher scale"):
        assert title in text, title
    assert "| λ = 0.5 | 77.5 |" in text and "| alter-2k | 65.2 / 76.1 |" in text
    record = json.loads((tmp_path / "study.json").read_text())
    assert len({r["key"] for r in record["runs"]}) == len(record["runs"])  # no run twice
    (diagnostics,) = record["diagnostics"]
    assert diagnostics["loss"]["above_floor"] < diagnostics["median"]["above_floor"]
    assert set(diagnostics["between_calibrations"]) == {"fisher", "domain", "drf"}
    assert (tmp_path / "study.png").is_file()
    with pytest.raises(SystemExit, match="lambdas"):
        main(["study", "--reduced", "--out", str(tmp_path), "--sections", "lambdas"])
