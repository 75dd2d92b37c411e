"""Checks of a FisherTune adapter state dict, run before peft copies any tensor into the model."""

from __future__ import annotations

import torch

from .layer import INDEX_DTYPE, FisherTuneLayer, _check_indices

PEFT_PREFIX = "base_model.model."
TENSOR_NAMES = ("fishertune_values", "fishertune_indices", "fishertune_active")


def validate_adapter_state_dict(
    model: torch.nn.Module, adapter_name: str, state_dict: dict, adopt: bool = False
) -> dict[str, tuple[torch.Tensor, int]]:
    """Raise ValueError, naming the module and the problem, unless ``state_dict`` fits the model's layers.

    ``state_dict`` has model keys (adapter name included), as peft hands it to ``load_state_dict``. Each
    FisherTune layer of the adapter needs its values (floating, finite), indices (int32, in range, unique)
    and active count (0 <= k_active <= k), with as many values and indices as the config says (with
    ``adopt``, as the file says: the adapter is about to take the file's shapes); a FisherTune tensor for a
    module the model does not adapt is an error too. Returns module name -> (indices, active count).
    """
    expected = set()
    found = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, FisherTuneLayer) or adapter_name not in layer.fishertune_values:
            continue
        keys = {t: f"{module_name}.{t}.{adapter_name}" for t in TENSOR_NAMES}
        expected.update(keys.values())
        expected.update(PEFT_PREFIX + key for key in keys.values())
        tensors = {t: _lookup(state_dict, key) for t, key in keys.items()}
        name = module_name.removeprefix(PEFT_PREFIX)
        _check_layer(name, layer, adapter_name, tensors, adopt)
        found[name] = (tensors["fishertune_indices"], tensors["fishertune_active"])
    unknown = sorted(k for k in state_dict if ".fishertune_" in f".{k}" and k not in expected)
    if unknown:
        raise ValueError(
            f"The adapter holds FisherTune tensors for modules this model does not adapt: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}. Was it trained on another base model or target_modules?"
        )
    return found


def _lookup(state_dict: dict, key: str):
    if key in state_dict:
        return state_dict[key]
    return state_dict.get(PEFT_PREFIX + key)


def _check_layer(name: str, layer: FisherTuneLayer, adapter_name: str, tensors: dict, adopt: bool) -> None:
    where = f"adapter {adapter_name!r}, module {name!r}"
    missing = [t for t, tensor in tensors.items() if tensor is None]
    if missing:
        raise ValueError(f"{where}: the adapter file lacks {missing}")
    values, indices, active = tensors["fishertune_values"], tensors["fishertune_indices"], tensors["fishertune_active"]
    if indices.dtype != INDEX_DTYPE:
        raise ValueError(f"{where}: indices must be {INDEX_DTYPE}, got {indices.dtype}")
    if not values.dtype.is_floating_point or values.dim() != 1:
        raise ValueError(f"{where}: values must be a 1-D float tensor, got {values.dtype} {tuple(values.shape)}")
    expected = indices.numel() if adopt else layer.num_entries(adapter_name)
    if values.numel() != indices.numel() or indices.numel() != expected:
        raise ValueError(
            f"{where}: {values.numel()} values and {indices.numel()} indices, but the config's "
            f"selection_counts gives {expected}"
        )
    if values.device.type != "meta":
        _check_indices(indices, layer.get_base_layer().weight.numel(), where)
        if not torch.isfinite(values).all():
            raise ValueError(f"{where}: values contain NaN or inf")
    if active.device.type != "meta":
        if active.dim() != 0 or active.dtype.is_floating_point or not 0 <= int(active) <= expected:
            raise ValueError(f"{where}: active count must be an integer in [0, {expected}], got {active!r}")
