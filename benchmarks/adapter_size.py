"""Adapter file size against the information-theoretic lower bound, for random selections on ViT-L shapes.

    python benchmarks/adapter_size.py [--blocks 24] [--value-dtype float32]

For each density, every candidate weight of a ViT-L (24 blocks x q, k, v, o 1024x1024, fc1 4096x1024,
fc2 1024x4096: 302M entries) gets round(density * N) random positions, all active. The file is written
exactly as FisherTune saves it (values, index code, active count per layer, safetensors) and compared with
the same file using plain int32 indices, and with the lower bound: value bytes + log2 C(N, k) bits per tensor.
No model or training is needed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch
from common import VIT_L_SHAPES as SHAPES
from safetensors.torch import save_file

from peft_fishertune.encoding import encode
from peft_fishertune.serialization import VALUE_DTYPES


def lower_bound_bytes(numel: int, k: int) -> float:
    return (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2) / 8


def file_bytes(tensors: dict) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapter_model.safetensors")
        save_file(tensors, path)
        return os.path.getsize(path)


def measure(density: float, blocks: int, value_dtype: torch.dtype, rng) -> dict:
    coded, plain, bound, entries, seconds = {}, {}, 0.0, 0, 0.0
    for block in range(blocks):
        for name, shape in SHAPES.items():
            numel = shape[0] * shape[1]
            k = round(density * numel)
            positions = np.sort(rng.choice(numel, k, replace=False)).astype(np.int64)
            key = f"base_model.model.encoder.layer.{block}.{name}"
            values = torch.randn(k).to(value_dtype)
            active = torch.tensor(k)
            start = time.perf_counter()
            code = encode(torch.from_numpy(positions), k, numel)
            seconds += time.perf_counter() - start
            coded.update(
                {f"{key}.fishertune_values": values, f"{key}.fishertune_code": code, f"{key}.fishertune_active": active}
            )
            plain.update(
                {
                    f"{key}.fishertune_values": values,
                    f"{key}.fishertune_indices": torch.from_numpy(positions.astype(np.int32)),
                    f"{key}.fishertune_active": active,
                }
            )
            bound += k * values.element_size() + lower_bound_bytes(numel, k)
            entries += k
    return {
        "entries": entries,
        "coded": file_bytes(coded),
        "plain": file_bytes(plain),
        "bound": bound,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--value-dtype", choices=sorted(VALUE_DTYPES), default="float32")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dtype = VALUE_DTYPES[args.value_dtype]
    print(f"\nViT-L shapes, {args.blocks} blocks, {args.value_dtype} values, random selections\n")
    print(
        "| density | entries | lower bound MB | FisherTune file MB | ratio | int32-index file MB | ratio | encode s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for density in (0.01, 0.05, 0.15):
        r = measure(density, args.blocks, dtype, rng)
        mb = 1e6
        print(
            f"| {density:.0%} | {r['entries']:,} | {r['bound'] / mb:.1f} | {r['coded'] / mb:.1f} | "
            f"{r['coded'] / r['bound']:.3f}x | {r['plain'] / mb:.1f} | {r['plain'] / r['bound']:.3f}x | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
