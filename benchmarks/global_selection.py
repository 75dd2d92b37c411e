"""Global top-k over the scores of all ViT-L candidate weights (302M): time and extra peak memory.

    python benchmarks/global_selection.py [--blocks 24]

Each density runs in a fresh process: scores (float32, heavy-tailed like squared gradients) are made per
weight, then ``global_topk`` selects density * N of them. Extra peak memory = peak RSS during the selection
minus RSS before it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import VIT_L_SHAPES as SHAPES


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(density: float, blocks: int) -> dict:
    from peft_fishertune.selection import count_for_density, global_topk

    generator = torch.Generator().manual_seed(0)
    scores = {
        f"encoder.layer.{b}.{n}": torch.randn(shape, generator=generator).exp_().square_()
        for b in range(blocks)
        for n, shape in SHAPES.items()
    }
    total = sum(s.numel() for s in scores.values())
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    selection = global_topk(scores, count_for_density(density, total))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "density": density,
        "total": total,
        "k": int(selection.order.numel()),
        "seconds": seconds,
        "extra_mb": peak - max(before, peak_before) if peak > peak_before else 0.0,
        "scores_mb": total * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.blocks)))
        return
    print(f"\nViT-L candidate scores ({args.blocks} blocks), {torch.get_num_threads()} threads\n")
    print("| density | candidates | selected | seconds | extra peak MB (scores: MB) |")
    print("|---|---|---|---|---|")
    for density in (0.01, 0.15):
        out = subprocess.run(
            [sys.executable, __file__, "--blocks", str(args.blocks), "--one", str(density)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {r['density']:.0%} | {r['total']:,} | {r['k']:,} | {r['seconds']:.1f} | "
            f"{r['extra_mb']:.0f} ({r['scores_mb']:.0f}) |"
        )


if __name__ == "__main__":
    main()
