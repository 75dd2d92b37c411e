"""FisherTune tuner layers: a sparse delta on the existing weight of a Linear, Conv2d or Conv1D.

Per adapter a layer holds
- ``fishertune_values``: a trainable 1-D float parameter of length k (the layer's share of the selection
  at ``density_max``);
- ``fishertune_indices``: a persistent int32 buffer of the k flat positions in the weight, sorted by score,
  best first;
- ``fishertune_active``: a persistent 0-d int64 buffer, the length of the active prefix (k_active <= k).

The delta of an adapter is ``values[:k_active]`` at ``indices[:k_active]``; entries past the prefix take
part in nothing (forward, merge, gradients), and become active with value 0 when the prefix grows. Both
buffers are persistent, so plain ``state_dict``/``save_pretrained`` carry them and every peft loader
restores them without state-dict overrides.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .sparse_linear import sparse_delta_linear

INDEX_DTYPE = torch.int32


@lru_cache(None)
def _warn_once_about_base_layer_hooks(layer_name: str) -> None:
    warnings.warn(
        f"The base layer of {layer_name} has forward/backward hooks; FisherTune computes the layer with the "
        "effective weight directly, so those hooks do not run. Register them on the FisherTune layer instead."
    )


class FisherTuneLayer(BaseTunerLayer):
    """Shared state and logic of the FisherTune layers; subclasses only say how a weight is applied."""

    adapter_layer_names = ("fishertune_values",)
    other_param_names = ("fishertune_indices", "fishertune_active")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.fishertune_values = nn.ParameterDict({})
        self.fishertune_indices = BufferDict(persistent=True)
        self.fishertune_active = BufferDict(persistent=True)
        # Python mirror of fishertune_active: reading a CUDA buffer in every forward would synchronise.
        # It is refreshed, and the indices re-validated, whenever the buffers are replaced or written by any
        # loader (the key is the buffers' identity and version counter), see _synced_count.
        self._active_count: dict[str, int] = {}
        self._sync_key: dict[str, tuple] = {}
        # Placeholder positions written at allocation, which a load must overwrite before use.
        self._placeholder: dict[str, tuple] = {}
        # Pre-merge values of the merged entries, restored by unmerge so that it is exact.
        self._merge_backup: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _in_out_features(self.get_base_layer())

    # ------------------------------------------------------------------ allocation
    def update_layer(
        self, adapter_name: str, count: int, init_weights: bool = True, inference_mode: bool = False
    ) -> None:
        """Allocate an adapter with ``count`` entries (placeholder positions until a selection or a load)."""
        weight = self.get_base_layer().weight
        if count > weight.numel():
            raise ValueError(
                f"selection_counts asks for {count} entries but the weight {tuple(weight.shape)} has {weight.numel()}"
            )
        indices = torch.arange(count, dtype=INDEX_DTYPE, device=weight.device)
        self._set_adapter_tensors(adapter_name, indices, count, init_weights)
        if count:
            self._placeholder[adapter_name] = _buffer_key(indices)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_selection(self, adapter_name: str, indices: torch.Tensor, active: int, init_weights: bool = True) -> None:
        """Replace the adapter's entries by ``indices`` (flat positions, best first) with ``active`` of them active.

        The values Parameter keeps its identity and gets the new length, so an optimizer that holds it
        goes on working once its state for the parameter is cleared (``FisherTuneStages`` does that).
        """
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before changing its selection.")
        weight = self.get_base_layer().weight
        indices = indices.to(device=weight.device, dtype=torch.int64)
        _check_indices(indices, weight.numel(), where=f"selection of adapter {adapter_name!r}")
        self._set_adapter_tensors(adapter_name, indices.to(INDEX_DTYPE), active, init_weights)

    def _set_adapter_tensors(self, adapter_name, indices, active, init_weights) -> None:
        """Install ``indices`` and fresh values. An existing values Parameter is resized in place, so that an
        optimizer holding it keeps working (its state for it must be reset by the caller)."""
        weight = self.get_base_layer().weight
        count = indices.numel()
        if not 0 <= active <= count:
            raise ValueError(f"active count {active} outside [0, {count}] for adapter {adapter_name!r}")
        if init_weights:
            values = torch.zeros(count, dtype=torch.float32)
        else:  # like peft's other methods, a test-only random init draws from the global RNG
            values = 0.02 * torch.randn(count, dtype=torch.float32)
        value_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        values = values.to(weight.device, value_dtype)
        if adapter_name in self.fishertune_values:
            _resize_parameter(self.fishertune_values[adapter_name], values)
        else:
            self.fishertune_values[adapter_name] = nn.Parameter(values)
        self.fishertune_indices[adapter_name] = indices
        self.fishertune_active[adapter_name] = torch.tensor(active, dtype=torch.int64, device=weight.device)
        self._active_count[adapter_name] = active
        self._placeholder.pop(adapter_name, None)
        self._mark_synced(adapter_name)

    def _mark_synced(self, adapter_name: str) -> None:
        indices, active = self.fishertune_indices[adapter_name], self.fishertune_active[adapter_name]
        self._sync_key[adapter_name] = _buffer_key(indices) + _buffer_key(active)

    def _synced_count(self, adapter_name: str) -> int:
        """k_active, after re-checking the buffers if a loader replaced or wrote them since last time."""
        if adapter_name not in self.fishertune_indices:
            return 0
        indices, active = self.fishertune_indices[adapter_name], self.fishertune_active[adapter_name]
        if self._sync_key.get(adapter_name) != _buffer_key(indices) + _buffer_key(active):
            where = f"adapter {adapter_name!r}"
            if self._placeholder.get(adapter_name) == _buffer_key(indices):
                raise RuntimeError(
                    f"{where}: the layer's indices were allocated from the config but never loaded. A loader "
                    "that copies tensors by name (transformers' model.load_adapter) cannot read the compact "
                    "index code; load with PeftModel.from_pretrained, or save with index_encoding='int32'."
                )
            _check_indices(indices, self.get_base_layer().weight.numel(), where)
            count = int(active)
            if indices.dtype != INDEX_DTYPE or not 0 <= count <= indices.numel():
                raise ValueError(f"{where}: loaded indices {indices.dtype} / active count {count} are invalid")
            self._active_count[adapter_name] = count
            self._mark_synced(adapter_name)
        return self._active_count[adapter_name]

    # ------------------------------------------------------------------ active prefix
    def num_entries(self, adapter_name: str) -> int:
        """k: the number of entries the adapter owns in this layer."""
        return self.fishertune_indices[adapter_name].numel() if adapter_name in self.fishertune_indices else 0

    def active_count(self, adapter_name: str) -> int:
        """k_active: the length of the active prefix."""
        return self._synced_count(adapter_name)

    def set_active(self, adapter_name: str, active: int) -> None:
        """Set the active prefix length; entries that become active start at delta 0."""
        count = self.num_entries(adapter_name)
        if not 0 <= active <= count:
            raise ValueError(f"active count {active} outside [0, {count}] for adapter {adapter_name!r}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before changing its active entries.")
        old = self._synced_count(adapter_name)
        if active > old:
            with torch.no_grad():
                self.fishertune_values[adapter_name][old:active] = 0
        self.fishertune_active[adapter_name].fill_(active)
        self._active_count[adapter_name] = active
        self._mark_synced(adapter_name)

    def sort_active(self, adapter_name: str, optimizer_state=None) -> None:
        """Put the active prefix in ascending position order, moving values and optimizer moments along."""
        k = self._synced_count(adapter_name)
        prefix = self.fishertune_indices[adapter_name][:k]
        if k < 2 or bool((prefix[1:] > prefix[:-1]).all()):
            return
        order = torch.argsort(prefix.long(), stable=True)
        param = self.fishertune_values[adapter_name]
        with torch.no_grad():
            self.fishertune_indices[adapter_name][:k] = prefix[order]
            param[:k] = param[:k][order]
            for value in (optimizer_state or {}).get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[:k] = value[:k][order.to(value.device)]
        self._mark_synced(adapter_name)

    def active_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the active prefix in ascending position order: (int64 positions, values)."""
        indices, values = self._active_delta(adapter_name)
        order = torch.argsort(indices.long())
        return indices.long()[order].clone(), values.detach()[order].clone()

    def _active_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 positions, values) of the active prefix: views, no copies (index_add takes int32 indices)."""
        k = self._synced_count(adapter_name)
        return self.fishertune_indices[adapter_name][:k], self.fishertune_values[adapter_name][:k]

    # ------------------------------------------------------------------ weights
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta as a dense tensor shaped like the base weight (for inspection and merging)."""
        weight = self.get_base_layer().weight
        positions, values = self._active_delta(adapter_name)
        delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        return delta.index_add(0, positions, values.to(weight.dtype)).view_as(weight)

    def _effective_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """Base weight plus the active deltas, built for this call only (not kept on the module)."""
        weight = self.get_base_layer().weight
        flat = weight.reshape(-1)
        for name in adapter_names:
            positions, values = self._active_delta(name)
            flat = flat.index_add(0, positions, values.to(weight.dtype))  # (numel,)
        return flat.view_as(weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active deltas into the base weight; ``unmerge`` restores the exact previous weight.

        Only the k_active touched entries are read and written, and ``safe_merge`` checks just those.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        if adapter_names and not weight.data.is_contiguous():
            weight.data = weight.data.contiguous()
        for name in adapter_names:
            if name not in self.fishertune_values:
                continue
            positions, values = self._active_delta(name)
            flat = weight.data.view(-1)
            backup = flat[positions]  # (k_active,) a copy: advanced indexing gathers
            merged = backup + values.detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            flat.index_copy_(0, positions.long(), merged)
            self._merge_backup[name] = backup
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self._merge_backup:
                continue
            positions, _ = self._active_delta(name)
            backup = self._merge_backup.pop(name).to(weight.device)
            weight.data.view(-1).index_copy_(0, positions.long(), backup)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for store in (self._active_count, self._sync_key, self._placeholder, self._merge_backup):
            store.pop(adapter_name, None)

    # ------------------------------------------------------------------ forward
    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if self._synced_count(a) > 0]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks:
            _warn_once_about_base_layer_hooks(type(base).__name__)
        return self._forward_with_delta(self._cast_input_dtype(x, base.weight.dtype), active, *args, **kwargs)

    def _forward_with_delta(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any):
        """The base layer's computation with the effective weight (built for this call only)."""
        return self._apply_weight(x, self._effective_weight(adapter_names), *args, **kwargs)

    def __repr__(self) -> str:
        return "fishertune." + super().__repr__()


class _FisherTuneModule(nn.Module, FisherTuneLayer):
    """A FisherTune layer around one base module, created with its first adapter."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, count: int, **adapter_kwargs) -> None:
        nn.Module.__init__(self)
        FisherTuneLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, count, **adapter_kwargs)

    # nn.Module comes first in the bases (its __init__ must run first), so name these explicitly.
    forward = FisherTuneLayer.forward
    __repr__ = FisherTuneLayer.__repr__


class Linear(_FisherTuneModule):
    """FisherTune on ``nn.Linear``, through ``SparseDeltaLinear``: the effective weight is not kept for backward.

    ``backward_mode``: "dense" gathers the deltas' gradient from the dense weight gradient, "sparse" computes
    the selected entries only, "auto" picks by density (see ``sparse_linear``).
    """

    backward_mode = "auto"

    def _forward_with_delta(self, x, adapter_names, *args, **kwargs):
        base = self.get_base_layer()
        deltas = [self._active_delta(name) for name in adapter_names]
        positions = deltas[0][0] if len(deltas) == 1 else torch.cat([p for p, _ in deltas])
        values = deltas[0][1] if len(deltas) == 1 else torch.cat([v for _, v in deltas])
        return sparse_delta_linear(x, base.weight, base.bias, positions, values, self.backward_mode)

    def _apply_weight(self, x, weight, *args, **kwargs):
        return F.linear(x, weight, self.get_base_layer().bias)  # (..., out_features)


class Conv2d(_FisherTuneModule):
    """FisherTune on ``nn.Conv2d`` (any stride, padding mode, dilation and groups)."""

    def _apply_weight(self, x, weight, *args, **kwargs):
        base = self.get_base_layer()
        return base._conv_forward(x, weight, base.bias)  # (B, C_out, H', W')


class Conv1DLayer(_FisherTuneModule):
    """FisherTune on transformers' ``Conv1D``, a linear layer whose weight is stored as (in, out)."""

    def _apply_weight(self, x, weight, *args, **kwargs):
        return F.linear(x, weight.t(), self.get_base_layer().bias)  # (..., out_features)


LAYER_CLASSES: dict[type, type] = {nn.Linear: Linear, nn.Conv2d: Conv2d, Conv1D: Conv1DLayer}


def _resize_parameter(param: nn.Parameter, values: torch.Tensor) -> None:
    """Give ``param`` the data ``values`` (any length), keeping the Parameter object.

    Autograd keeps a leaf's gradient accumulator, with the leaf's shape, for as long as any graph that used the
    leaf is alive (a training loop's previous ``loss`` holds one), and a later backward would then check the
    new gradient against the old shape. Assigning ``.data`` drops that accumulator only when the dtype
    changes, so a change of length passes through another dtype first. A gradient of the old length goes too.
    """
    values = values.to(param.dtype)
    if param.numel() != values.numel():
        other = torch.float64 if param.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=param.device)
        param.grad = None
    param.data = values


def _in_out_features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"FisherTune does not support {type(base).__name__}")


def _buffer_key(tensor: torch.Tensor) -> tuple:
    """Changes whenever a tensor is replaced (identity) or written in place (version counter)."""
    return (id(tensor), tensor._version)


def _check_indices(indices: torch.Tensor, numel: int, where: str) -> None:
    """Raise unless ``indices`` are 1-D, in [0, numel) and unique."""
    if indices.dim() != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        bad = low if low < 0 else high
        raise ValueError(f"{where}: index {bad} is out of range for a weight of {numel} entries")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"{where}: indices contain duplicates")
