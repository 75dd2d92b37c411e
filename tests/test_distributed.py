"""Two processes on a split of the data give the one-process scores (torchrun, gloo, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from peft_fishertune import Scores

SCRIPT = os.path.join(os.path.dirname(__file__), "dist_calibrate.py")


def run(command, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    subprocess.run(command, check=True, timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_equal_one_process(tmp_path):
    """closed form: 8 batches on 1 process (8 steps) == the same 8 batches split over 2 processes (4 steps)."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run([sys.executable, SCRIPT, str(one), "8", "closed_form"])
    run(["torchrun", "--standalone", "--nproc_per_node", "2", SCRIPT, str(two), "4", "closed_form"])
    single, double = Scores.load(one), Scores.load(two)
    assert (single.meta["processes"], double.meta["processes"]) == (1, 2)
    assert single.meta["used"] == double.meta["used"] == 8
    assert single.meta["w"] == pytest.approx(double.meta["w"], rel=1e-12)
    for kind in ("fisher", "fisher_shifted"):
        for name in single:
            torch.testing.assert_close(getattr(double, kind)[name], getattr(single, kind)[name], rtol=1e-5, atol=1e-12)
    # The domain term takes |F - F'| of nearly equal numbers, which leaves fewer exact digits per weight: it is
    # compared against its global scale instead.
    for kind in ("domain", "drf"):
        scale = torch.cat([t.reshape(-1) for t in getattr(single, kind).values()]).abs().mean()
        for name in single:
            torch.testing.assert_close(
                getattr(double, kind)[name], getattr(single, kind)[name], rtol=0, atol=1e-4 * scale
            )


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_trainer_with_ddp_keeps_processes_in_sync(tmp_path):
    """Warm-up, calibration and growing tuning in a Trainer under DDP (2 processes, gradient accumulation and
    clipping): the deltas leave DDP's care and have their gradients averaged, so both processes end with the
    same trained weights, all active at density_max."""
    from safetensors.torch import load_file

    run(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(os.path.dirname(__file__), "dist_trainer.py"),
            str(tmp_path / "w"),
        ]
    )
    first, second = load_file(tmp_path / "w_rank0.safetensors"), load_file(tmp_path / "w_rank1.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    deltas = [t for k, t in first.items() if "fishertune_values" in k]
    assert int(first["active"]) == sum(t.numel() for t in deltas) > 0
    assert any(torch.count_nonzero(t) for t in deltas)
