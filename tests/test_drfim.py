"""Eq. 12-15 and the lambda combination on hand-made tensors; the DSU-style shift by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peft_fishertune import DomainShift
from peft_fishertune.drfim import (
    combine,
    domain_term_eq15,
    domain_term_from_fisher,
    drf_eq14,
    drf_eq15,
    fisher_from_precision,
    fisher_unit,
    perturbation_weight,
    precision_from_fisher,
)
from peft_fishertune.selection import kth_largest

D = torch.float64


def test_closed_form_precision_eq12_and_back_eq13():
    """gamma * Lambda = F + gamma * tau^-2 (Eq. 12) and F = gamma * (Lambda - tau^-2) (Eq. 13), exactly."""
    fisher = torch.tensor([0.0, 1e-3, 2.0, 50.0], dtype=D)
    gamma, tau = 0.5, 0.25
    precision = precision_from_fisher(fisher, gamma, tau)
    torch.testing.assert_close(gamma * precision, fisher + gamma * tau**-2, rtol=0, atol=0)
    torch.testing.assert_close(precision, torch.tensor([16.0, 16.002, 20.0, 116.0], dtype=D), rtol=1e-15, atol=0)
    torch.testing.assert_close(fisher_from_precision(precision, gamma, tau), fisher, rtol=1e-12, atol=1e-15)


def test_eq14_by_hand_including_zero_minimum():
    """F + w * |F - F'| / (min(F, F') + eps), with a min of 0 handled by eps."""
    f = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=D)
    fs = torch.tensor([1.0, 1.0, 4.0, 0.0], dtype=D)
    got = drf_eq14(f, fs, w=0.5, eps=0.1)
    expected = torch.tensor([1.0, 2.0 + 0.5 * 1 / 1.1, 0.0 + 0.5 * 4 / 0.1, 3.0 + 0.5 * 3 / 0.1], dtype=D)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_eq15_by_hand_including_eps():
    """gamma * (Lambda_x - tau^-2 + w * |Lambda_x - Lambda_x'| / (min + eps / gamma)) on hand values."""
    gamma, tau, eps, w = 0.5, 1.0, 0.2, 2.0
    px = torch.tensor([1.0, 3.0, 5.0], dtype=D)  # tau^-2 = 1
    ps = torch.tensor([1.0, 1.0, 2.0], dtype=D)
    expected = torch.tensor(
        [0.5 * (0.0 + 0.0), 0.5 * (2.0 + 2.0 * 2.0 / (1.0 + 0.4)), 0.5 * (4.0 + 2.0 * 3.0 / (2.0 + 0.4))], dtype=D
    )
    torch.testing.assert_close(drf_eq15(px, ps, w, gamma, tau, eps), expected, rtol=1e-14, atol=0)
    domain = domain_term_eq15(px, ps, w, gamma, eps)
    torch.testing.assert_close(domain, expected - fisher_from_precision(px, gamma, tau), rtol=1e-14, atol=1e-15)


def test_fisher_form_of_domain_term_equals_eq15():
    """The F form equals Eq. 15's term of Lambda = F / gamma + tau^-2 (float64), F = 0 included.

    F stays above 1e-4 here: below that even float64 loses digits in Lambda - tau^-2.
    """
    gamma, tau, eps, w = 0.01, 0.01, 1e-8, 1.7
    f = torch.tensor([0.0, 1e-4, 3e-3, 0.5, 4.0], dtype=D)
    fs = torch.tensor([2e-4, 0.0, 1e-3, 0.7, 4.0], dtype=D)
    via_precision = domain_term_eq15(
        precision_from_fisher(f, gamma, tau), precision_from_fisher(fs, gamma, tau), w, gamma, eps
    )
    torch.testing.assert_close(domain_term_from_fisher(f, fs, w, gamma, tau, eps), via_precision, rtol=1e-6, atol=0)


def test_fisher_form_survives_float32():
    """In float32 the precision form loses F ~ 1e-8 next to tau^-2 = 1e4; the F form keeps it."""
    f = torch.tensor([1e-8, 3e-8])
    fs = torch.tensor([2e-8, 1e-8])
    precise = domain_term_from_fisher(f.double(), fs.double(), 1.0, 0.01, 0.01, 1e-8)
    torch.testing.assert_close(
        domain_term_from_fisher(f, fs, 1.0, 0.01, 0.01, 1e-8).double(), precise, rtol=1e-5, atol=0
    )
    assert fisher_from_precision(precision_from_fisher(f, 0.01, 0.01), 0.01, 0.01).abs().max() == 0


def test_perturbation_weight():
    assert perturbation_weight(0.0, 0.0) == 1.0
    assert perturbation_weight(1.0, -0.5) == pytest.approx(math.exp(-0.5), rel=1e-12)


def test_combine_normalises_each_term_by_its_global_mean():
    """(1 - lam) * F / mean(F) + lam * dF / mean(dF), means over all modules; lam 0 and 1 keep one term."""
    task = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 4.0])}  # mean 2
    domain = {"a": torch.tensor([10.0, 0.0]), "b": torch.tensor([30.0, 0.0])}  # mean 10
    got = combine(task, domain, lam=0.25)
    torch.testing.assert_close(got["a"], torch.tensor([0.75 * 0.5 + 0.25 * 1.0, 0.75 * 1.5]))
    torch.testing.assert_close(got["b"], torch.tensor([0.25 * 3.0, 0.75 * 2.0]))
    torch.testing.assert_close(combine(task, domain, 0.0)["b"], task["b"] / 2)
    zero = {"a": torch.zeros(2), "b": torch.zeros(2)}
    torch.testing.assert_close(combine(task, zero, 0.5)["a"], 0.5 * task["a"] / 2)


def test_combined_ranking_ignores_the_loss_scale_for_eq14():
    """Scaling the loss by c scales F by c^2; with eps negligible the combined Eq. 14 ranking is unchanged."""
    torch.manual_seed(0)
    f, fs = torch.rand(50, dtype=D) + 0.1, torch.rand(50, dtype=D) + 0.1
    ranks = []
    for c in (1.0, 30.0):
        task, shifted = {"m": f * c**2}, {"m": fs * c**2}
        ratio = {"m": drf_eq14(task["m"], shifted["m"], 1.0, 1e-12) - task["m"]}
        ranks.append(combine(task, ratio, 0.5)["m"].argsort())
    assert torch.equal(ranks[0], ranks[1])


def test_shift_matches_the_formula_by_hand():
    """f' = sigma' (f - mu) / sigma + mu' with per-channel batch spreads, for (B, C, H, W) and (B, N, C)."""
    torch.manual_seed(0)
    f = torch.randn(3, 2, 4, 5, dtype=D) * torch.tensor([1.0, 3.0], dtype=D)[None, :, None, None]
    shift = DomainShift(strength=0.5, seed=0)
    draw = shift.draw(7)
    mu = f.mean(dim=(2, 3), keepdim=True)
    sigma = (f.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
    new_mu = mu + 0.5 * draw.eps_mu * mu.std(dim=0, keepdim=True, unbiased=False)
    new_sigma = sigma + 0.5 * draw.eps_sigma * sigma.std(dim=0, keepdim=True, unbiased=False)
    expected = new_sigma * (f - mu) / sigma + new_mu
    torch.testing.assert_close(shift.shift(f, draw), expected.float().double(), rtol=1e-5, atol=1e-5)
    tokens = f.flatten(2).transpose(1, 2)  # (B, N, C)
    torch.testing.assert_close(shift.shift(tokens, draw), expected.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_shift_draws_are_seeded_per_batch_index():
    a, b = DomainShift(seed=3), DomainShift(seed=3)
    assert a.draw(5) == b.draw(5) and a.draw(5) != a.draw(6) and a.draw(5) != DomainShift(seed=4).draw(5)
    assert a.draw(5).weight == pytest.approx(math.exp(-(a.draw(5).eps_mu + a.draw(5).eps_sigma)))


def test_shift_edge_cases():
    """Strength 0 is the identity; a batch of one has no spread (identity); 2-D input is refused."""
    x = torch.randn(2, 3, 4, 4)
    assert DomainShift(strength=0.0).shift(x, DomainShift().draw(0)) is x
    one = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(DomainShift().shift(one, DomainShift().draw(0)), one, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        DomainShift().shift(torch.randn(2, 3), DomainShift().draw(0))
    with pytest.raises(ValueError, match="strength"):
        DomainShift(strength=-1)


def test_fisher_unit_puts_the_default_floor_at_the_median():
    """'median': the median of the positive F over all modules, divided by gamma * tau^-2 at the defaults (100);
    zeros do not count; no positive F gives 1; 'loss' is 1; anything else is refused by name."""
    fisher = {"a": torch.tensor([0.0, 0.0, 1.0, 5.0]), "b": torch.tensor([[2.0, 3.0], [4.0, 0.0]])}
    assert fisher_unit(fisher, "median") == pytest.approx(3.0 / 100)  # positive: 1, 2, 3, 4, 5
    assert fisher_unit({"a": torch.zeros(3)}, "median") == 1.0
    assert fisher_unit(fisher, "loss") == 1.0
    with pytest.raises(ValueError, match="'mean'"):
        fisher_unit(fisher, "mean")
    scaled = {n: 7.0 * f for n, f in fisher.items()}
    assert fisher_unit(scaled, "median") == pytest.approx(7.0 * fisher_unit(fisher, "median"))


def test_kth_largest_with_and_without_sampling():
    """The exact k-th largest value, through the sort for small inputs and through the sampled bracket."""
    torch.manual_seed(0)
    tensors = [torch.randn(3000), torch.rand(50, 40) * 3]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for k in (1, 17, 2500, flat.numel()):
        expected = float(flat.sort(descending=True).values[k - 1])
        assert kth_largest(tensors, k) == expected
        assert kth_largest(tensors, k, sample_size=64) == expected
    with pytest.raises(ValueError, match="k=0"):
        kth_largest(tensors, 0)
