"""FisherTuneModel: the peft tuner that injects FisherTune layers and owns the global selection."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists

try:  # peft >= 0.15: the base class of modules_to_save and trainable-token wrappers
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError:  # pragma: no cover
    from peft.utils.other import ModulesToSaveWrapper as AuxiliaryTrainingWrapper

from .config import FisherTuneConfig
from .layer import LAYER_CLASSES, FisherTuneLayer
from .naming import KNOWN_MODEL_TYPES, default_target_modules, name_aliases, rename_keys, untargeted_attention
from .selection import Selection, count_for_density, global_topk, initial_scores
from .serialization import decode_state_dict, encode_state_dict
from .validation import validate_adapter_state_dict

# Default candidates per transformers model_type: the q, k, v, o, fc1 and fc2 linears of the backbone's blocks
# (of the vision tower for CLIP and SigLIP), as one regex that matches transformers 4.x and 5.x names.
TARGET_MODULE_MAPPING = {model_type: default_target_modules(model_type) for model_type in KNOWN_MODEL_TYPES}


class FisherTuneModel(BaseTuner):
    """Sparse fine-tuning of a model's own weights, selected by the domain-related Fisher score.

    FisherTune (Zhao et al., CVPR 2025, https://arxiv.org/abs/2503.17940) adds no modules: every candidate
    layer gets a sparse delta (values at flat positions) on its existing weight. Which positions, and how
    many per layer, comes from ONE global ranking of all candidate weights by score (``select``); the
    trained set is a prefix of that ranking whose length follows the density (``set_density``).

    Use it through peft: ``get_peft_model(model, FisherTuneConfig(...))``.
    """

    prefix: str = "fishertune_"
    tuner_layer_cls = FisherTuneLayer
    target_module_mapping = TARGET_MODULE_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # adapter name -> Selection, kept to grow the active prefix in global rank order (see set_density).
        self._selections: dict[str, Selection] = {}
        # module name -> its name under the other transformers line (see naming.py), set by inject_adapter.
        self._name_aliases: dict[str, str] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Names DistributedDataParallel must leave alone: the deltas, which a selection resizes after DDP has
        wrapped the model. ``FisherTuneStages`` averages their gradients across processes instead."""
        names = [name for name, _ in self.named_parameters() if "fishertune_values" in name]
        return names + [f"base_model.{name}" for name in names]

    # ------------------------------------------------------------------ injection
    def _create_and_replace(self, config: FisherTuneConfig, adapter_name, target, target_name, parent, current_key):
        count = config.selection_counts.get(current_key, 0)
        kwargs = {"init_weights": config.init_weights, "inference_mode": config.inference_mode}
        if isinstance(target, FisherTuneLayer):
            target.update_layer(adapter_name, count, **kwargs)
            return
        new_module = self._create_new_module(target, adapter_name, count, kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """peft's generic version copies ``child.weight`` onto every unloaded module that is not a tuner layer.
        When ``merge_and_unload`` unwraps a ``modules_to_save`` copy of a module with no ``weight`` of its own
        (an ``nn.Sequential`` decoder), that raises; such a module is simply put back."""
        if isinstance(child, AuxiliaryTrainingWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @staticmethod
    def _create_new_module(target, adapter_name, count, kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for base_cls, layer_cls in LAYER_CLASSES.items():
            if isinstance(base, base_cls):
                return layer_cls(target, adapter_name, count, **kwargs)
        supported = ", ".join(cls.__name__ for cls in LAYER_CLASSES)
        raise TypeError(f"Target module {type(base).__name__} is not supported by FisherTune (supported: {supported})")

    def inject_adapter(self, model, adapter_name: str, **kwargs) -> None:
        """Inject the layers, then make the adapter's initial selection (for added adapters too).

        A config object already used by another adapter is copied and its ``selection_counts`` cleared,
        so that reusing a config gives a new selection rather than the other adapter's shapes.
        """
        config = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            config = copy.deepcopy(config)
            config.selection_counts = {}
            self.peft_config[adapter_name] = config
        # A config or state dict saved under the other transformers line names modules as that line does.
        self._name_aliases = name_aliases(model)
        names = [name for name, _ in model.named_modules()]
        config.selection_counts = rename_keys(config.selection_counts, names, self._name_aliases, separator=None)
        if kwargs.get("state_dict") is not None:
            kwargs["state_dict"] = rename_keys(kwargs["state_dict"], names, self._name_aliases)
        super().inject_adapter(model, adapter_name, **kwargs)
        layers = self._layers(adapter_name)
        _warn_untargeted_attention(model, adapter_name)
        unknown = set(config.selection_counts) - set(layers)
        if unknown:
            raise ValueError(
                f"selection_counts names modules that are not adapted in this model: {sorted(unknown)[:5]}"
            )
        if not config.selection_counts and config.init_selection != "none" and layers:
            weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
            scores = initial_scores(weights, config.init_selection, config.seed)
            self.select(scores, adapter_name=adapter_name, active_density=config.density_max)

    def _check_target_module_exists(self, peft_config, key):
        """peft's match of ``key`` against target_modules / exclude_modules, also tried with the name the module
        has under the other transformers line: a config written with 4.x names (``attention.attention.query``)
        targets the same weights under 5.x (``attention.q_proj``) and the reverse."""
        result = check_target_module_exists(peft_config, key)
        alias = self._name_aliases.get(key)
        if alias is None or _is_excluded(result):
            return result
        other = check_target_module_exists(peft_config, alias)
        return other if _is_excluded(other) or not result else result

    # ------------------------------------------------------------------ selection
    def _layers(self, adapter_name: str | None = None) -> dict[str, FisherTuneLayer]:
        """Module name (relative to the wrapped model) -> FisherTune layer."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, FisherTuneLayer)
            and (adapter_name is None or adapter_name in module.fishertune_values)
        }

    def _resolve_adapter(self, adapter_name: str | None) -> str:
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        return adapter_name

    def num_candidates(self, adapter_name: str | None = None) -> int:
        """N: the number of candidate weights (all entries of all adapted weights)."""
        adapter_name = self._resolve_adapter(adapter_name)
        return sum(layer.get_base_layer().weight.numel() for layer in self._layers(adapter_name).values())

    def select(
        self,
        scores: Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        active_density: float | None = None,
        keep_active: bool = False,
    ) -> dict[str, int]:
        """Allocate every layer's entries from one ranking of ``scores``.

        Args:
            scores: module name -> score tensor shaped like that module's weight, for every adapted module
                (names as in ``model.named_modules()`` of the wrapped model; a leading ``base_model.model.``
                is accepted). Higher is more important.
            adapter_name: the adapter to allocate; the active one by default.
            active_density: the fraction of all candidates that is active (trainable) right away;
                ``density_min`` by default. The selection itself always covers ``density_max``.
            keep_active: re-rank only what is not active yet (a re-calibration during tuning): the active
                entries stay active, with their values and optimizer-visible order, ahead of the new ranking.

        With ``allocation="global"`` (the paper's) the ranking is one top-k over all candidates. With
        ``allocation="per_matrix"`` each score is first replaced by its quantile within its own matrix, so
        that the global ranking hands every matrix the same density (to within two entries) and the scores
        only choose the entries inside it.

        Returns the per-module counts at ``density_max``, which are also written to the config's
        ``selection_counts``. The values Parameters keep their identity and are resized; new entries start
        at zero (random when ``init_weights=False``), so an optimizer's state for them must be cleared.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        layers = self._layers(adapter_name)
        merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"Adapter {adapter_name!r} is merged in {merged[:3]}; unmerge it before select()")
        scores = _align_scores(scores, layers)
        if config.allocation == "per_matrix":
            scores = {name: _quantiles(score) for name, score in scores.items()}
        kept = {name: layer.active_entries(adapter_name) for name, layer in layers.items()} if keep_active else {}
        if keep_active:
            scores = _ranked_first(scores, {name: indices for name, (indices, _) in kept.items()})
        total = sum(s.numel() for s in scores.values())
        selection = global_topk(scores, count_for_density(config.density_max, total))
        # Growth needs only each layer's descending scores; the layers hold the indices.
        self._selections[adapter_name] = Selection(selection.names, {}, selection.scores)
        if keep_active:
            active = {name: indices.numel() for name, (indices, _) in kept.items()}
        else:
            density = config.density_min if active_density is None else active_density
            active = selection.counts_at(count_for_density(density, total))
        for name, layer in layers.items():
            ranked = selection.indices[name]
            # The active prefix is a set: ascending order costs nothing now and lets the file use a set code.
            indices = torch.cat([ranked[: active[name]].sort().values, ranked[active[name] :]])
            layer.set_selection(adapter_name, indices, active[name], init_weights=config.init_weights)
            if keep_active:
                layer.fishertune_values[adapter_name].data[: active[name]] = kept[name][1]
        config.selection_counts = {name: int(selection.indices[name].numel()) for name in layers}
        return dict(config.selection_counts)

    def set_density(self, density: float, adapter_name: str | None = None) -> int:
        """Make the global top ``density`` fraction of the selection active; returns the active count.

        The global ranking decides which layers grow. Needs the selection made in this process by
        ``select`` (or ``init_selection``); a loaded adapter keeps the active prefix it was saved with.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if adapter_name not in self._selections:
            raise RuntimeError(f"Adapter {adapter_name!r} has no selection in this process; call select(scores) first")
        if not config.density_min <= density <= config.density_max:
            raise ValueError(
                f"density must lie in [density_min, density_max] = "
                f"[{config.density_min}, {config.density_max}], got {density!r}"
            )
        selection = self._selections[adapter_name]
        k = min(count_for_density(density, self.num_candidates(adapter_name)), selection.total)
        for name, count in selection.counts_at(k).items():
            self.model.get_submodule(name).set_active(adapter_name, count)
        return k

    def active_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Module name -> length of its active prefix."""
        adapter_name = self._resolve_adapter(adapter_name)
        return {name: layer.active_count(adapter_name) for name, layer in self._layers(adapter_name).items()}

    # ------------------------------------------------------------------ peft hooks
    def sort_active(self, adapter_name: str | None = None, optimizer=None) -> None:
        """Reorder each layer's active prefix by position (values and, if given, optimizer moments with it).

        The adapter means the same afterwards; its saved indices then fit the compact set codes. The growth
        stage appends entries in rank order, so call this (the callback does, at the end of training) before
        saving a final adapter.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else {}
        for layer in self._layers(adapter_name).values():
            layer.sort_active(adapter_name, state)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The saved form: values in ``save_value_dtype``; indices as a compact code unless ``index_encoding``
        is 'int32' (see ``encoding.py``)."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return encode_state_dict(model, config, adapter_name, result)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # A file saved under the other transformers line: its module names as this line has them.
        state_dict = rename_keys(state_dict, [name for name, _ in model.named_modules()], name_aliases(model))
        state_dict = decode_state_dict(model, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer) and adapter_name in m.fishertune_values]
        adopt = bool(layers) and not any(layer.num_entries(adapter_name) for layer in layers)
        try:
            found = validate_adapter_state_dict(model, adapter_name, remapped, adopt=adopt)
        except ValueError:
            _drop_half_loaded_adapter(model, adapter_name)
            raise
        if adopt:
            _adopt_selection(model, adapter_name, found)
        return remapped


def _is_excluded(result) -> bool:
    """Whether peft's target check said "excluded" (a falsy marker object, not False)."""
    return type(result).__name__ == "_ExcludedModule"


def _warn_untargeted_attention(model, adapter_name: str) -> None:
    """Warn when a known backbone in ``model`` gets FisherTune on none of its attention linears."""

    def targeted(module) -> bool:
        return isinstance(module, FisherTuneLayer) and adapter_name in module.fishertune_values

    for entry in untargeted_attention(model, targeted):
        where = f"the {entry['model_type']} model" + (f" at {entry['prefix']!r}" if entry["prefix"] else "")
        matched = ", ".join(f"{name} x{count}" for name, count in entry["matched"].items()) or "nothing"
        warnings.warn(
            f"FisherTune adapter {adapter_name!r} targets none of the attention linear layers of {where}; in it "
            f"target_modules matched: {matched}. Its attention linears are named {entry['attention']} in "
            "this transformers version. Leave target_modules at None (on a transformers model of that type) "
            "or use peft_fishertune.vit_target_modules(prefix) to target the q, k, v, o, fc1 and fc2 linears "
            "under transformers 4.x and 5.x names alike.",
            stacklevel=4,
        )


def _adopt_selection(model, adapter_name: str, found: dict) -> None:
    """Give an adapter that has no selection yet the shapes of the saved one it is loading.

    An adapter made with init_selection="none" holds no entries until ``select``. Loading a selected
    adapter into it (a Trainer resuming from a checkpoint into a freshly built model, or
    ``load_state_dict``-style restores) resizes each layer to the saved entries and records the counts in
    the config; the values then arrive with the state dict. The values Parameters keep their identity.
    """
    prefix = "base_model.model." if any(n.startswith("base_model.model.") for n, _ in model.named_modules()) else ""
    for name, (indices, active) in found.items():
        layer = model.get_submodule(prefix + name)
        layer.set_selection(adapter_name, indices.to(torch.int64), int(active))
    config = model.peft_config[adapter_name]
    config.selection_counts = {name: int(indices.numel()) for name, (indices, _) in found.items()}


def _drop_half_loaded_adapter(model, adapter_name: str) -> None:
    """Remove an adapter that peft created for a load that failed validation, when others remain."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and adapter_name in model.peft_config and len(model.peft_config) > 1:
        if adapter_name in model.active_adapters:
            return
        model.delete_adapter(adapter_name)


def _quantiles(score: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its tensor as a fraction in (0, 1], higher for higher scores (ties by position)."""
    flat = score.detach().reshape(-1).float().cpu()
    if not torch.isfinite(flat).all():
        raise ValueError("scores contain non-finite values")
    ranks = torch.empty(flat.numel(), dtype=torch.float64)
    ranks[torch.sort(flat, stable=True).indices] = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return (ranks / flat.numel()).float().reshape(score.shape)


def _ranked_first(scores: dict[str, torch.Tensor], first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores in which the entries at ``first[name]`` (flat positions) rank above every other entry."""
    top = max(float(s.max()) for s in scores.values() if s.numel())
    lifted = top + abs(top) + 1.0
    result = {}
    for name, score in scores.items():
        flat = score.detach().reshape(-1).float().cpu().clone()
        flat[first[name].cpu().long()] = lifted
        result[name] = flat.reshape(score.shape)
    return result


def _align_scores(scores: Mapping[str, torch.Tensor], layers: Mapping[str, FisherTuneLayer]) -> dict:
    """Scores keyed and ordered like ``layers``; raise on a missing, unknown or misshapen entry."""
    stripped = {name.removeprefix("base_model.model."): score for name, score in scores.items()}
    missing = [name for name in layers if name not in stripped]
    unknown = [name for name in stripped if name not in layers]
    if missing or unknown:
        raise ValueError(
            f"scores must cover exactly the adapted modules; missing: {missing[:5]}, unknown: {unknown[:5]}"
        )
    aligned = {}
    for name, layer in layers.items():
        shape = tuple(layer.get_base_layer().weight.shape)
        if tuple(stripped[name].shape) != shape:
            raise ValueError(f"scores for {name!r} have shape {tuple(stripped[name].shape)}, the weight has {shape}")
        aligned[name] = stripped[name]
    return aligned
