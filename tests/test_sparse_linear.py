"""SparseDeltaLinear: the same numbers as autograd through index_add + F.linear, without saving the weight."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from peft_fishertune.sparse_linear import sparse_delta_linear


def setup(density=0.15, weight_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 32, generator=generator).requires_grad_(weight_grad)
    bias = torch.randn(48, generator=generator).requires_grad_(True)
    k = int(density * weight.numel())
    positions = torch.randperm(weight.numel(), generator=generator)[:k]
    values = torch.randn(k, generator=generator).requires_grad_(True)
    x = torch.randn(3, 7, 32, generator=generator).requires_grad_(True)
    return x, weight, bias, positions, values


def reference(x, weight, bias, positions, values):
    effective = weight.reshape(-1).index_add(0, positions, values).view_as(weight)
    return F.linear(x, effective, bias)


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("density", [0.01, 0.15, 1.0])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_autograd_reference(mode, density, weight_grad):
    """Outputs and the gradients of x, bias, values (and W when it requires grad) agree to 1e-6 relative."""
    tensors = setup(density, weight_grad)
    grad = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(9))
    out = sparse_delta_linear(*tensors, mode=mode)
    got = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], grad)
    ref_tensors = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    ref_out = reference(*ref_tensors)
    expected = torch.autograd.grad(ref_out, [t for t in ref_tensors if t.requires_grad], grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_effective_weight_is_not_saved_for_backward():
    """The graph holds x, W, positions and values; no tensor of W's size other than W itself."""
    x, weight, bias, positions, values = setup()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_delta_linear(x, weight, bias, positions, values)
    assert not any(t.numel() == weight.numel() and t.data_ptr() != weight.data_ptr() for t in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reference(x, weight, bias, positions, values)
    assert any(t.numel() == weight.numel() and t.data_ptr() != weight.data_ptr() for t in saved)  # naive way does


def test_bf16_autocast_matches_reference():
    """Under CPU bf16 autocast the output and gradients match autograd's to bf16 precision."""
    tensors = setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_delta_linear(*tensors)
    assert out.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().sum(), [tensors[0], tensors[4]])
    ref_tensors = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(*ref_tensors)
    expected = torch.autograd.grad(ref.float().sum(), [ref_tensors[0], ref_tensors[4]])
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


def test_gradient_checkpointing():
    """Recomputing the forward inside torch.utils.checkpoint gives the same gradients."""
    tensors = setup()
    direct = torch.autograd.grad(sparse_delta_linear(*tensors).pow(2).sum(), [tensors[0], tensors[4]])
    checkpointed = checkpoint(lambda *t: sparse_delta_linear(*t).pow(2).sum(), *tensors, use_reentrant=False)
    again = torch.autograd.grad(checkpointed, [tensors[0], tensors[4]])
    for a, b in zip(direct, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fishertune_model_with_gradient_checkpointing_and_autocast():
    """A FisherTune Dinov2 gives the same delta gradients with transformers' gradient checkpointing on, and
    trains under bf16 autocast."""
    from peft import get_peft_model

    from peft_fishertune import FisherTuneConfig
    from peft_fishertune.quickstart import build_model, synthetic_batch

    images, labels = synthetic_batch(2, torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(
            build_model(),
            FisherTuneConfig(
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], init_selection="random"
            ),
        )
        if checkpointing:
            model.base_model.model.backbone.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        model(pixel_values=images, labels=labels).loss.backward()
        grads.append([p.grad.clone() for n, p in model.named_parameters() if "fishertune_values" in n])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values=images, labels=labels).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "fishertune_values" in n)


def test_auto_threshold_is_per_device_type(monkeypatch):
    """``auto`` reads the threshold of the weight's device type; the environment or set_sparse_density set it."""
    from peft_fishertune import sparse_linear

    weight = torch.zeros(100, 100)
    values = torch.zeros(50)  # 0.5% of the weight
    assert sparse_linear.sparse_density("cpu") == sparse_linear.SPARSE_DENSITY["cpu"]
    monkeypatch.setitem(sparse_linear.SPARSE_DENSITY, "cpu", 0.01)
    assert sparse_linear._use_sparse("auto", values, weight)
    sparse_linear.set_sparse_density("cpu", 0.001)
    assert not sparse_linear._use_sparse("auto", values, weight)
    monkeypatch.setenv("FISHERTUNE_SPARSE_DENSITY_CPU", "0.02")
    assert sparse_linear._use_sparse("auto", values, weight)
    monkeypatch.setenv("FISHERTUNE_SPARSE_DENSITY_CPU", "two")
    with pytest.raises(ValueError, match="FISHERTUNE_SPARSE_DENSITY_CPU='two'"):
        sparse_linear.sparse_density("cpu")
    with pytest.raises(ValueError, match=r"'cuda' must lie in \[0, 1\], got 1.5"):
        sparse_linear.set_sparse_density("cuda", 1.5)
