"""FisherTune on a GPU: gradients, merging, loading, calibration, the Trainer stages and host-device syncs.

Marked ``cuda``; every test skips cleanly on a machine without CUDA. ``benchmarks/device_check.sh`` runs them
first on a GPU machine. ``FISHERTUNE_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU instead (to
check the tests themselves where no GPU is at hand); the sync test needs CUDA.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.nn import functional as F

import peft_fishertune  # noqa: F401
from peft_fishertune import FisherTuneCallback, FisherTuneConfig, FisherTuneLayer, calibrate, vit_target_modules
from peft_fishertune.quickstart import build_model, synthetic_batch
from peft_fishertune.sparse_linear import sparse_delta_linear

from .models import synthetic_trainer_data

DEVICE = os.environ.get("FISHERTUNE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VIT = vit_target_modules("backbone")


def tiny_model(seed: int = 0, **config):
    config = {"init_selection": "random", "init_weights": False, "density_max": 0.15, **config}
    return get_peft_model(
        build_model(seed), FisherTuneConfig(target_modules=VIT, modules_to_save=["decode_head"], **config)
    )


def batch(size: int = 4, seed: int = 0, device: str = DEVICE) -> dict:
    images, labels = synthetic_batch(size, torch.Generator().manual_seed(seed))
    return {"pixel_values": images.to(device), "labels": labels.to(device)}


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bf16-autocast"])
def test_sparse_delta_gradients_match_autograd(mode, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(DEVICE)
    bias = torch.randn(96, generator=generator).to(DEVICE).requires_grad_(True)
    positions = torch.randperm(weight.numel(), generator=generator)[:900].to(DEVICE)
    values = torch.randn(900, generator=generator).to(DEVICE).requires_grad_(True)
    x = torch.randn(4, 50, 64, generator=generator).to(DEVICE).requires_grad_(True)
    grad = torch.randn(4, 50, 96, generator=generator).to(DEVICE)
    autocast = dtype == "bf16-autocast"

    def run(fn):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        return (out, *torch.autograd.grad(out, [x, bias, values], grad.to(out.dtype)))

    got = run(lambda: sparse_delta_linear(x, weight, bias, positions, values, mode))
    effective = lambda: weight.reshape(-1).index_add(0, positions, values).view_as(weight)  # noqa: E731
    expected = run(lambda: F.linear(x, effective(), bias))
    for a, b in zip(got, expected):
        assert a.device.type == DEVICE.split(":")[0]
        # bf16 keeps 8 bits of mantissa; sums over 200 tokens in another order differ by a few units of it.
        atol = 1e-2 * float(b.detach().abs().max()) if autocast else 1e-4
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if autocast else 1e-5, atol=atol)


def test_merge_and_unmerge_on_the_device():
    model = tiny_model().to(DEVICE).eval()
    x = batch()["pixel_values"]
    with torch.no_grad():
        adapted = model(pixel_values=x).logits
        model.base_model.merge_adapter()
        merged = model(pixel_values=x).logits
        model.base_model.unmerge_adapter()
        unmerged = model(pixel_values=x).logits
        with model.disable_adapter():
            plain = model(pixel_values=x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-5)
    assert (plain - adapted).abs().max() > 1e-3


def test_an_adapter_saved_on_cpu_loads_into_a_device_model(tmp_path):
    model = tiny_model().eval()
    x = batch(device="cpu")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model(0).to(DEVICE), tmp_path).eval()
    layers = [m for m in loaded.modules() if isinstance(m, FisherTuneLayer)]
    assert layers and all(m.fishertune_values["default"].device.type == DEVICE.split(":")[0] for m in layers)
    with torch.no_grad(), _no_tf32():  # compared with the CPU outputs to 1e-4
        got = loaded(pixel_values=x.to(DEVICE)).logits
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_calibration_on_the_device_equals_the_cpu_one():
    """Closed form, same model, batches and seed on both devices: F(x) and F(x') agree to 1e-3 relative
    (float32 matmuls differ in their last bits between devices, squaring the gradients amplifies that a
    little) and the top 15% by DR-FIM is the same set up to 1%. The shift draws its noise on the CPU, so
    x' is the same batch on both devices."""
    with _no_tf32():  # TF32 convolutions/matmuls (cuDNN's default on Ampere and later) round to 10 bits
        scores = {device: _calibrated(device, "closed_form") for device in ("cpu", DEVICE)}
    cpu, dev = scores["cpu"], scores[DEVICE]
    for name in cpu.fisher:
        for a, b in ((cpu.fisher[name], dev.fisher[name]), (cpu.fisher_shifted[name], dev.fisher_shifted[name])):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
    top = {device: _top_set(s.drf, 0.15) for device, s in scores.items()}
    assert len(top["cpu"] & top[DEVICE]) >= 0.99 * len(top["cpu"])


def test_variational_calibration_runs_on_the_device():
    """The variational estimator draws its weight noise on the device (another random stream than the CPU's),
    so it is checked for shapes, finiteness and sign, not equality with the CPU."""
    scores = _calibrated(DEVICE, "variational")
    for name, fisher in scores.fisher.items():
        assert fisher.device.type == DEVICE.split(":")[0]
        assert torch.isfinite(fisher).all() and torch.isfinite(scores.drf[name]).all()
        assert (scores.domain[name] >= 0).all()


@contextlib.contextmanager
def _no_tf32():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _calibrated(device: str, estimator: str):
    batches = [batch(4, seed, device) for seed in range(3)]
    torch.manual_seed(0)
    model = tiny_model(init_selection="none", estimator=estimator).to(device)
    return calibrate(model, batches, steps=3, progress=False)


def _top_set(drfim: dict, density: float) -> set:
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in drfim.values()])
    return set(torch.topk(flat, int(density * flat.numel())).indices.tolist())


def test_three_stages_through_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    data = synthetic_trainer_data(16)
    model = tiny_model(init_selection="none", warmup_steps=2, calibration_steps=2, tuning_steps=4, density_max=0.2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=DEVICE == "cpu",
        disable_tqdm=True,
        save_strategy="no",
        bf16=DEVICE != "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[FisherTuneCallback()])
    trainer.train()
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    assert all(m.fishertune_values["default"].device.type == DEVICE.split(":")[0] for m in layers)
    stages = [entry["fishertune_stage"] for entry in trainer.state.log_history if "fishertune_stage" in entry]
    assert stages[0] == 0 and stages[-1] == 1  # warm-up, then tuning
    assert sum(model.base_model.active_counts().values()) > 0
    assert all(torch.isfinite(m.fishertune_values["default"]).all() for m in layers)


@pytest.mark.skipif(DEVICE != "cuda", reason="host-device synchronisation is a CUDA notion")
def test_no_host_device_sync_in_a_fishertune_layer():
    """One training step's forward and backward through FisherTune layers, under sync debug mode "error"."""
    model = tiny_model().to("cuda").train()
    layer = next(m for m in model.modules() if isinstance(m, FisherTuneLayer))
    x = torch.randn(4, 17, layer.get_base_layer().in_features, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # first call: lazy allocations, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("dense", "sparse"):
            layer.backward_mode = mode
            out = layer(x)
            out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        layer.backward_mode = "auto"
    torch.cuda.synchronize()
    assert layer.fishertune_values["default"].grad is not None
