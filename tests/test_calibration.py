"""The DR-FIM calibration pass: exactness, estimators, determinism, skipping, restoring, Scores files."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch import nn

from peft_fishertune import FisherTuneConfig, Scores, calibrate, vit_target_modules
from peft_fishertune.quickstart import build_model, synthetic_batch

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names


class Logistic(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 1, bias=False)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def logistic_loss(model, batch):
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


def logistic_setup(batches=12, batch_size=1, dim=5, **config):
    torch.manual_seed(0)
    base = Logistic(dim).double()
    model = get_peft_model(base, FisherTuneConfig(target_modules=["lin"], perturb_strength=0.0, **config))
    data = [
        (torch.randn(batch_size, dim, dtype=torch.float64), torch.randint(0, 2, (batch_size,)).double())
        for _ in range(batches)
    ]
    return model, base.lin.weight.detach().clone(), data


def analytic_fisher(weight, data):
    """mean over batches of (gradient of the batch-mean logistic loss)^2, by hand."""
    total = torch.zeros_like(weight)
    for x, y in data:
        p = torch.sigmoid(x @ weight.T).squeeze(-1)
        grad = ((p - y)[:, None] * x).mean(0, keepdim=True)  # (1, dim)
        total += grad**2
    return total / len(data)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_empirical_fisher_matches_logistic_regression(batch_size):
    """On float64 logistic regression F equals the hand-computed mean squared batch gradient (rtol 1e-4)."""
    model, weight, data = logistic_setup(batch_size=batch_size)
    scores = calibrate(model, data, steps=len(data), loss_fn=logistic_loss, progress=False)
    expected = analytic_fisher(weight, data)
    torch.testing.assert_close(scores.fisher["lin"].double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.fisher_shifted["lin"].double(), expected, rtol=1e-4, atol=0)
    assert scores.domain["lin"].abs().max() < 1e-12  # strength 0: x' == x


def test_gradient_accumulation_squares_the_mean_of_micro_batches():
    """With gradient_accumulation_steps=2 one step's gradient is the mean over two micro-batches."""
    model, weight, data = logistic_setup(batches=8, batch_size=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    scores = calibrate(model, data, steps=4, loss_fn=logistic_loss, accelerator=accelerator, progress=False)
    merged = [
        (torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]])) for i in range(0, 8, 2)
    ]
    torch.testing.assert_close(scores.fisher["lin"].double(), analytic_fisher(weight, merged), rtol=1e-4, atol=0)


def test_steps_cycle_the_dataloader():
    """More steps than batches runs epoch after epoch: 3 batches, 6 steps, each batch counted twice."""
    model, weight, data = logistic_setup(batches=3)
    scores = calibrate(model, data, steps=6, loss_fn=logistic_loss, progress=False)
    torch.testing.assert_close(scores.fisher["lin"].double(), analytic_fisher(weight, data), rtol=1e-4, atol=0)


class Quadratic(nn.Module):
    """Its output is its weight: loss_b = 1/2 sum h (theta - c_b)^2, so the Fisher at theta* is h."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Linear(1, n, bias=False)

    def forward(self):
        return self.theta(torch.ones(1, 1, dtype=self.theta.weight.dtype))[0]  # (n,) = the weight


def test_variational_converges_to_closed_form_on_quadratic():
    """Both estimators recover F = h of a quadratic loss whose batch-gradient second moment is h.

    Both are sample estimates from 3000 batches. The closed form's error is the sampling error of a mean
    of 3000 squared gradients (relative std sqrt(2/3000) ~ 2.6%; measured: max 5.3%, mean 1.8%). The
    variational estimate adds the noise of its one-sample gradient e * dL/dtheta and of Adam's steps
    (lr 0.02), averaged over the last 1500 steps (measured: max 10.6%, mean 5.0%). Bounds: max 15%,
    mean 7%.
    """
    torch.manual_seed(0)
    n = 16
    h = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    base = Quadratic(n).double()
    theta_star = base.theta.weight.detach().clone().squeeze(-1)
    generator = torch.Generator().manual_seed(1)
    centres = [theta_star + torch.randn(n, generator=generator, dtype=torch.float64) / h.sqrt() for _ in range(3000)]

    def loss_fn(model, centre):
        return 0.5 * (h * (model() - centre) ** 2).sum()

    results = {}
    for estimator in ("closed_form", "variational"):
        config = FisherTuneConfig(target_modules=["theta"], gamma=1.0, tau=1.0, perturb_strength=0.0)
        model = get_peft_model(Quadratic(n).double(), config)
        model.base_model.model.theta.base_layer.weight.data.copy_(base.theta.weight)
        results[estimator] = (
            calibrate(
                model,
                centres,
                steps=len(centres),
                loss_fn=loss_fn,
                estimator=estimator,
                variational_lr=0.02,
                progress=False,
            )
            .fisher["theta"]
            .squeeze(-1)
        )
    for estimator, fisher in results.items():
        relative = (fisher.double() - h).abs() / h
        assert relative.max() < 0.15, (estimator, relative.max())
        assert relative.mean() < 0.07, (estimator, relative.mean())


def seg_setup(seed=0, **config):
    generator = torch.Generator().manual_seed(0)
    data = [dict(zip(("pixel_values", "labels"), synthetic_batch(4, generator))) for _ in range(4)]
    config = FisherTuneConfig(target_modules=VIT, modules_to_save=["decode_head"], seed=seed, **config)
    return get_peft_model(build_model(), config), data


@pytest.mark.parametrize("estimator", ["closed_form", "variational"])
def test_same_seed_same_scores_and_selection(estimator):
    """Two runs with one seed give identical scores and selections; a new seed shifts x' differently."""
    runs = []
    for seed in (0, 0, 1):
        model, data = seg_setup(seed=seed, estimator=estimator)
        scores = calibrate(model, data, steps=4, progress=False)
        model.base_model.select(scores)
        indices = [layer.fishertune_indices["default"].clone() for layer in model.base_model._layers().values()]
        runs.append((scores, indices))
    (a, ia), (b, ib), (c, _) = runs
    for kind in ("fisher", "fisher_shifted", "domain", "drf"):
        assert all(torch.equal(getattr(a, kind)[n], getattr(b, kind)[n]) for n in a)
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert any(not torch.equal(a.fisher_shifted[n], c.fisher_shifted[n]) for n in a)


def test_feature_level_shift_at_patch_embedding():
    """perturb_module shifts that module's output: x' differs from x and the Fisher on x is unaffected."""
    pixel_model, data = seg_setup()
    feature_model, _ = seg_setup(perturb_module="backbone.embeddings.patch_embeddings")
    pixel = calibrate(pixel_model, data, steps=4, progress=False)
    feature = calibrate(feature_model, data, steps=4, progress=False)
    for n in pixel:
        torch.testing.assert_close(pixel.fisher[n], feature.fisher[n])
    assert any(not torch.allclose(pixel.fisher_shifted[n], feature.fisher_shifted[n]) for n in pixel)
    assert all(feature.domain[n].sum() > 0 for n in feature if feature.fisher[n].sum() > 0)


def test_bf16_mixed_precision_runs():
    """Under bf16 autocast the scores are finite and the ranking agrees broadly with float32."""
    from accelerate.state import AcceleratorState

    model, data = seg_setup()
    full = calibrate(model, data, steps=4, progress=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    half = calibrate(model, data, steps=4, accelerator=Accelerator(cpu=True, mixed_precision="bf16"), progress=False)
    flat_full = torch.cat([full.fisher[n].reshape(-1) for n in full])
    flat_half = torch.cat([half.fisher[n].reshape(-1) for n in half])
    assert torch.isfinite(flat_half).all()
    assert torch.corrcoef(torch.stack([flat_full, flat_half]))[0, 1] > 0.9


def test_base_weights_frozen_again_after_pass_and_after_error():
    """Candidate weights need grad only during the pass; flags, mode and weights come back even on error."""
    model, data = seg_setup(estimator="variational")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    calibrate(model, data, steps=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, data, steps=4, loss_fn=failing, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_non_finite_batches_are_skipped_and_counted():
    """A NaN loss skips its step; more than half skipped raises naming the count."""
    model, data = seg_setup()
    calls = []

    def sometimes_nan(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss * float("nan") if len(calls) in (1, 2) else loss  # the first step, clean and shifted

    scores = calibrate(model, data, steps=4, loss_fn=sometimes_nan, progress=False)
    assert (scores.meta["used"], scores.meta["skipped"]) == (3, 1)
    with pytest.raises(RuntimeError, match="skipped 4 of 4"):
        calibrate(model, data, steps=4, loss_fn=lambda m, b: m(**b).loss * float("inf"), progress=False)


def test_bad_arguments_raise():
    model, data = seg_setup()
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], steps=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        calibrate(model, data, steps=0, progress=False)
    with pytest.raises(ValueError, match="estimator"):
        calibrate(model, data, steps=1, estimator="exact", progress=False)
    with pytest.raises(ValueError, match="perturb_module"):
        bad, _ = seg_setup(perturb_module="backbone.nope")
        calibrate(bad, data, steps=1, progress=False)


def test_scores_save_load_and_summary(tmp_path):
    """Scores round-trip through safetensors; a foreign file is refused by name; the summary adds up."""
    model, data = seg_setup()
    scores = calibrate(model, data, steps=2, progress=False)
    scores.save(tmp_path / "dr_fim.safetensors")
    loaded = Scores.load(tmp_path / "dr_fim.safetensors")
    assert loaded.meta == scores.meta
    assert all(
        torch.equal(loaded.drf[n], scores.drf[n]) and torch.equal(loaded.domain[n], scores.domain[n]) for n in scores
    )
    summary = loaded.summary(density=0.1)
    for kind in ("fisher", "domain", "drf"):
        selected = sum(s[f"{kind}_selected"] * loaded.drf[n].numel() for n, s in summary["modules"].items())
        assert round(selected) == round(0.1 * sum(t.numel() for t in loaded.drf.values()))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Scores.load(tmp_path / "junk.safetensors")


def test_fp16_loss_scale_is_undone_exactly():
    """Under an fp16 Accelerator the loss is scaled by a power of two and unscaled: F matches float32 runs.

    (On CPU Accelerate runs fp16 without autocast, so this checks the scaling arithmetic, not fp16 kernels.)
    """
    model, weight, data = logistic_setup(batch_size=4)
    scores = calibrate(
        model,
        data,
        steps=len(data),
        loss_fn=logistic_loss,
        accelerator=Accelerator(cpu=True, mixed_precision="fp16"),
        progress=False,
    )
    torch.testing.assert_close(scores.fisher["lin"].double(), analytic_fisher(weight, data), rtol=1e-4, atol=0)


def _pixel_loss(reduction, factor=1.0):
    """Cross-entropy over every pixel of the batch (all labelled), mean or sum, times ``factor``."""

    def loss_fn(model, batch):
        logits = model(pixel_values=batch["pixel_values"]).logits  # (B, C, H, W)
        return factor * nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)

    return loss_fn


def _selected_indices(model, scores):
    """Each layer's selected set (at density_max) and its active set, as sorted positions."""
    model.base_model.select(scores)
    sets = []
    for layer in model.base_model._layers().values():
        indices, active = layer.fishertune_indices["default"], layer.active_count("default")
        sets += [indices.sort().values, indices[:active].sort().values]
    return sets


@pytest.mark.parametrize("loss_fn", [_pixel_loss("mean", 3.0), _pixel_loss("mean", 1e4), _pixel_loss("sum")])
def test_default_selection_ignores_the_loss_scale(loss_fn):
    """With the default Fisher scale the selection is the same when the loss is multiplied by a constant, and
    for a summed loss instead of a mean one (every batch has the same number of pixels, all labelled).

    The sets are compared, not the order inside them: gradients of a scaled loss differ from the scaled
    gradients in the last float32 digits, which may swap neighbours of nearly equal score."""
    model, data = seg_setup()
    reference = _selected_indices(model, calibrate(model, data, steps=3, loss_fn=_pixel_loss("mean"), progress=False))
    scaled = calibrate(model, data, steps=3, loss_fn=loss_fn, progress=False)
    assert scaled.meta["fisher_scale"] == "median"
    assert all(torch.equal(a, b) for a, b in zip(reference, _selected_indices(model, scaled)))


def test_literal_scale_changes_the_selection_with_the_loss_reduction():
    """fisher_scale='loss' reads Eq. 15 in the loss's units: a summed loss moves F past the fixed floor
    gamma * tau^-2, and the selection changes (what the default scale prevents)."""
    model, data = seg_setup(fisher_scale="loss")
    mean = calibrate(model, data, steps=3, loss_fn=_pixel_loss("mean"), progress=False)
    summed = calibrate(model, data, steps=3, loss_fn=_pixel_loss("sum"), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(_selected_indices(model, mean), _selected_indices(model, summed)))


def test_rescored_equals_a_calibration_with_those_settings():
    """One calibration serves any gamma, tau, lambda, eps and Fisher scale: rescoring equals calibrating anew."""
    model, data = seg_setup()
    scores = calibrate(model, data, steps=2, progress=False)
    settings = {"gamma": 0.02, "tau": 0.005, "lam": 0.9, "eps": 1e-6, "fisher_scale": "loss"}
    other, _ = seg_setup(**settings)
    direct = calibrate(other, data, steps=2, progress=False)
    rescored = scores.rescored(**settings)
    for kind in ("domain", "drf"):
        assert all(torch.equal(getattr(direct, kind)[n], getattr(rescored, kind)[n]) for n in scores)
    assert {k: rescored.meta[k] for k in settings} == settings
    with pytest.raises(ValueError, match="alpha"):
        scores.rescored(alpha=1.0)


def test_summary_tells_whether_the_domain_term_did_anything():
    """Hand-made scores: a domain term that copies F gives Spearman 1 and full overlap; one that reverses
    F's order gives Spearman -1 and, at lambda = 1, no overlap."""
    fisher = {"a": torch.arange(1.0, 11.0), "b": torch.arange(11.0, 21.0)}
    shifted = {n: 2 * f for n, f in fisher.items()}  # F' = 2F: every weight's Fisher doubles
    copy = Scores.from_fisher(fisher, shifted, 1.0, gamma=0.01, tau=1e3, lam=1.0, eps=1e-12, fisher_scale="loss")
    summary = copy.summary(density=0.25)
    # floor 1e-8: D = |F - 2F| / F = 1 everywhere, ties broken by position, so D ranks like F
    assert summary["spearman_fisher_domain"] == pytest.approx(1.0)
    assert summary["above_floor"] == 1.0 and summary["median_shift_ratio"] == pytest.approx(2.0)
    assert summary["modules"]["b"]["fisher_selected"] == 0.5 and summary["modules"]["a"]["fisher_selected"] == 0.0
    reverse = {n: f + 1.0 / f for n, f in fisher.items()}  # |F - F'| / F = 1 / F^2: largest for the smallest F
    against = Scores.from_fisher(fisher, reverse, 1.0, gamma=0.01, tau=1e3, lam=1.0, eps=1e-12, fisher_scale="loss")
    summary = against.summary(density=0.25)
    assert summary["spearman_fisher_domain"] == pytest.approx(-1.0)
    assert summary["overlap_fisher_drf"] == 0.0 and summary["overlap_fisher_domain"] == 0.0
    assert "Spearman" in against.describe(0.25)
