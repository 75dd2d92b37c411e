"""One global top-k over the scores of all candidate weights, split into per-layer sorted index lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """The result of a global selection.

    ``indices[name]`` holds the flat positions chosen in that module, best score first. ``order`` lists, for
    the k selected entries in global rank order, which module (position in ``names``) each belongs to, so
    that the number of entries a module holds among the global top k' <= k is ``bincount(order[:k'])``.
    """

    names: list[str]
    indices: dict[str, torch.Tensor]  # name -> (k_l,) int64, best first
    order: torch.Tensor  # (k,) int32 module ids in global rank order

    def counts_at(self, k: int) -> dict[str, int]:
        """Entries of each module among the global top ``k``."""
        counts = torch.bincount(self.order[:k].long(), minlength=len(self.names))
        return dict(zip(self.names, counts.tolist()))


def count_for_density(density: float, total: int) -> int:
    """Number of entries a density stands for: round(density * total), at least 1 when density > 0."""
    if density <= 0 or total == 0:
        return 0
    return min(total, max(1, round(density * total)))


def global_topk(scores: Mapping[str, torch.Tensor], k: int) -> Selection:
    """Select the ``k`` highest scores over all tensors of ``scores`` together.

    Ties are broken by position in the concatenation of the tensors in the mapping's order, which makes the
    result a deterministic function of the scores.
    """
    names = list(scores)
    flat = []
    for name in names:
        score = scores[name].detach().reshape(-1).float().cpu()
        if not torch.isfinite(score).all():
            raise ValueError(f"scores for module {name!r} contain non-finite values")
        flat.append(score)
    sizes = torch.tensor([s.numel() for s in flat], dtype=torch.int64)
    total = int(sizes.sum())
    if not 0 <= k <= total:
        raise ValueError(f"cannot select k={k} entries out of {total} candidate weights")
    everything = torch.cat(flat) if flat else torch.empty(0)  # (N,)
    # A stable descending sort gives the lowest position among equal scores first.
    ranked = torch.sort(everything, descending=True, stable=True).indices[:k]  # (k,) global positions
    offsets = torch.cumsum(sizes, 0) - sizes  # (L,)
    module_ids = torch.searchsorted(torch.cumsum(sizes, 0), ranked, right=True)  # (k,)
    local = ranked - offsets[module_ids]
    grouped = torch.sort(module_ids, stable=True).indices  # rank order kept inside each module
    per_module = torch.bincount(module_ids, minlength=len(names)).tolist()
    split = torch.split(local[grouped], per_module)
    return Selection(
        names=names,
        indices={name: part.clone() for name, part in zip(names, split)},
        order=module_ids.to(torch.int32),
    )


def initial_scores(weights: Mapping[str, torch.Tensor], kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Scores for a selection made without calibration: ``"random"`` (seeded uniform) or ``"magnitude"`` (|w|)."""
    if kind == "magnitude":
        return {name: w.detach().abs().float().cpu() for name, w in weights.items()}
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}
    raise ValueError(f"init_selection must be 'random' or 'magnitude' to make scores, got {kind!r}")
