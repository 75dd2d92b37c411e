"""Tampered or mismatched adapter files raise a clear error before any weight is touched."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_fishertune import FisherTuneConfig

from .models import build

VALUES = "base_model.model.lin0.fishertune_values"
INDICES = "base_model.model.lin0.fishertune_indices"
ACTIVE = "base_model.model.lin0.fishertune_active"


def _dup(tensors):
    tensors[INDICES][1] = tensors[INDICES][0]


def _out_of_range(tensors):
    tensors[INDICES][0] = 10 * 20  # lin0's weight has 200 entries: valid positions are 0..199


def _negative(tensors):
    tensors[INDICES][0] = -1


def _int64(tensors):
    tensors[INDICES] = tensors[INDICES].long()


def _float_indices(tensors):
    tensors[INDICES] = tensors[INDICES].float()


def _short_values(tensors):
    tensors[VALUES] = tensors[VALUES][:-1]


def _short_both(tensors):
    tensors[VALUES] = tensors[VALUES][:-1]
    tensors[INDICES] = tensors[INDICES][:-1]


def _nan_value(tensors):
    tensors[VALUES][3] = float("nan")


def _active_too_large(tensors):
    tensors[ACTIVE] = torch.tensor(10_000)


def _unknown_module(tensors):
    tensors["base_model.model.lin9.fishertune_values"] = tensors[VALUES].clone()


def _missing_indices(tensors):
    del tensors[INDICES]


TAMPERINGS = [
    (_dup, "duplicates"),
    (_out_of_range, "index 200 is out of range"),
    (_negative, "index -1 is out of range"),
    (_int64, "torch.int32"),
    (_float_indices, "torch.int32"),
    (_short_values, "selection_counts gives"),
    (_short_both, "selection_counts gives"),
    (_nan_value, "NaN"),
    (_active_too_large, "active count"),
    (_unknown_module, "does not adapt"),
    (_missing_indices, "lacks"),
]


@pytest.fixture
def saved(tmp_path):
    base, x = build("mlp")
    config = FisherTuneConfig(
        target_modules=["lin0", "lin1"],
        init_selection="random",
        init_weights=False,
        density_max=0.3,
        index_encoding="int32",
    )
    get_peft_model(base, config).save_pretrained(tmp_path)
    return tmp_path, x


def tamper(path, change):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize("change,message", TAMPERINGS, ids=[t[0].__name__.strip("_") for t in TAMPERINGS])
def test_tampered_file_rejected_on_fresh_model(saved, change, message):
    """PeftModel.from_pretrained on a tampered file raises ValueError naming the module and the problem."""
    path, _ = saved
    tamper(path, change)
    base, _ = build("mlp")
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        PeftModel.from_pretrained(base, path)
    assert "lin0" in str(error.value) or "lin9" in str(error.value)
    for key, value in base.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("change,message", TAMPERINGS, ids=[t[0].__name__.strip("_") for t in TAMPERINGS])
def test_tampered_file_leaves_loaded_adapter_untouched(saved, change, message):
    """Loading a tampered file as a second adapter leaves the base weights and the first adapter bit-identical."""
    path, x = saved
    model = PeftModel.from_pretrained(build("mlp")[0], path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    tamper(path, change)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(path, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "module,count,message",
    [("lin1", 10_000, "10000 entries but the weight"), ("encoder.lin7", 3, "encoder.lin7")],
    ids=["count-exceeds-weight", "unknown-module"],
)
def test_bad_selection_counts_rejected(saved, module, count, message):
    """Config counts that exceed a module's weight (another base model) or name a module the model lacks are
    refused before loading."""
    path, _ = saved
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["selection_counts"][module] = count
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(build("mlp")[0], path)
