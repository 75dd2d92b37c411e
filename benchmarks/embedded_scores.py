"""What DR-FIM's domain term does to the ranking on the embedded benchmark: one calibration after the warm-up.

    python benchmarks/embedded_scores.py [--seed 0]

Calibrates the shipped backbone with the warmed-up head on source batches, the shift at the patch embeddings
(the benchmark's stage 2, default config), then prints ``Scores.describe`` under the default Fisher scale and
under the literal one ('loss'), and how far a second calibration on other batches and shift draws agrees.
"""

import argparse

import peft_fishertune  # noqa: F401
from peft_fishertune.seg import embedded
from peft_fishertune.seg.study import score_diagnostics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
budget = embedded.Budget()
data = embedded.make_data(args.seed, budget)
warm = embedded.warmup(args.seed, budget, data, progress=False)
scores = embedded.calibrate_warm(warm, data[0], budget, args.seed)
print(f"calibration: {scores.meta['used']} batches of {budget.batch_size}, w = {scores.meta['w']:.3f}\n")
print(scores.describe(budget.density_max))
print()
print(scores.rescored(fisher_scale="loss").describe(budget.density_max))
second = embedded.calibrate_warm(warm, data[0], budget, args.seed, calibration_seed=args.seed + 1000)
agreement = score_diagnostics(scores, second, budget.density_max)["between_calibrations"]
print(f"\nA second calibration (other batches and shift draws) against the first, top {budget.density_max:.0%}:")
for kind, label in (("fisher", "F(x)"), ("domain", "domain term"), ("drf", "DR-FIM")):
    a = agreement[kind]
    print(f"  {label:12s} Spearman {a['spearman']:.3f}, top set kept {a['top_overlap']:.1%}")
