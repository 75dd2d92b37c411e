"""Scores: the per-module result of a calibration pass, reusable through a safetensors file.

The ranking is a function of F(x), F(x'), the shift weight w and five settings (gamma, tau, lambda, eps and
the Fisher scale), so one calibration serves any of those settings: ``scores.rescored(lam=1.0)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .drfim import combine, domain_term_from_fisher, fisher_unit
from .selection import count_for_density, global_topk

KINDS = ("fisher", "fisher_shifted", "domain", "drf")
SETTINGS = ("gamma", "tau", "lam", "eps", "fisher_scale")


@dataclass
class Scores(Mapping):
    """Per-module tensors shaped like each candidate weight.

    - ``fisher``: F(x), the task term gamma * (Lambda_x - tau^-2) (Eq. 13; for the closed form, mean g^2), in
      the units of the loss as it was returned;
    - ``fisher_shifted``: F(x'), the same on domain-shifted batches;
    - ``domain``: the domain term of Eq. 15, gamma * w * |F - F'| / (min(F, F') + eps + gamma * tau^-2), with
      F and F' first divided by the unit of ``meta["fisher_scale"]`` (``drfim.fisher_unit``);
    - ``drf``: the ranking score (1 - lambda) * F + lambda * dF, both terms at global mean 1
      (see ``drfim.combine``).

    As a Mapping it is ``drf``, so ``model.base_model.select(scores)`` ranks by the DR-FIM score.
    ``meta`` records how the scores were made (estimator, gamma, tau, lambda, eps, Fisher scale and unit, w,
    batches, skips).
    """

    fisher: dict[str, torch.Tensor]
    fisher_shifted: dict[str, torch.Tensor]
    domain: dict[str, torch.Tensor]
    drf: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_fisher(
        cls,
        fisher: dict[str, torch.Tensor],
        fisher_shifted: dict[str, torch.Tensor],
        w: float,
        *,
        gamma: float,
        tau: float,
        lam: float,
        eps: float,
        fisher_scale: str,
        meta: dict | None = None,
    ) -> Scores:
        """The domain term and the DR-FIM ranking score of F(x), F(x') and the mean shift weight w."""
        unit = fisher_unit(fisher, fisher_scale)
        domain = {
            name: domain_term_from_fisher(f / unit, fisher_shifted[name] / unit, w, gamma, tau, eps)
            for name, f in fisher.items()
        }
        settings = {"gamma": gamma, "tau": tau, "lam": lam, "eps": eps, "fisher_scale": fisher_scale}
        meta = {**(meta or {}), **settings, "fisher_unit": unit, "w": w}
        return cls(fisher, fisher_shifted, domain, combine(fisher, domain, lam), meta)

    def rescored(self, **settings) -> Scores:
        """The same F(x), F(x') and w ranked under other settings (any of gamma, tau, lam, eps, fisher_scale).

        Files written before the Fisher scale existed were made with the loss as returned ("loss").
        """
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"rescored() takes {SETTINGS}, got {sorted(unknown)}")
        current = {"fisher_scale": "loss", **{k: self.meta[k] for k in SETTINGS if k in self.meta}}
        missing = [k for k in SETTINGS if k not in current and k not in settings]
        if missing:
            raise ValueError(f"these scores do not record {missing}; pass them to rescored()")
        merged = {**current, **{k: v for k, v in settings.items() if v is not None}}
        return Scores.from_fisher(self.fisher, self.fisher_shifted, self.meta["w"], **merged, meta=self.meta)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.drf[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.drf)

    def __len__(self) -> int:
        return len(self.drf)

    def save(self, path) -> None:
        """Write every kind of score to one safetensors file (metadata as JSON in its header)."""
        tensors = {f"{kind}/{name}": t.contiguous() for kind in KINDS for name, t in getattr(self, kind).items()}
        save_file(tensors, str(path), metadata={"fishertune_scores": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> Scores:
        """Read a file written by ``save``; raise ValueError naming the file if it is not one."""
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors scores file ({error})") from error
        if "fishertune_scores" not in header:
            raise ValueError(f"{path}: not a FisherTune scores file (no 'fishertune_scores' metadata)")
        parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in parts:
                raise ValueError(f"{path}: unexpected entry {key!r}")
            parts[kind][name] = tensor
        names = set(parts["drf"])
        if any(set(part) != names for part in parts.values()):
            raise ValueError(f"{path}: the score kinds do not cover the same modules")
        return cls(**parts, meta=json.loads(header["fishertune_scores"]))

    # ------------------------------------------------------------------ diagnostics
    def summary(self, density: float = 0.15, sample_size: int = 1 << 20) -> dict:
        """Did the domain term change the selection? Global numbers, then where each term puts its weights.

        - ``spearman_fisher_domain``: rank correlation of F(x) and the domain term D (1: D copies F), over all
          weights, or a seeded sample of ``sample_size`` of them when there are more;
        - ``overlap_fisher_drf``: the fraction of the top ``density`` set by F that the top set by DR-FIM keeps
          (1: the domain term changed nothing); ``overlap_fisher_domain`` the same for D alone;
        - ``above_floor``: the fraction of weights whose min(F, F') exceeds the prior floor gamma * tau^-2 (in
          the Fisher scale's units). Below it D is an absolute difference |F - F'| / floor that follows F;
          above it D is the relative change of the weight's Fisher under the shift;
        - ``median_shift_ratio``: the median of F(x') / F(x) over the weights with F(x) > 0;
        - ``modules``: per module, the mean of each kind and the fraction of its weights in the global top
          ``density`` by F (``fisher_selected``), by D (``domain_selected``) and by DR-FIM (``drf_selected``).
        """
        total = sum(t.numel() for t in self.drf.values())
        k = count_for_density(density, total)
        tops = {kind: global_topk(getattr(self, kind), k) for kind in ("fisher", "domain", "drf")}
        fisher_top = tops["fisher"].indices

        def overlap(kind):
            other = tops[kind].indices
            return sum(int(torch.isin(fisher_top[n], other[n]).sum()) for n in self.drf) / max(k, 1)

        sample = _sample(self, sample_size)
        unit = self.meta.get("fisher_unit", 1.0)
        floor = self.meta["gamma"] * self.meta["tau"] ** -2 if "gamma" in self.meta else float("nan")
        low = torch.minimum(sample["fisher"], sample["fisher_shifted"]) / unit
        positive = sample["fisher"] > 0
        counts = {kind: tops[kind].counts_at(k) for kind in tops}
        return {
            "density": density,
            "fisher_scale": self.meta.get("fisher_scale", "loss"),
            "floor": floor,
            "spearman_fisher_domain": _spearman(sample["fisher"], sample["domain"]),
            "overlap_fisher_drf": overlap("drf"),
            "overlap_fisher_domain": overlap("domain"),
            "above_floor": float((low > floor).double().mean()),
            "median_shift_ratio": float((sample["fisher_shifted"][positive] / sample["fisher"][positive]).median())
            if positive.any()
            else float("nan"),
            "modules": {
                name: {
                    **{f"mean_{kind}": float(getattr(self, kind)[name].double().mean()) for kind in KINDS},
                    **{f"{kind}_selected": counts[kind][name] / self.drf[name].numel() for kind in counts},
                }
                for name in self.drf
            },
        }

    def describe(self, density: float = 0.15) -> str:
        """``summary`` as a few lines of text, each saying how to read its number."""
        s = self.summary(density)
        return "\n".join(
            [
                f"DR-FIM diagnostics (fisher_scale={s['fisher_scale']!r}, lambda={self.meta.get('lam')}, "
                f"top {density:.0%}):",
                f"  Spearman(F, domain term)         {s['spearman_fisher_domain']:6.3f}   (1: D copies F)",
                f"  top by F kept by DR-FIM          {s['overlap_fisher_drf']:6.1%}   (100%: it changed nothing)",
                f"  top by F kept by the domain term {s['overlap_fisher_domain']:6.1%}",
                f"  weights above the prior floor    {s['above_floor']:6.1%}   (0%: D is |F - F'| / floor)",
                f"  median F(x') / F(x)              {s['median_shift_ratio']:6.3f}",
            ]
        )


def _sample(scores: Scores, size: int) -> dict[str, torch.Tensor]:
    """The same entries of F, F' and D: all of them, or a seeded sample spread over modules by size."""
    total = sum(t.numel() for t in scores.drf.values())
    generator = torch.Generator().manual_seed(0)
    picks = {}
    for name, t in scores.drf.items():
        if total <= size:
            picks[name] = None
        else:
            picks[name] = torch.randint(t.numel(), (max(1, round(size * t.numel() / total)),), generator=generator)

    def gather(kind):
        parts = []
        for name, t in getattr(scores, kind).items():
            flat = t.detach().reshape(-1).double().cpu()
            parts.append(flat if picks[name] is None else flat[picks[name]])
        return torch.cat(parts)

    return {kind: gather(kind) for kind in ("fisher", "fisher_shifted", "domain")}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation with ordinal ranks (ties by position)."""
    if a.numel() < 2:
        return float("nan")
    ra = torch.argsort(torch.argsort(a, stable=True)).double()
    rb = torch.argsort(torch.argsort(b, stable=True)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
