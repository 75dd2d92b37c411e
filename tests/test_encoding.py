"""Compact index codes and value dtypes: round trips through every loader, and damaged codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import AutoPeftModel, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

from peft_fishertune import FisherTuneConfig, vit_target_modules
from peft_fishertune.encoding import code_sizes, decode, encode

from .models import build, tensor_of, tiny_dinov2

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names


def segment_kinds(blob: torch.Tensor) -> list[int]:
    data, kinds, offset = blob.numpy().tobytes(), [], 0
    while offset < len(data):
        kinds.append(data[offset])
        length = int.from_bytes(data[offset + 10 : offset + 18], "little")
        offset += 18 + length
    return kinds


CODE_CASES = [  # (case, numel, positions maker, active, expected segment kinds: 1 packed, 2 bitmask, 3 rice)
    ("sparse-ascending", 100_000, lambda r: np.sort(r.choice(100_000, 500, replace=False)), 500, [3]),
    ("dense-ascending", 1000, lambda r: np.sort(r.choice(1000, 600, replace=False)), 600, [2]),
    ("unordered", 5000, lambda r: r.choice(5000, 300, replace=False), 300, [1]),
    (
        "prefix-and-rest",
        50_000,
        lambda r: np.concatenate(
            [np.sort(r.choice(25_000, 200, replace=False)), 25_000 + r.choice(25_000, 300, replace=False)]
        ),
        200,
        [3, 1],
    ),
    ("single", 7, lambda r: np.array([6]), 1, [1]),
    ("all", 64, lambda r: np.arange(64), 64, [2]),
]


@pytest.mark.parametrize("case,numel,make,active,kinds", CODE_CASES, ids=[c[0] for c in CODE_CASES])
def test_code_round_trip_and_choice(case, numel, make, active, kinds):
    """Each segment takes its smallest code, and decoding gives back the exact positions in order."""
    positions = make(np.random.default_rng(0))
    blob = encode(torch.from_numpy(positions), active, numel)
    assert segment_kinds(blob) == kinds
    assert torch.equal(decode(blob, numel, positions.size, "m").long(), torch.from_numpy(positions).long())


def test_random_round_trips():
    """Many random sizes, densities and prefix lengths round-trip exactly."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        numel = int(rng.integers(1, 5000))
        k = int(rng.integers(0, numel + 1))
        positions = rng.choice(numel, k, replace=False)
        active = int(rng.integers(0, k + 1))
        positions[:active].sort()
        blob = encode(torch.from_numpy(positions), active, numel)
        assert np.array_equal(decode(blob, numel, k, "m").numpy(), positions)


def test_rice_code_is_near_the_entropy_bound():
    """At 1%, 5% and 15% of a 4M-entry weight the code is within 2% of log2 C(N, k) bits."""
    import math

    rng = np.random.default_rng(2)
    numel = 4_194_304
    for density in (0.01, 0.05, 0.15):
        k = round(density * numel)
        positions = np.sort(rng.choice(numel, k, replace=False))
        bound = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2) / 8
        assert min(code_sizes(positions, numel).values()) < 1.02 * bound


DAMAGE = [
    ("truncated-bitmask", 1000, 600, lambda b: b[:-5], "truncated"),
    ("truncated-header", 1000, 600, lambda b: b[:10], "truncated"),
    ("truncated-rice", 100_000, 500, lambda b: b[:-3], "truncated"),
    ("count-mismatch", 100_000, 500, None, "holds 500 indices, the values say 499"),
    ("bitmask-from-other-model", 1000, 600, "numel", "bitmask has"),
    ("rice-out-of-range", 100_000, 500, "small", "out of range"),
]


@pytest.mark.parametrize("case,numel,k,damage,message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_codes_raise(case, numel, k, damage, message):
    positions = np.sort(np.random.default_rng(3).choice(numel, k, replace=False))
    blob = encode(torch.from_numpy(positions), k, numel)
    count, target = k, numel
    if damage is None:
        count = k - 1
    elif damage == "numel":
        target = numel + 64
    elif damage == "small":
        target = int(positions.max())  # the last position no longer fits
    else:
        blob = damage(blob)
    with pytest.raises(ValueError, match=message):
        decode(blob, target, count, "module 'm'")


def dinov2_with_adapter(tmp_path, **config):
    torch.manual_seed(0)
    tiny_dinov2().save_pretrained(tmp_path / "base")
    base = Dinov2Model.from_pretrained(tmp_path / "base")
    full = FisherTuneConfig(target_modules=VIT, init_selection="random", init_weights=False, density_max=0.3, **config)
    return get_peft_model(base, full).eval()


LOADERS = {
    "from_pretrained": lambda base_dir, adapter: PeftModel.from_pretrained(
        Dinov2Model.from_pretrained(base_dir), adapter
    ),
    "low_cpu_mem_usage": lambda base_dir, adapter: PeftModel.from_pretrained(
        Dinov2Model.from_pretrained(base_dir), adapter, low_cpu_mem_usage=True
    ),
    "auto_peft_model": lambda base_dir, adapter: AutoPeftModel.from_pretrained(adapter),
    "load_adapter": lambda base_dir, adapter: _load_second(base_dir, adapter),
}


def _load_second(base_dir, adapter):
    model = PeftModel.from_pretrained(Dinov2Model.from_pretrained(base_dir), adapter, adapter_name="first")
    model.load_adapter(adapter, adapter_name="second")
    model.set_adapter("second")
    return model


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("encoding", ["auto", "int32"])
def test_round_trip_every_encoding_dtype_and_loader(tmp_path, loader, dtype, encoding):
    """Saved with a value dtype and index encoding, every loader reproduces the adapter with values rounded to
    that dtype, back in float32."""
    model = dinov2_with_adapter(tmp_path, save_value_dtype=dtype, index_encoding=encoding)
    model.base_model.set_density(0.2)  # a partly active adapter: two segments per layer
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        for layer in model.base_model._layers().values():
            values = layer.fishertune_values["default"]
            values.copy_(values.to(getattr(torch, dtype)).float())  # what the file can hold
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path / "adapter")
    loaded = LOADERS[loader](tmp_path / "base", tmp_path / "adapter").eval()
    name = "second" if loader == "load_adapter" else "default"
    for key, layer in model.base_model._layers().items():
        other = loaded.base_model.model.get_submodule(key)
        assert other.fishertune_values[name].dtype == torch.float32
        assert other.active_count(name) == layer.active_count("default")
        torch.testing.assert_close(other.get_delta_weight(name), layer.get_delta_weight("default"), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(tensor_of(loaded(pixel_values=x)), expected, rtol=0, atol=0)


def test_bfloat16_file_is_smaller(tmp_path):
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        model = dinov2_with_adapter(tmp_path / dtype, save_value_dtype=dtype)
        model.save_pretrained(tmp_path / dtype / "adapter")
        tensors = load_file(tmp_path / dtype / "adapter" / "adapter_model.safetensors")
        sizes[dtype] = sum(t.numel() * t.element_size() for k, t in tensors.items() if "values" in k)
    assert sizes["bfloat16"] * 2 == sizes["float32"]


@pytest.mark.parametrize(
    "damage,message", [("truncate", "truncated"), ("drop-one-value", "values say"), ("out-of-range", "out of range")]
)
def test_damaged_code_in_adapter_file_rejected_before_loading(tmp_path, damage, message):
    """A damaged code in adapter_model.safetensors raises, naming the module, and leaves the base untouched."""
    base, _ = build("mlp")
    config = FisherTuneConfig(target_modules=["lin0"], init_selection="random", density_max=0.3)
    get_peft_model(base, config).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    code_key, values_key = "base_model.model.lin0.fishertune_code", "base_model.model.lin0.fishertune_values"
    if damage == "truncate":
        tensors[code_key] = tensors[code_key][:-2].clone()
    elif damage == "drop-one-value":
        tensors[values_key] = tensors[values_key][:-1].clone()
    else:
        k = tensors[values_key].numel()
        tensors[code_key] = encode(torch.arange(k) + 200 - k + 1, k, 10_000)  # last position 200 >= 200 entries
    save_file(tensors, file)
    fresh, _ = build("mlp")
    params = list(fresh.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=message) as error:
        PeftModel.from_pretrained(fresh, tmp_path)
    assert "lin0" in str(error.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
