"""Backward of SparseDeltaLinear: gather from the dense weight gradient vs compute the selected entries only.

    python benchmarks/sparse_backward.py [--tokens 514] [--repeats 5]

One ViT-B MLP weight (3072 x 768), a batch of 2 images of 257 tokens, deltas at several densities. Prints
the median backward time of each mode (markdown); ``sparse_linear.SPARSE_DENSITY["cpu"]`` follows from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peft_fishertune.sparse_linear import sparse_delta_linear


def backward_seconds(mode, density, tokens, repeats):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 768, generator=generator)
    k = max(1, int(density * weight.numel()))
    positions = torch.randperm(weight.numel(), generator=generator)[:k]
    values = torch.zeros(k, requires_grad=True)
    x = torch.randn(tokens, 768, generator=generator, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        out = sparse_delta_linear(x, weight, None, positions, values, mode)
        start = time.perf_counter()
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=514)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"\n3072 x 768 weight, {args.tokens} tokens, {torch.get_num_threads()} threads\n")
    print("| density | dense backward ms | sparse backward ms | sparse / dense |")
    print("|---|---|---|---|")
    for density in (0.001, 0.01, 0.05, 0.15):
        dense = backward_seconds("dense", density, args.tokens, args.repeats)
        sparse = backward_seconds("sparse", density, args.tokens, args.repeats)
        print(f"| {density:.1%} | {dense * 1e3:.1f} | {sparse * 1e3:.1f} | {sparse / dense:.2f} |")


if __name__ == "__main__":
    main()
