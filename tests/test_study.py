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
    paper = study.study_rows(budget, study.PAPER_SECTIONS)
    assert len({r.key(budget) for r in paper if study._every_seed(r, paper, budget)}) == 15
    # the calibration section's rows at the budget's own length are runs the other sections have already
    longer = {r.key(budget) for r in rows if r.section == "calibration"} - {r.key(budget) for r in paper}
    assert len(longer) == 3 and all(dict(key[1:])["calibration_steps"] == 400 for key in longer)


def _run(key, seed, curve, unseen_final):
    final = {"source": curve[-1][0], "unseen": unseen_final, **dict.fromkeys(UNSEEN, unseen_final)}
    points = [{"step": i, "source": s, "unseen": u} for i, (s, u) in enumerate(curve)]
    return {"key": key, "seed": seed, "final": final, "curve": points}


def test_summary_pairs_each_row_with_random_of_the_same_seed():
    """The matched level is random's lowest final source. 'vs random' compares a run with random sparse tuning of
    the same seed where both curves reach the lower of their two final source scores, so a run that fits the
    source less is not credited for it."""
    record = {
        "reference": "random",
        "seeds": [0, 1],
        "rows": [
            {"section": "references", "label": "random", "key": "random", "reference": None},
            {"section": "lambda", "label": "λ = 1", "key": "ft", "reference": None},
        ],
        "runs": [
            _run("random", 0, [(0.5, 0.5), (0.8, 0.6)], 0.6),
            _run("random", 1, [(0.5, 0.5), (0.9, 0.7)], 0.7),
            _run("ft", 0, [(0.5, 0.5), (0.9, 0.9)], 0.9),  # at 0.8 (random's end): 0.8
            _run("ft", 1, [(0.5, 0.5), (0.7, 0.9)], 0.9),  # ends at 0.7, where random reads 0.5 + 0.2 * 0.5 = 0.6
        ],
    }
    summary = study.summarise_study(record)
    assert summary["matched_source_level"] == 0.8
    ft = summary["rows"][1]
    assert ft["matched"][0] == pytest.approx(0.8) and ft["reached"] == 1
    assert ft["vs_random"][0] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.6)) / 2)
    assert summary["rows"][0]["vs_random"] == [0.0, 0.0]


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
