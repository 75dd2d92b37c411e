"""Training-step cost of FisherTune against full fine-tuning, LoRA and a frozen backbone, side by side.

    python benchmarks/training_cost.py [--sizes base] [--densities 0.01 0.15] [--steps 4] [--batch 2]

Every method runs in a fresh process on the same random-init DINOv2 segmenter (1x1-conv head, 19 classes),
the same batch and machine: AdamW steps over the trainable parameters. Reported: median step time, peak
RSS during the training steps (the kernel's high-water mark, reset after the model is built), trainable
parameters and optimizer-state bytes. FisherTune runs at a fixed density (a random selection, all active:
the state of the tuning stage) with the custom backward, and once with plain autograd ("naive") for
comparison. Also: forward time of the unmerged adapter against the merged model. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch
from common import DINOV2_SIZES, VIT, dinov2_segmenter


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(size: str, method: str, density: float):
    from peft import LoraConfig, get_peft_model

    from peft_fishertune import FisherTuneConfig

    model = dinov2_segmenter(size)
    if method == "full":
        return model
    if method == "frozen":
        model.backbone.requires_grad_(False)
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(target_modules=VIT, r=16, modules_to_save=["decode_head"]))
    peft_model = get_peft_model(
        model,
        FisherTuneConfig(
            target_modules=VIT, modules_to_save=["decode_head"], init_selection="random", density_max=density
        ),
    )
    if method == "fishertune-naive":
        from peft_fishertune.layer import FisherTuneLayer, Linear

        Linear._forward_with_delta = FisherTuneLayer._forward_with_delta
    return peft_model


def run_one(size: str, method: str, density: float, steps: int, batch: int) -> dict:
    model = build(size, method, density)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.rand(batch, 3, 224, 224, generator=generator),
        "labels": torch.randint(0, 19, (batch, 224, 224), generator=generator),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back heap pages freed while building (e.g. the selection)
    with open("/proc/self/clear_refs", "w") as handle:  # reset the RSS high-water mark
        handle.write("5")
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    result = {
        "size": size,
        "method": method,
        "density": density,
        "step_s": statistics.median(times[1:]),
        "peak_mb": status_mb("VmHWM"),
        "trainable": sum(p.numel() for p in params),
        "optimizer_mb": state_bytes / 2**20,
    }
    if method == "fishertune":
        result.update(inference_overhead(model, inputs["pixel_values"]))
    return result


def inference_overhead(model, pixel_values) -> dict:
    model.eval()

    def forward_seconds(m):
        times = []
        with torch.no_grad():
            for _ in range(4):
                start = time.perf_counter()
                m(pixel_values=pixel_values)
                times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    unmerged = forward_seconds(model)
    merged = forward_seconds(model.merge_and_unload())
    return {"unmerged_s": unmerged, "merged_s": merged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["base"], choices=sorted(DINOV2_SIZES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.15])
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "frozen", "fishertune", "fishertune-naive"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, method, density = args.one
        print(json.dumps(run_one(size, method, float(density), args.steps, args.batch)))
        return
    print(
        f"\nDINOv2 segmenter, 224x224, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps\n"
    )
    print("| size | method | density | step s | vs full | peak RSS MB | vs full | trainable | optimizer MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    overhead = []
    for size in args.sizes:
        runs = []
        for method in args.methods:
            densities = args.densities if method.startswith("fishertune") else [0.0]
            for density in densities:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--steps",
                        str(args.steps),
                        "--batch",
                        str(args.batch),
                        "--one",
                        size,
                        method,
                        str(density),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
        full = next((r for r in runs if r["method"] == "full"), runs[0])
        for r in runs:
            density = f"{r['density']:.0%}" if r["method"].startswith("fishertune") else "-"
            print(
                f"| {size} | {r['method']} | {density} | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x | "
                f"{r['peak_mb']:.0f} | {r['peak_mb'] / full['peak_mb']:.2f}x | {r['trainable']:,} | "
                f"{r['optimizer_mb']:.1f} |"
            )
            if "unmerged_s" in r:
                overhead.append(r)
    if overhead:
        print("\n| size | density | unmerged forward s | merged forward s | ratio |\n|---|---|---|---|---|")
        for r in overhead:
            print(
                f"| {r['size']} | {r['density']:.0%} | {r['unmerged_s']:.3f} | {r['merged_s']:.3f} | "
                f"{r['unmerged_s'] / r['merged_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
