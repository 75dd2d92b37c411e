"""One global top-k over the scores of all candidate weights, split into per-layer sorted index lists."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch


class Selection:
    """The result of a global selection.

    ``indices[name]`` holds the flat positions chosen in that module, best score first (empty once the
    layers hold them), and ``scores[name]`` their scores, descending. The global ranking is: higher score
    first, equal scores by module order, then position. ``counts_at(k)`` says how many of each module's
    entries lie in the global top k, with no global sort. The scores are kept as int32 keys whose integer
    order is the score order (4 bytes an entry).
    """

    def __init__(self, names: list[str], indices: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]):
        self.names = list(names)
        self.indices = indices
        self._keys = {name: _sortable(-scores[name].float() + 0.0) for name in self.names}  # ascending

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        return {name: -_sortable(key).view(torch.float32) for name, key in self._keys.items()}

    @property
    def total(self) -> int:
        return sum(key.numel() for key in self._keys.values())

    def counts_at(self, k: int) -> dict[str, int]:
        """Entries of each module among the global top ``k`` (0 <= k <= total)."""
        if not 0 <= k <= self.total:
            raise ValueError(f"k={k} outside [0, {self.total}]")
        if k == 0:
            return dict.fromkeys(self.names, 0)
        # Bisection over the keys for the k-th smallest key, i.e. the k-th best score.
        filled = [key for key in self._keys.values() if key.numel()]
        low, high = min(int(key[0]) for key in filled), max(int(key[-1]) for key in filled)
        while low < high:
            middle = (low + high) // 2
            if self._count_at_most(middle) >= k:
                high = middle
            else:
                low = middle + 1
        probe = torch.tensor([low], dtype=torch.int32)
        better = {n: int(torch.searchsorted(self._keys[n], probe, right=False)) for n in self.names}
        ties_left = k - sum(better.values())
        counts = {}
        for name in self.names:
            ties = int(torch.searchsorted(self._keys[name], probe, right=True)) - better[name]
            take = min(ties, ties_left)
            ties_left -= take
            counts[name] = better[name] + take
        return counts

    def _count_at_most(self, key: int) -> int:
        probe = torch.tensor([key], dtype=torch.int32)
        return sum(int(torch.searchsorted(v, probe, right=True)) for v in self._keys.values())

    @property
    def order(self) -> torch.Tensor:
        """Module ids of all selected entries in global rank order (a global sort: for tests and inspection)."""
        keys = torch.cat([self._keys[n] for n in self.names])
        module_ids = torch.repeat_interleave(
            torch.arange(len(self.names), dtype=torch.int32), torch.tensor([self._keys[n].numel() for n in self.names])
        )
        return module_ids[torch.sort(keys, stable=True).indices]


def _sortable(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float32 order of ``values`` (its own inverse on the bits)."""
    bits = values.contiguous().view(torch.int32) if values.dtype == torch.float32 else values
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def count_for_density(density: float, total: int) -> int:
    """Number of entries a density stands for: round(density * total), at least 1 when density > 0."""
    if density <= 0 or total == 0:
        return 0
    return min(total, max(1, round(density * total)))


def global_topk(scores: Mapping[str, torch.Tensor], k: int, sample_size: int = 1 << 20) -> Selection:
    """Select the ``k`` highest scores over all tensors of ``scores`` together.

    Ranking: higher score first; equal scores in the order of the concatenation of the tensors (mapping
    order, then flat position), which makes the result a deterministic function of the scores.

    Above ``4 * sample_size`` scores no global sort is made: a seeded sample brackets the k-th largest
    score, one pass counts the scores above the bracket and collects those inside it, and sorting that
    small band gives the exact threshold T. Each tensor then keeps its scores above T (and the first ties
    at T), and only the k selected scores are sorted for the global order.
    """
    names = list(scores)
    flat = [_flat_scores(name, scores[name]) for name in names]
    sizes = [f.numel() for f in flat]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot select k={k} entries out of {total} candidate weights")
    if total <= 4 * sample_size:
        return _exact_topk(names, flat, k)
    threshold, above = _kth_largest(flat, k, sample_size)
    ties_left = k - above
    take = [0] * len(flat)
    if ties_left > 0:  # equal scores at the threshold go to the earliest modules, then positions
        for i, ties in enumerate(_parallel(lambda f: int((f == threshold).sum()), flat)):
            take[i] = min(ties, ties_left)
            ties_left -= take[i]

    def pick(item):
        f, n_ties = item
        chosen = torch.nonzero(f > threshold).squeeze(1)
        if n_ties:
            ties = torch.nonzero(f == threshold).squeeze(1)[:n_ties]
            chosen = torch.cat([chosen, ties]).sort().values
        ranked_scores, ranked = torch.sort(f[chosen], descending=True, stable=True)  # ties keep position order
        return chosen[ranked], ranked_scores

    picked = _parallel(pick, list(zip(flat, take)))
    return Selection(
        names=names, indices={n: p[0] for n, p in zip(names, picked)}, scores={n: p[1] for n, p in zip(names, picked)}
    )


def _parallel(function, items):
    """``[function(item) for item in items]`` on torch's intra-op threads (each call releases the GIL)."""
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(function, items))


def _flat_scores(name: str, score: torch.Tensor) -> torch.Tensor:
    flat = score.detach().reshape(-1).float().cpu()
    if not torch.isfinite(flat).all():
        raise ValueError(f"scores for module {name!r} contain non-finite values")
    return flat


def _exact_topk(names, flat, k) -> Selection:
    sizes = torch.tensor([f.numel() for f in flat], dtype=torch.int64)
    everything = torch.cat(flat) if flat else torch.empty(0)  # (N,)
    # A stable descending sort gives the lowest position among equal scores first.
    ranked = torch.sort(everything, descending=True, stable=True).indices[:k]  # (k,) global positions
    offsets = torch.cumsum(sizes, 0) - sizes  # (L,)
    module_ids = torch.searchsorted(torch.cumsum(sizes, 0), ranked, right=True)  # (k,)
    local = ranked - offsets[module_ids]
    grouped = torch.sort(module_ids, stable=True).indices  # rank order kept inside each module
    per_module = torch.bincount(module_ids, minlength=len(names)).tolist()
    split = torch.split(local[grouped], per_module)
    indices = {name: part.clone() for name, part in zip(names, split)}
    return Selection(names=names, indices=indices, scores={n: f[indices[n]] for n, f in zip(names, flat)})


def kth_largest(tensors: list[torch.Tensor], k: int, sample_size: int = 1 << 20) -> float:
    """The exact k-th largest value over all ``tensors`` (1 <= k <= their total size), without a global sort
    above ``4 * sample_size`` values."""
    flat = [_flat_scores(str(i), t) for i, t in enumerate(tensors)]
    total = sum(f.numel() for f in flat)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    if total <= 4 * sample_size:
        return float(torch.cat(flat).kthvalue(total - k + 1).values)
    return _kth_largest(flat, k, sample_size)[0]


def _kth_largest(flat: list[torch.Tensor], k: int, sample_size: int) -> tuple[float, int]:
    """The exact k-th largest value T over all tensors, found through a sampled bracket, and the count above T."""
    total = sum(f.numel() for f in flat)
    generator = torch.Generator().manual_seed(0)
    sample = (
        torch.cat(
            [
                f[torch.randint(f.numel(), (max(1, round(sample_size * f.numel() / total)),), generator=generator)]
                for f in flat
            ]
        )
        .sort(descending=True)
        .values
    )  # (m,)
    m = sample.numel()
    fraction = k / total
    margin = 6 * (fraction * (1 - fraction) * m) ** 0.5 + 16
    for _ in range(4):
        high = float(sample[max(0, int(fraction * m - margin))])
        low = float(sample[min(m - 1, int(fraction * m + margin))])
        above_high = sum(_parallel(lambda f, high=high: int((f > high).sum()), flat))
        inside = _parallel(lambda f, low=low, high=high: f[(f >= low) & (f <= high)], flat)
        band = torch.cat(inside).sort(descending=True).values
        if above_high < k <= above_high + band.numel():
            threshold = band[k - above_high - 1]
            return float(threshold), above_high + int((band > threshold).sum())
        margin *= 4
    everything = torch.cat(flat)
    threshold = torch.topk(everything, k).values[-1]
    return float(threshold), int((everything > threshold).sum())


def initial_scores(weights: Mapping[str, torch.Tensor], kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Scores for a selection made without calibration: ``"random"`` (seeded uniform) or ``"magnitude"`` (|w|)."""
    if kind == "magnitude":
        return {name: w.detach().abs().float().cpu() for name, w in weights.items()}
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}
    raise ValueError(f"init_selection must be 'random' or 'magnitude' to make scores, got {kind!r}")
