"""How DR-FIM's two terms relate on the embedded benchmark: one calibration after the seed-0 warm-up.

    python benchmarks/embedded_scores.py

Prints the median F(x')/F(x), the spread of F/mean(F) and D/mean(D), the Spearman correlation of F and the
domain term D, and the overlap of the top 15% by F, by D and by DR-FIM (lambda = 0.5).
"""

import numpy as np
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

import peft_fishertune  # noqa: F401
from peft_fishertune import calibrate
from peft_fishertune.seg import embedded as E

b = E.Budget()
data = E.make_data(0, b)
model, _ = E.warmup(0, b, data, progress=False)
pm = get_peft_model(model, E.fishertune_config("fishertune", b, 0))
loader = DataLoader(data[0], batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
s = calibrate(pm, loader, 25, progress=False)
F = torch.cat([t.flatten() for t in s.fisher.values()])
Fs = torch.cat([t.flatten() for t in s.fisher_shifted.values()])
D = torch.cat([t.flatten() for t in s.domain.values()])
print("median F(x')/F(x):", (Fs / F.clamp_min(1e-30)).median().item())
sample = F[torch.randperm(len(F), generator=torch.Generator().manual_seed(0))[:200000]]
print("F quantiles 1%, 50%, 99%:", [f"{torch.quantile(sample, q).item():.2e}" for q in (0.01, 0.5, 0.99)])
for name, t in (("F", F), ("D", D)):
    n = t / t.mean()
    print(
        name,
        "quantiles of x/mean",
        [round(torch.quantile(n[torch.randperm(len(n))[:200000]], q).item(), 3) for q in (0.5, 0.85, 0.99, 0.999)],
        "max",
        n.max().item(),
    )
k = int(0.15 * len(F))


def top(x):
    return set(torch.topk(x, k).indices.tolist())


tF, tD = top(F / F.mean()), top(D / D.mean())
t5 = top(0.5 * F / F.mean() + 0.5 * D / D.mean())
print("overlap top15%: F vs DRF(0.5)", len(tF & t5) / k, "F vs D", len(tF & tD) / k)
rF = F.argsort().argsort().float()
rD = D.argsort().argsort().float()
print("Spearman correlation of F and D:", np.corrcoef(rF.numpy(), rD.numpy())[0, 1])
