"""benchmarks/device_check.sh at its reduced CPU size: every section runs and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_cpu_at_the_tiny_size():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--device", "cpu", "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    sections = [
        "## Environment",
        "## CUDA tests",
        "## Table 3",
        "## Calibration step over a training step",
        "## Global selection",
        "## Delta gradient: dense vs sparse",
    ]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)  # in the order the docs describe
    assert re.search(r"\d+ passed, 1 skipped", text)  # the CUDA tests ran on the CPU, the sync test skipped
    for row in ("| full |", "| FisherTune 1% |", "| FisherTune 15% |", "| lora |", "| frozen |"):
        assert row in text
    assert "| closed_form |" in text and "| variational |" in text
    assert re.search(r"Implied auto threshold on cpu: \d+\.\d\d%", text)


def test_device_check_refuses_an_unknown_option():
    out = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--gpus", "8"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "--gpus" in out.stderr
