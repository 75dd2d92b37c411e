"""Scores: the per-module result of a calibration pass, reusable through a safetensors file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .selection import count_for_density, global_topk

KINDS = ("fisher", "fisher_shifted", "domain", "drf")


@dataclass
class Scores(Mapping):
    """Per-module tensors shaped like each candidate weight.

    - ``fisher``: F(x), the task term gamma * (Lambda_x - tau^-2) (Eq. 13; for the closed form, mean g^2);
    - ``fisher_shifted``: F(x'), the same on domain-shifted batches;
    - ``domain``: the domain term of Eq. 15, gamma * w * |Lambda_x - Lambda_x'| / (min(...) + eps / gamma);
    - ``drf``: the ranking score (1 - lambda) * F + lambda * dF, both terms at global mean 1
      (see ``drfim.combine``).

    As a Mapping it is ``drf``, so ``model.base_model.select(scores)`` ranks by the DR-FIM score.
    ``meta`` records how the scores were made (estimator, gamma, tau, lambda, eps, w, batches, skips).
    """

    fisher: dict[str, torch.Tensor]
    fisher_shifted: dict[str, torch.Tensor]
    domain: dict[str, torch.Tensor]
    drf: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

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

    def summary(self, density: float) -> dict[str, dict[str, float]]:
        """Per module: mean of each score kind and the fraction of its weights in the global top ``density``."""
        total = sum(t.numel() for t in self.drf.values())
        selection = global_topk(self.drf, count_for_density(density, total))
        counts = selection.counts_at(selection.total)
        return {
            name: {
                **{f"mean_{kind}": float(getattr(self, kind)[name].double().mean()) for kind in KINDS},
                "selected_fraction": counts[name] / self.drf[name].numel(),
            }
            for name in self.drf
        }
