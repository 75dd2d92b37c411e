"""Cost of one DR-FIM calibration step over one training step, same model and batch, one run.

    python benchmarks/calibration_cost.py [--size tiny|small|base] [--steps N] [--batch B]

A calibration step is two forward/backward passes (x and x') with gradients for every candidate
weight, so 2.0x a training step is the floor. The training step is a FisherTune step (sparse deltas at
density_max, all active, plus the decode head, AdamW). Times are medians of per-step differences:
calibrate(n) - calibrate(n/2) divided by n/2, which removes the fixed set-up cost. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import DINOV2_SIZES, VIT, dinov2_segmenter
from peft import get_peft_model

from peft_fishertune import FisherTuneConfig, calibrate
from peft_fishertune.quickstart import TinySegmenter

IMAGE = {"tiny": 56, "small": 224, "base": 224, "large": 224}


def build(size: str) -> tuple[TinySegmenter, int]:
    return dinov2_segmenter(size, image=IMAGE[size]), IMAGE[size]


def batch_for(image: int, batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(batch, 3, image, image, generator=generator),
        "labels": torch.randint(0, 19, (batch, image, image), generator=generator),
    }


def train_step_seconds(model, batch, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def calibration_step_seconds(model, batch, steps: int, estimator: str) -> float:
    data = [batch]
    start = time.perf_counter()
    calibrate(model, data, steps=steps // 2, estimator=estimator, progress=False)
    half = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, data, steps=steps, estimator=estimator, progress=False)
    full = time.perf_counter() - start
    return (full - half) / (steps - steps // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(DINOV2_SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base, image = build(args.size)
    config = FisherTuneConfig(target_modules=VIT, modules_to_save=["decode_head"], init_selection="random")
    model = get_peft_model(base, config)
    batch = batch_for(image, args.batch)
    train = train_step_seconds(model, batch, args.steps)
    rows = [("training step (FisherTune, 15% active + head)", train)]
    for estimator in ("closed_form", "variational"):
        rows.append((f"calibration step, {estimator}", calibration_step_seconds(model, batch, args.steps, estimator)))
    print(
        f"\nDinov2 {args.size} ({DINOV2_SIZES[args.size][0]} wide, {DINOV2_SIZES[args.size][1]} blocks), "
        f"{image}x{image}, batch {args.batch}, {torch.get_num_threads()} threads\n"
    )
    print("| step | seconds | ratio to training step |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / train:.2f}x |")


if __name__ == "__main__":
    main()
