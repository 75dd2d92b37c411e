"""The measurements of benchmarks/device_check.sh: the paper's Table 3 at real size and the costs behind it.

    python benchmarks/device_check.py [--device cuda|cpu] [--tiny] [--sections table3 calibration selection delta]

Real size (the default): a random-init DINOv2-L (24 blocks, width 1024, patch 14) with the recipe's
Mask2Former decoder (transformers' default Mask2FormerConfig), 512x512 crops, batch 4, bf16 autocast, AdamW.
``--tiny``: a 4-block width-64 DINOv2 with the small test decoder, 64x64 crops, batch 2, for a CPU run in
seconds (the test suite runs it so that the script does not rot). Sections, in order:

- table3: peak memory and median step time of full fine-tuning, FisherTune at 1% and 15% (a random selection,
  all active: the state at the end of tuning), LoRA (r=16 on the same modules) and a frozen backbone, each
  in a fresh process, as ratios to full. Peak memory is torch.cuda.max_memory_allocated on a GPU (weights,
  gradients, optimizer state and activations) and the peak RSS on a CPU.
- calibration: one DR-FIM calibration step over one training step of the FisherTune-15% model, for the
  closed-form and the variational estimator (2.0x is the floor: x and x' each take a forward and a backward).
- selection: global top-k over all candidate weights of the backbone (302M for DINOv2-L) at 15%, scores
  made on the device.
- delta: the backward of one FisherTune linear (a ViT-L fc1, 4096 x 1024; the tokens of a batch) per active
  density: the deltas' gradient gathered from the dense weight gradient ("dense"), computed for the selected
  entries only ("sparse") and, on CUDA, by torch.sparse.sampled_addmm; then the density below which "sparse"
  wins, i.e. the ``auto`` threshold this device implies (``sparse_linear.set_sparse_density``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

METHODS = [("full", 0.0), ("fishertune", 0.01), ("fishertune", 0.15), ("lora", 0.0), ("frozen", 0.0)]
SECTIONS = ("table3", "calibration", "selection", "delta")


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"hidden": 64, "layers": 4, "heads": 2, "image": 64, "batch": 2, "steps": 3, "fc1": (256, 64)}
    return {"hidden": 1024, "layers": 24, "heads": 16, "image": 512, "batch": 4, "steps": 10, "fc1": (4096, 1024)}


def build(method: str, density: float, tiny: bool, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import Dinov2Config, Dinov2Model, Mask2FormerConfig

    from peft_fishertune import FisherTuneConfig
    from peft_fishertune.seg.model import ViTMask2Former, backbone_target_modules, tiny_decoder_config

    s = sizes(tiny)
    torch.manual_seed(0)
    backbone = Dinov2Model(
        Dinov2Config(
            hidden_size=s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            intermediate_size=4 * s["hidden"],
            image_size=518 if not tiny else 64,
            patch_size=14 if not tiny else 8,
        )
    )
    decoder = tiny_decoder_config(19) if tiny else Mask2FormerConfig(num_labels=19)
    model = ViTMask2Former(backbone, num_classes=19, decoder_config=decoder)
    targets = backbone_target_modules()
    if method == "frozen":
        model.backbone.requires_grad_(False)
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(target_modules=targets, r=16, modules_to_save=["decode_head"]))
    elif method == "fishertune":
        config = FisherTuneConfig(
            target_modules=targets, modules_to_save=["decode_head"], init_selection="random", density_max=density
        )
        model = get_peft_model(model, config)
    return model.to(device)


def make_batch(tiny: bool, device: str) -> dict:
    s = sizes(tiny)
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(s["batch"], 3, s["image"], s["image"], generator=generator).to(device),
        "labels": torch.randint(0, 19, (s["batch"], s["image"], s["image"]), generator=generator).to(device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def train_seconds(model, batch, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for _ in range(steps + 2):  # the first two warm up kernels and allocate the optimizer state
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def peak_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:  # reset the RSS high-water mark
            handle.write("5")


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def one_method(method: str, density: float, tiny: bool, device: str) -> dict:
    model = build(method, density, tiny, device)
    batch = make_batch(tiny, device)
    peak_memory_reset(device)
    seconds = train_seconds(model, batch, sizes(tiny)["steps"], device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "fishertune":
        trainable = sum(model.base_model.active_counts().values()) + sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "fishertune_" not in n
        )
    return {
        "method": method,
        "density": density,
        "step_s": seconds,
        "peak_gb": peak_memory_gb(device),
        "trainable": trainable,
    }


def one_calibration(tiny: bool, device: str) -> dict:
    from peft_fishertune import calibrate

    model = build("fishertune", 0.15, tiny, device)
    batch = make_batch(tiny, device)
    steps = sizes(tiny)["steps"]
    train = train_seconds(model, batch, steps, device)
    result = {"train_s": train}
    for estimator in ("closed_form", "variational"):
        with autocast(device):  # once untimed: the first call sets up the accelerator and the shift hooks
            calibrate(model, [batch], steps=1, estimator=estimator, progress=False)
        timings = []
        for n in (steps // 2 or 1, steps):
            sync(device)
            start = time.perf_counter()
            with autocast(device):
                calibrate(model, [batch], steps=n, estimator=estimator, progress=False)
            sync(device)
            timings.append((n, time.perf_counter() - start))
        (n1, t1), (n2, t2) = timings
        result[estimator] = (t2 - t1) / (n2 - n1)
    return result


def one_selection(tiny: bool, device: str) -> dict:
    from peft_fishertune.selection import count_for_density, global_topk

    s = sizes(tiny)
    hidden, mlp = s["hidden"], 4 * s["hidden"]
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden)}
    shapes.update({"fc1": (mlp, hidden), "fc2": (hidden, mlp)})
    generator = torch.Generator(device=device).manual_seed(0)
    scores = {
        f"encoder.layer.{b}.{name}": torch.randn(shape, generator=generator, device=device).exp_().square_()
        for b in range(s["layers"])
        for name, shape in shapes.items()
    }
    total = sum(t.numel() for t in scores.values())
    sync(device)
    start = time.perf_counter()
    selection = global_topk(scores, count_for_density(0.15, total))
    seconds = time.perf_counter() - start
    return {"candidates": total, "k": int(sum(i.numel() for i in selection.indices.values())), "seconds": seconds}


def delta_backward(tiny: bool, device: str, repeats: int = 5) -> list[dict]:
    from peft_fishertune.sparse_linear import sparse_delta_linear

    s = sizes(tiny)
    out_features, in_features = s["fc1"]
    tokens = s["batch"] * (s["image"] // (8 if tiny else 14)) ** 2
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(device)
    x = torch.randn(tokens, in_features, generator=generator).to(device)
    grad = torch.randn(tokens, out_features, generator=generator).to(device)
    rows = []
    for density in (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.15):
        k = max(1, int(density * weight.numel()))
        positions = torch.randperm(weight.numel(), generator=generator)[:k].sort().values.to(device)
        values = torch.zeros(k, device=device, requires_grad=True)
        row = {"density": density}
        for mode in ("dense", "sparse"):

            def step(mode=mode, positions=positions, values=values):
                sparse_delta_linear(x, weight, None, positions, values, mode).backward(grad)

            row[mode] = _median_seconds(step, repeats, device)
        if device.startswith("cuda"):

            def sampled(positions=positions):
                _sampled_grad(grad, x, positions, weight.shape)

            row["sampled_addmm"] = _median_seconds(sampled, repeats, device)
        rows.append(row)
    return rows


def _sampled_grad(grad, x, positions, shape):
    """The deltas' gradient (grad^T x at the selected positions) through torch.sparse.sampled_addmm."""
    rows, cols = positions // shape[1], positions % shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=grad.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    mask = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(cols, dtype=grad.dtype), size=shape)
    return torch.sparse.sampled_addmm(mask, grad.t().contiguous(), x, beta=0.0).values()


def _median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def implied_threshold(rows: list[dict]) -> float:
    """The highest measured density up to which "sparse" beats "dense" at every measured density (0 when it
    loses at the lowest one). Noise above that point does not move it."""
    threshold = 0.0
    for row in sorted(rows, key=lambda r: r["density"]):
        if row["sparse"] >= row["dense"]:
            break
        threshold = row["density"]
    return threshold


def in_fresh_process(args, *extra) -> dict:
    """One measurement in its own process (so that peak memory is its own); in-process with --tiny, where the
    point is to run every code path in seconds, not to compare memory."""
    if args.tiny:
        return run_one(args, *extra)
    command = [sys.executable, __file__, "--device", args.device, *(["--tiny"] if args.tiny else []), "--one", *extra]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(args, kind: str, *rest) -> dict:
    if kind == "method":
        return one_method(rest[0], float(rest[1]), args.tiny, args.device)
    if kind == "calibration":
        return one_calibration(args.tiny, args.device)
    return one_selection(args.tiny, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a reduced model and image size (a CPU run in seconds)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--one", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here; use --device cpu --tiny for the CPU variant")
    if args.one:
        print(json.dumps(run_one(args, *args.one)))
        return
    s = sizes(args.tiny)
    size = "tiny DINOv2 (4 blocks, width 64)" if args.tiny else "DINOv2-L (random init)"
    setting = f"{size} + Mask2Former decoder, {s['image']}x{s['image']}, batch {s['batch']}, bf16 autocast, AdamW"
    if "table3" in args.sections:
        print(f"\n## Table 3: memory and step time ({setting}, median of {s['steps']} steps)\n")
        runs = [in_fresh_process(args, "method", method, str(density)) for method, density in METHODS]
        full = runs[0]
        memory = "peak CUDA memory GB" if args.device.startswith("cuda") else "peak RSS GB"
        if args.tiny:
            print("(--tiny: all methods in one process, so the memory column is not a comparison)\n")
        print(f"| method | trainable | {memory} | vs full | step s | vs full |\n|---|---|---|---|---|---|")
        for r in runs:
            name = f"FisherTune {r['density']:.0%}" if r["method"] == "fishertune" else r["method"]
            print(
                f"| {name} | {r['trainable']:,} | {r['peak_gb']:.2f} | {r['peak_gb'] / full['peak_gb']:.2f}x | "
                f"{r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f}x |"
            )
        print("\nThe paper (DINOv2-L, Table 3): full 14.7 GB, FisherTune 12.5 GB (0.85x), step time 0.92x.")
    if "calibration" in args.sections:
        r = in_fresh_process(args, "calibration")
        print(f"\n## Calibration step over a training step (FisherTune 15%, {setting})\n")
        print("| estimator | calibration step s | training step s | ratio |\n|---|---|---|---|")
        for estimator in ("closed_form", "variational"):
            print(f"| {estimator} | {r[estimator]:.3f} | {r['train_s']:.3f} | {r[estimator] / r['train_s']:.2f}x |")
    if "selection" in args.sections:
        r = in_fresh_process(args, "selection")
        print(f"\n## Global selection ({r['candidates']:,} candidates, top 15%, scores on {args.device})\n")
        print("| candidates | selected | seconds |\n|---|---|---|")
        print(f"| {r['candidates']:,} | {r['k']:,} | {r['seconds']:.2f} |")
    if "delta" in args.sections:
        rows = delta_backward(args.tiny, args.device)
        out_features, in_features = s["fc1"]
        print(f"\n## Delta gradient: dense vs sparse ({out_features} x {in_features} weight, ms per backward)\n")
        extra = " sampled_addmm ms |" if "sampled_addmm" in rows[0] else ""
        print(f"| active density | dense ms | sparse ms | sparse / dense |{extra}")
        print("|---|---|---|---|" + ("---|" if extra else ""))
        for row in rows:
            line = (
                f"| {row['density']:.2%} | {row['dense'] * 1e3:.2f} | {row['sparse'] * 1e3:.2f} | "
                f"{row['sparse'] / row['dense']:.2f} |"
            )
            if extra:
                line += f" {row['sampled_addmm'] * 1e3:.2f} |"
            print(line)
        from peft_fishertune.sparse_linear import sparse_density

        device_type = args.device.split(":")[0]
        print(
            f"\nImplied auto threshold on {device_type}: {implied_threshold(rows):.2%} "
            f"(configured: {sparse_density(device_type):.2%}; set it with "
            f"peft_fishertune.sparse_linear.set_sparse_density({device_type!r}, value) or "
            f"FISHERTUNE_SPARSE_DENSITY_{device_type.upper()})"
        )


if __name__ == "__main__":
    main()
