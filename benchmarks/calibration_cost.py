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
from peft import get_peft_model
from transformers import Dinov2Config, Dinov2Model

from peft_fishertune import FisherTuneConfig, calibrate
from peft_fishertune.quickstart import TinySegmenter

SIZES = {  # (hidden, layers, heads, image)
    "tiny": (32, 2, 2, 56),
    "small": (384, 12, 6, 224),
    "base": (768, 12, 12, 224),
}
VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def build(size: str) -> tuple[TinySegmenter, int]:
    hidden, layers, heads, image = SIZES[size]
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image,
        patch_size=14,
    )
    return TinySegmenter(Dinov2Model(config), num_classes=19), image


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
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
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
        f"\nDinov2 {args.size} ({SIZES[args.size][0]} wide, {SIZES[args.size][1]} blocks), "
        f"{image}x{image}, batch {args.batch}, {torch.get_num_threads()} threads\n"
    )
    print("| step | seconds | ratio to training step |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / train:.2f}x |")


if __name__ == "__main__":
    main()
