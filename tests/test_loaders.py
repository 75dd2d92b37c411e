"""Every way a user loads or injects a FisherTune adapter, beyond PeftModel.from_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from peft import (
    AutoPeftModel,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.utils import PeftType
from transformers import Dinov2Model

from peft_fishertune import FisherTuneConfig, FisherTuneLayer, vit_target_modules

from .models import build, synthetic_trainer_data, tiny_dinov2

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names


def random_config(**kwargs) -> FisherTuneConfig:
    return FisherTuneConfig(init_selection="random", init_weights=False, density_max=0.3, **kwargs)


@pytest.fixture(params=["auto", "int32"])
def saved_dinov2(tmp_path, request):
    """A tiny Dinov2 saved in HF format, and a FisherTune adapter of it saved beside (both index encodings)."""
    torch.manual_seed(0)
    tiny_dinov2().save_pretrained(tmp_path / "base")
    base = Dinov2Model.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, random_config(target_modules=VIT, index_encoding=request.param)).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    return tmp_path, x, expected


def test_peft_type_registered():
    """import peft_fishertune makes FISHERTUNE a PeftType member that peft's registries know."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PeftType("FISHERTUNE") is PeftType.FISHERTUNE
    assert PEFT_TYPE_TO_CONFIG_MAPPING["FISHERTUNE"] is FisherTuneConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.FISHERTUNE] == "fishertune_"
    assert FisherTuneConfig().peft_type is PeftType.FISHERTUNE


def test_auto_peft_model_loads_base_and_adapter(saved_dinov2):
    """AutoPeftModel.from_pretrained finds the base model from the adapter config and loads the adapter."""
    path, x, expected = saved_dinov2
    model = AutoPeftModel.from_pretrained(path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)


def test_transformers_load_adapter(saved_dinov2):
    """transformers' model.load_adapter(path) loads an int32-index adapter exactly. transformers 5 copies
    tensors by name and bypasses peft's load hooks, so a compact index code cannot be read there: the first
    forward says so instead of running with unloaded indices. transformers 4 loads through peft's
    set_peft_model_state_dict, hooks included, so both encodings load exactly."""
    path, x, expected = saved_dinov2
    base = Dinov2Model.from_pretrained(path / "base").eval()
    base.load_adapter(str(path / "adapter"), adapter_name="ft")
    assert any(isinstance(m, FisherTuneLayer) for m in base.modules())
    encoding = json.loads((path / "adapter" / "adapter_config.json").read_text())["index_encoding"]
    with torch.no_grad():
        if encoding == "int32" or transformers.__version__.startswith("4."):
            torch.testing.assert_close(base(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="never loaded"):
                base(pixel_values=x)


def test_transformers_load_adapter_validates_tampered_indices(tmp_path):
    """On transformers' load path a duplicate index is refused, at load (4.x) or at first use (5.x)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tiny_dinov2().save_pretrained(tmp_path / "base")
    model = get_peft_model(
        Dinov2Model.from_pretrained(tmp_path / "base"), random_config(target_modules=VIT, index_encoding="int32")
    )
    model.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("fishertune_indices"))
    tensors[key][1] = tensors[key][0]
    save_file(tensors, file)
    base = Dinov2Model.from_pretrained(tmp_path / "base").eval()
    # transformers 4 loads through peft's hooks, which refuse the file; transformers 5 copies it and the
    # first forward refuses it.
    with pytest.raises(ValueError, match="duplicates"):
        base.load_adapter(str(tmp_path / "adapter"), adapter_name="ft")
        base(pixel_values=torch.randn(1, 3, 28, 28))


def test_low_cpu_mem_usage_load(saved_dinov2):
    """PeftModel.from_pretrained(low_cpu_mem_usage=True) creates the adapter on meta and still loads it exactly."""
    path, x, expected = saved_dinov2
    base = Dinov2Model.from_pretrained(path / "base")
    model = PeftModel.from_pretrained(base, path / "adapter", low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)


def test_inject_adapter_in_model_and_state_dict_round_trip():
    """inject_adapter_in_model + get/set_peft_model_state_dict move an adapter between plain models."""
    source, x = build("mlp")
    config = random_config(target_modules=["lin0", "lin1"])
    source = inject_adapter_in_model(config, source)
    state = get_peft_model_state_dict(source)
    assert state and all("fishertune_" in key for key in state)
    target = inject_adapter_in_model(FisherTuneConfig(**{**config.to_dict(), "init_weights": True}), build("mlp")[0])
    set_peft_model_state_dict(target, state)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_several_adapters_add_set_delete(tmp_path):
    """Two adapters coexist; set_adapter switches outputs; delete_adapter removes every tensor of one."""
    base, x = build("mlp")
    model = get_peft_model(base, random_config(target_modules=["lin0"], seed=1), adapter_name="a")
    model.add_adapter("b", random_config(target_modules=["lin0", "lin1"], seed=2))
    with torch.no_grad():
        out_a = model(x)
        model.set_adapter("b")
        out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith(".a"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    model.delete_adapter("a")
    assert not any(key.endswith(".a") for key in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)


def test_two_active_adapters_add_their_deltas():
    """With both adapters active the output is the base weight plus both sparse deltas (here, on lin0 only)."""
    base, x = build("mlp")
    model = get_peft_model(base, random_config(target_modules=["lin0"], seed=1), adapter_name="a")
    model.add_adapter("b", random_config(target_modules=["lin0"], seed=2))
    model.base_model.set_adapter(["a", "b"])
    layer = model.base_model.model.lin0
    weight = layer.base_layer.weight + layer.get_delta_weight("a") + layer.get_delta_weight("b")
    expected = torch.relu(torch.nn.functional.linear(x, weight, layer.base_layer.bias))
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.model.relu(layer(x)), expected, rtol=1e-6, atol=1e-6)


def test_fresh_process_without_import_fails_with_peft_key_error(tmp_path):
    """Documented limitation: loading without `import peft_fishertune` fails in peft's registry lookup."""
    base, _ = build("mlp")
    get_peft_model(base, random_config(target_modules=["lin0"])).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        from peft import PeftConfig
        PeftConfig.from_pretrained({str(tmp_path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "FISHERTUNE" in result.stderr


def test_trainer_checkpoint_holds_adapter_files_only(tmp_path):
    """A transformers Trainer checkpoint of a FisherTune model has the adapter, not the full model."""
    from transformers import Trainer, TrainingArguments

    from peft_fishertune.quickstart import build_model

    data = synthetic_trainer_data(8)
    model = get_peft_model(
        build_model(), FisherTuneConfig(target_modules=VIT, modules_to_save=["decode_head"], init_selection="random")
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}


def test_added_adapter_gets_its_own_initial_selection():
    """add_adapter runs init_selection for the new adapter; reusing a config object makes a new selection."""
    base, _ = build("mlp")
    config = random_config(target_modules=["lin0"], seed=1)
    model = get_peft_model(base, config)
    model.add_adapter("other", config)  # the very same object
    layer = model.base_model.model.lin0
    assert layer.num_entries("other") == layer.num_entries("default") > 0
    assert model.peft_config["other"] is not model.peft_config["default"]
    assert not torch.equal(layer.fishertune_indices["other"], torch.arange(layer.num_entries("other")).int())


@pytest.mark.parametrize("model_id,name,expected", [("conv", "conv1", (8, 4)), ("conv1d", "c_attn", (6, 12))])
def test_layers_expose_in_and_out_features(model_id, name, expected):
    """Conv2d and transformers Conv1D layers expose in_features/out_features like peft's other methods."""
    base, _ = build(model_id)
    model = get_peft_model(base, random_config(target_modules=[name]))
    layer = model.base_model.model.get_submodule(name)
    assert (layer.in_features, layer.out_features) == expected


def test_merge_and_unload_with_a_sequential_module_to_save():
    """A decoder without a weight of its own (nn.Sequential) in modules_to_save: merge_and_unload puts the trained
    copy back and folds the delta into the backbone (peft's generic unloading copied ``.weight`` and raised)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(8, 8))
    model.add_module("head", torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.ReLU()))
    peft_model = get_peft_model(
        model,
        FisherTuneConfig(
            target_modules=["body"], modules_to_save=["head"], init_selection="random", init_weights=False
        ),
    )
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"][0].weight.add_(1.0)
    x = torch.randn(4, 8)
    expected = peft_model(x)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.head, torch.nn.Sequential) and isinstance(merged.body, torch.nn.Linear)
    assert torch.allclose(merged(x), expected, atol=1e-6)
