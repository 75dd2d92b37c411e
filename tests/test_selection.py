"""Global top-k selection, per-layer allocation, the active prefix and its growth."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_fishertune import FisherTuneConfig, global_topk, vit_target_modules
from peft_fishertune.selection import count_for_density

from .models import build

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names


def test_global_topk_matches_brute_force():
    """The union of per-layer picks is the global top-k, each list best first, counts_at agrees with it."""
    torch.manual_seed(0)
    scores = {"a": torch.rand(7, 5), "b": torch.rand(30), "c": torch.rand(2, 3, 4)}
    k = 20
    selection = global_topk(scores, k)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    threshold = flat.sort(descending=True).values[k - 1]
    assert sum(i.numel() for i in selection.indices.values()) == k
    for name, idx in selection.indices.items():
        picked = scores[name].reshape(-1)[idx]
        assert (picked >= threshold).all()
        assert torch.equal(picked, picked.sort(descending=True).values)
        assert int((scores[name].reshape(-1) > threshold).sum()) <= idx.numel()
    for k_small in (0, 1, 5, 13, 20):
        top = set(flat.sort(descending=True).indices[:k_small].tolist())
        offsets = {"a": 0, "b": 35, "c": 65}
        expected = {
            name: sum(offsets[name] <= t < offsets[name] + scores[name].numel() for t in top) for name in scores
        }
        assert selection.counts_at(k_small) == expected


def test_global_topk_ties_are_deterministic():
    """Equal scores are taken in concatenation order, so repeated calls agree."""
    scores = {"a": torch.ones(10), "b": torch.ones(10)}
    first = global_topk(scores, 12)
    assert first.indices["a"].tolist() == list(range(10)) and first.indices["b"].tolist() == [0, 1]
    second = global_topk(scores, 12)
    assert all(torch.equal(first.indices[n], second.indices[n]) for n in scores)


def test_global_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="'b'.*non-finite"):
        global_topk({"a": torch.rand(3), "b": torch.tensor([1.0, float("nan")])}, 2)
    with pytest.raises(ValueError, match="k=9"):
        global_topk({"a": torch.rand(3)}, 9)


def make(init_selection="none", **kwargs):
    base, x = build("dinov2")
    config = FisherTuneConfig(target_modules=VIT, init_selection=init_selection, **kwargs)
    return get_peft_model(base, config), x


def weight_scores(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(layer.get_base_layer().weight.shape, generator=generator)
        for name, layer in model.base_model._layers().items()
    }


def test_none_selection_starts_empty_and_select_allocates_globally():
    """init_selection='none' has no entries; select() writes counts summing to density_max * N, density_min active."""
    model, _ = make()
    assert model.get_nb_trainable_parameters()[0] == 0
    scores = weight_scores(model)
    counts = model.base_model.select(scores)
    total = model.base_model.num_candidates()
    assert sum(counts.values()) == count_for_density(0.15, total)
    assert model.peft_config["default"].selection_counts == counts
    assert sum(model.base_model.active_counts().values()) == count_for_density(0.01, total)
    expected = global_topk(scores, count_for_density(0.15, total))
    for name, layer in model.base_model._layers().items():
        got, ranked, k = (
            layer.fishertune_indices["default"].long(),
            expected.indices[name],
            layer.active_count("default"),
        )
        assert torch.equal(got[:k], ranked[:k].sort().values)  # the active prefix: the same set, ascending
        assert torch.equal(got[k:], ranked[k:])  # the rest: in rank order, the order of growth
        assert layer.fishertune_values["default"].requires_grad


def test_select_accepts_peft_prefixed_names_and_rejects_mismatches():
    model, _ = make()
    scores = weight_scores(model)
    model.base_model.select({f"base_model.model.{k}": v for k, v in scores.items()})
    name = next(iter(scores))
    with pytest.raises(ValueError, match="missing"):
        model.base_model.select({k: v for k, v in scores.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        model.base_model.select({**scores, name: torch.rand(3)})


def test_set_density_grows_in_global_rank_order_from_zero():
    """Growing the density activates the next entries of the global ranking, each starting at delta 0."""
    model, _ = make()
    scores = weight_scores(model)
    model.base_model.select(scores)
    layers = model.base_model._layers()
    with torch.no_grad():
        for layer in layers.values():
            layer.fishertune_values["default"].fill_(1.0)  # stands for trained values, past the prefix too
    old = model.base_model.active_counts()
    k = model.base_model.set_density(0.08)
    new = model.base_model.active_counts()
    assert sum(new.values()) == k
    selection = global_topk(scores, count_for_density(0.15, model.base_model.num_candidates()))
    assert new == selection.counts_at(k)
    for name, layer in layers.items():
        values = layer.fishertune_values["default"]
        assert (values[: old[name]] == 1).all() and (values[old[name] : new[name]] == 0).all()
    with pytest.raises(ValueError, match="density"):
        model.base_model.set_density(0.5)


def test_entries_past_the_prefix_get_no_gradient():
    """Only the active prefix of each layer's values receives gradient."""
    model, x = make()
    model.base_model.select(weight_scores(model))
    model(x).pow(2).sum().backward()
    for layer in model.base_model._layers().values():
        k = layer.active_count("default")
        grad = layer.fishertune_values["default"].grad
        assert torch.count_nonzero(grad[k:]) == 0


@pytest.mark.parametrize("kind", ["random", "magnitude"])
def test_init_selection_is_seeded_and_fully_active(kind):
    """random/magnitude selections cover density_max, are all active, repeat per seed; random varies by seed."""
    first, _ = make(kind, seed=3)
    second, _ = make(kind, seed=3)
    other, _ = make(kind, seed=4)
    layers = first.base_model._layers()
    counts = first.peft_config["default"].selection_counts
    assert first.base_model.active_counts() == counts
    same = all(
        torch.equal(
            layer.fishertune_indices["default"], second.base_model.model.get_submodule(n).fishertune_indices["default"]
        )
        for n, layer in layers.items()
    )
    differs = any(
        not torch.equal(
            layer.fishertune_indices["default"], other.base_model.model.get_submodule(n).fishertune_indices["default"]
        )
        for n, layer in layers.items()
    )
    assert same and differs == (kind == "random")


def test_magnitude_selection_picks_largest_weights():
    model, _ = make("magnitude")
    weights = torch.cat(
        [layer.get_base_layer().weight.abs().reshape(-1) for layer in model.base_model._layers().values()]
    )
    k = sum(model.peft_config["default"].selection_counts.values())
    chosen = torch.cat(
        [
            layer.get_base_layer().weight.abs().reshape(-1)[layer.fishertune_indices["default"].long()]
            for layer in model.base_model._layers().values()
        ]
    )
    assert chosen.min() >= weights.sort(descending=True).values[k - 1]


def test_selection_refused_while_merged():
    model, _ = make("random")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.base_model.select(weight_scores(model))


def test_layer_keeps_no_dense_copy_of_its_weight():
    """After forward and backward a layer stores no tensor as large as its weight besides the weight itself."""
    model, x = make("random")
    model(x).pow(2).sum().backward()
    for layer in model.base_model._layers().values():
        weight = layer.get_base_layer().weight
        stored = list(layer.parameters()) + list(layer.buffers())
        stored += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        stored += [t for d in (layer._merge_backup,) for t in d.values()]
        large = [t for t in stored if t.numel() >= weight.numel() and t is not weight]
        assert not large


@pytest.mark.parametrize("k", [1, 777, 20_000, 42_799])
def test_threshold_path_equals_exact_path(k):
    """The sampled-threshold selection gives the exact selection and order, ties included."""
    from peft_fishertune.selection import _exact_topk, _flat_scores

    torch.manual_seed(0)
    scores = {
        "a": (torch.rand(30, 700) * 50).floor(),
        "b": (torch.rand(20_000) * 50).floor(),
        "c": torch.rand(3, 100, 6),
    }  # many ties in a and b
    fast = global_topk(scores, k, sample_size=1000)
    exact = _exact_topk(list(scores), [_flat_scores(n, s) for n, s in scores.items()], k)
    assert torch.equal(fast.order, exact.order)
    for name in scores:
        assert torch.equal(fast.indices[name], exact.indices[name]), name


def test_per_matrix_allocation_gives_every_matrix_the_same_density():
    """allocation='per_matrix': each matrix holds density * its size (to within two entries), at density_max and
    after growth, and inside each matrix the chosen entries are its best-scored ones. The same scores under the
    global allocation pile the set into the one matrix whose scores are largest."""
    model, _ = make(allocation="per_matrix")
    scores = weight_scores(model)
    loud = next(iter(scores))
    scores[loud] = scores[loud] + 10.0  # globally, this matrix would take everything
    model.base_model.select(scores)
    for density in (0.01, 0.07):
        model.base_model.set_density(density)
        for name, layer in model.base_model._layers().items():
            size = layer.get_base_layer().weight.numel()
            assert abs(layer.active_count("default") - density * size) <= 2, (name, density)
    for name, layer in model.base_model._layers().items():
        size = layer.get_base_layer().weight.numel()
        chosen = layer.fishertune_indices["default"].long()
        assert abs(chosen.numel() - 0.15 * size) <= 2
        assert set(chosen.tolist()) == set(scores[name].reshape(-1).topk(chosen.numel()).indices.tolist())
    glob, _ = make()
    glob.base_model.select(scores)
    piled = glob.base_model._layers()[loud]
    assert piled.num_entries("default") == piled.get_base_layer().weight.numel()


def test_reselect_keeps_the_active_entries_and_reranks_the_rest():
    """select(keep_active=True): the active entries stay active with their values; the rest of density_max is the
    best of the new scores among the entries not active; growth then follows the new ranking."""
    model, _ = make()
    model.base_model.select(weight_scores(model, seed=0))
    model.base_model.set_density(0.05)
    layers = model.base_model._layers()
    with torch.no_grad():
        for layer in layers.values():
            values = layer.fishertune_values["default"]
            values[: layer.active_count("default")] = torch.randn(layer.active_count("default"))
    before = {name: layer.active_entries("default") for name, layer in layers.items()}
    new_scores = weight_scores(model, seed=1)
    total = model.base_model.num_candidates()
    counts = model.base_model.select(new_scores, keep_active=True)
    assert sum(counts.values()) == count_for_density(0.15, total)
    rest = {}
    for name, layer in layers.items():
        indices, values = layer.active_entries("default")
        assert torch.equal(indices, before[name][0]) and torch.equal(values, before[name][1])
        rest[name] = new_scores[name].reshape(-1).clone()
        rest[name][indices] = -1.0  # the kept entries are out of the new ranking
    expected = global_topk(rest, count_for_density(0.15, total) - sum(i.numel() for i, _ in before.values()))
    for name, layer in layers.items():
        tail = layer.fishertune_indices["default"][layer.active_count("default") :].long()
        assert torch.equal(tail, expected.indices[name])
    model.base_model.set_density(0.08)
    assert sum(model.base_model.active_counts().values()) == count_for_density(0.08, total)
