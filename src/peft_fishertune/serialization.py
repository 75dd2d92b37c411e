"""The saved form of a FisherTune adapter, applied in peft's save and load hooks of the tuner.

Saving (``FisherTuneModel._get_adapter_state_dict``): values are cast to the config's ``save_value_dtype``
and, with ``index_encoding="auto"``, each layer's int32 ``fishertune_indices`` become a uint8
``fishertune_code`` (``encoding.py``). Loading (``FisherTuneModel._remap_adapter_state_dict_for_load``)
decodes codes back to int32 indices and casts values to the adapter's working dtype before anything is
validated or copied. Every peft loader goes through these two hooks: ``PeftModel.from_pretrained``,
``load_adapter``, ``AutoPeftModel``, transformers' ``load_adapter``, Trainer checkpoint resume,
``low_cpu_mem_usage=True``. Files with plain int32 indices load as well.
"""

from __future__ import annotations

import torch

from .encoding import decode, encode
from .layer import FisherTuneLayer

VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_PREFIX = "base_model.model."


def encode_state_dict(model, config, adapter_name: str, state_dict: dict) -> dict:
    values_suffix = f".fishertune_values.{adapter_name}"
    indices_suffix = f".fishertune_indices.{adapter_name}"
    value_dtype = VALUE_DTYPES[config.save_value_dtype]
    result = {}
    for key, tensor in state_dict.items():
        if key.endswith(values_suffix):
            result[key] = tensor.detach().to(value_dtype)
        elif key.endswith(indices_suffix) and config.index_encoding == "auto":
            module_key = key[: -len(indices_suffix)]
            layer = _find_layer(model, module_key)
            if layer is None:
                result[key] = tensor
                continue
            numel = layer.get_base_layer().weight.numel()
            result[f"{module_key}.fishertune_code.{adapter_name}"] = encode(
                tensor, layer.active_count(adapter_name), numel
            )
        else:
            result[key] = tensor
    return result


def decode_state_dict(model, adapter_name: str, state_dict: dict) -> dict:
    """Checkpoint keys (no adapter name) with codes replaced by int32 indices and values in working dtype."""
    result = dict(state_dict)
    for key in list(result):
        if key.endswith(".fishertune_code"):
            module_key = key[: -len(".fishertune_code")]
            layer = _find_layer(model, module_key)
            where = f"adapter {adapter_name!r}, module {module_key.removeprefix(PEFT_PREFIX)!r}"
            if layer is None or adapter_name not in layer.fishertune_values:
                continue  # validation reports FisherTune tensors of modules the model does not adapt
            values = result.get(f"{module_key}.fishertune_values")
            if values is None:
                raise ValueError(f"{where}: the adapter file lacks ['fishertune_values']")
            numel = layer.get_base_layer().weight.numel()
            result[f"{module_key}.fishertune_indices"] = decode(result.pop(key), numel, values.numel(), where)
    for key, tensor in list(result.items()):
        if key.endswith(".fishertune_values") and tensor.dtype.is_floating_point:
            layer = _find_layer(model, key[: -len(".fishertune_values")])
            if layer is not None and adapter_name in layer.fishertune_values:
                result[key] = tensor.to(layer.fishertune_values[adapter_name].dtype)
    return result


def _find_layer(model, module_key: str) -> FisherTuneLayer | None:
    """The FisherTune layer at ``module_key``, with or without peft's ``base_model.model.`` prefix."""
    for candidate in (module_key, module_key.removeprefix(PEFT_PREFIX), PEFT_PREFIX + module_key):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, FisherTuneLayer):
            return module
    return None
