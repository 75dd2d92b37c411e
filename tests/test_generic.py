"""Generic checks over a case table of tiny models, in the style of peft's test_custom_models.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_fishertune import FisherTuneConfig, FisherTuneLayer, vit_target_modules
from peft_fishertune.encoding import decode

from .models import build, tensor_of

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names
# (case id, model id, config kwargs); every case gets init_selection="random" unless it says otherwise.
CASES = [
    ("mlp-lin0", "mlp", {"target_modules": ["lin0"]}),
    ("mlp-both", "mlp", {"target_modules": ["lin0", "lin1"]}),
    ("mlp-regex", "mlp", {"target_modules": "lin[01]"}),
    ("mlp-save-lin1", "mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("mlp-magnitude", "mlp", {"target_modules": ["lin0", "lin1"], "init_selection": "magnitude"}),
    ("conv2d", "conv", {"target_modules": ["conv0", "conv1"]}),
    ("conv1d-transformers", "conv1d", {"target_modules": ["c_attn"]}),
    ("dinov2", "dinov2", {"target_modules": VIT}),
    ("vit-default-targets", "vit", {}),
]
CASE_IDS = [case[0] for case in CASES]


def make_config(kwargs, **overrides) -> FisherTuneConfig:
    merged = {"init_selection": "random", "density_max": 0.3, "init_weights": False, **kwargs, **overrides}
    return FisherTuneConfig(**merged)


def output(model, x):
    return tensor_of(model(x))


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    _, model_id, kwargs = request.param
    return model_id, kwargs


def test_adapter_changes_output_and_disable_restores_it(case):
    """A non-zero delta changes the output; disable_adapter gives back exactly the base output."""
    model_id, kwargs = case
    base, x = build(model_id)
    with torch.no_grad():
        expected = output(base, x)
    model = get_peft_model(base, make_config(kwargs))
    with torch.no_grad():
        adapted = output(model, x)
        with model.disable_adapter():
            disabled = output(model, x)
    assert not torch.allclose(adapted, expected)
    torch.testing.assert_close(disabled, expected, rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_is_exact(case):
    """merge_adapter reproduces the unmerged output; unmerge_adapter restores every base weight bit for bit."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        unmerged = output(model, x)
        model.merge_adapter()
        merged = output(model, x)
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    after = {k: v for k, v in model.state_dict().items() if "base_layer" in k}
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_merge_and_unload_gives_plain_model(case):
    """merge_and_unload returns the original module types with the delta folded in; safe_merge agrees."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs))
    with torch.no_grad():
        expected = output(model, x)
    unloaded = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, FisherTuneLayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(unloaded, x), expected, rtol=0, atol=1e-5)


def test_only_adapter_and_modules_to_save_are_trainable(case):
    """Only fishertune_ values and modules_to_save parameters require grad."""
    model_id, kwargs = case
    base, _ = build(model_id)
    model = get_peft_model(base, make_config(kwargs))
    saved = kwargs.get("modules_to_save") or []
    for name, param in model.named_parameters():
        should = "fishertune_values" in name or any(f"{m}.modules_to_save" in name for m in saved)
        assert param.requires_grad == should, name


def test_training_changes_output_and_touches_only_selected_entries(case):
    """A few optimizer steps change the output; the base weights stay as they were."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs, init_weights=True))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        before = output(model, x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        output(model, x).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = output(model, x)
    assert not torch.allclose(after, before)
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(case, dtype):
    """A model cast to bf16/fp16 runs forward and stays close to the float32 adapter output."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs))
    with torch.no_grad():
        reference = output(model, x)
        half = output(model.to(dtype), x.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), reference, rtol=0.1, atol=0.1)


def test_adapter_file_holds_k_values_and_k_indices(case, tmp_path):
    """save_pretrained writes, per layer, exactly k values and a code of exactly k indices (no dense tensors);
    with index_encoding='int32', exactly k int32 indices."""
    model_id, kwargs = case
    for encoding in ("auto", "int32"):
        base, _ = build(model_id)
        config = make_config(kwargs, index_encoding=encoding)
        model = get_peft_model(base, config)
        model.save_pretrained(tmp_path / encoding)
        tensors = load_file(tmp_path / encoding / "adapter_model.safetensors")
        counts = json.loads((tmp_path / encoding / "adapter_config.json").read_text())["selection_counts"]
        assert counts == config.selection_counts and sum(counts.values()) > 0
        for name, k in counts.items():
            layer = model.base_model.model.get_submodule(name)
            values = tensors[f"base_model.model.{name}.fishertune_values"]
            if encoding == "int32":
                indices = tensors[f"base_model.model.{name}.fishertune_indices"]
                assert indices.dtype == torch.int32
            else:
                code = tensors[f"base_model.model.{name}.fishertune_code"]
                indices = decode(code, layer.get_base_layer().weight.numel(), k, name)
            assert values.shape == (k,) and indices.shape == (k,)
            assert torch.equal(indices, layer.fishertune_indices["default"])
        fishertune_keys = {key for key in tensors if ".fishertune_" in key}
        assert len(fishertune_keys) == 3 * len(counts)  # values, indices or their code, active count


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests_parent!r})
    import peft_fishertune  # registers FisherTune with peft
    from peft import PeftModel
    from tests.models import build, tensor_of
    base, x = build({model_id!r})
    model = PeftModel.from_pretrained(base, {adapter!r}).eval()
    with torch.no_grad():
        out = model(x)
    torch.save(tensor_of(out), {result!r})
    """
)


def test_save_load_round_trip_in_fresh_process(case, tmp_path):
    """An adapter saved here and loaded by PeftModel.from_pretrained in a new process gives identical outputs."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs)).eval()
    with torch.no_grad():
        expected = output(model, x)
    model.save_pretrained(tmp_path / "adapter")
    script = ROUND_TRIP_SCRIPT.format(
        tests_parent=os.path.dirname(os.path.dirname(__file__)),
        model_id=model_id,
        adapter=str(tmp_path / "adapter"),
        result=str(tmp_path / "out.pt"),
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_in_process_round_trip_is_exact(case, tmp_path):
    """save_pretrained + PeftModel.from_pretrained (trainable and not) reproduce values, indices and outputs."""
    model_id, kwargs = case
    base, x = build(model_id)
    model = get_peft_model(base, make_config(kwargs)).eval()
    model.save_pretrained(tmp_path)
    for is_trainable in (False, True):
        loaded = PeftModel.from_pretrained(build(model_id)[0], tmp_path, is_trainable=is_trainable).eval()
        with torch.no_grad():
            torch.testing.assert_close(output(loaded, x), output(model, x), rtol=0, atol=0)
        trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
        assert bool(trainable) == is_trainable
