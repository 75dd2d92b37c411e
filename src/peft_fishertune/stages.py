"""The three stages of FisherTune (Algorithm 1) as methods any training loop can call.

    stages = FisherTuneStages(model, calibration_data=loader)
    for step in range(T1 + T3):
        ...forward, backward, optimizer.step()...
        stages.step(step + 1, optimizer)      # after each optimizer step, with the number of steps done

- Warm-up, steps [0, T1): the adapter has no entries; only ``modules_to_save`` (the decoder) trains.
- Calibration, once T1 steps are done: DR-FIM on ``calibration_data`` (T2 = ``calibration_steps``
  batches, not optimizer steps), then ``select``: the top ``density_max`` fraction is allocated and the
  top ``density_min`` fraction is active.
- Tuning, steps [T1, T1 + T3): before each step the active set follows the density schedule in global
  rank order; newly active entries start at 0 with their optimizer state zeroed.
- Re-calibration (``recalibrate_every`` = k > 0, the paper's alternating execution): after every k tuning
  steps the DR-FIM pass runs again at the current weights; the active entries stay, with their values and
  optimizer moments, and the new scores rank what is not active yet.

Optimizer mechanism: values Parameters keep their identity when a selection resizes them (see
``FisherTuneLayer.set_selection``), so any optimizer built over the model's trainable parameters before
training keeps them; after a selection their optimizer state is cleared. Adam's step count stays the
optimizer's (per tensor): a newly activated entry has zero moments but the bias correction of the
tensor's step count. For the paper's separate learning rates, build the optimizer with
``create_optimizer(model, lr=1e-4, backbone_lr=1e-5)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .calibration import calibrate
from .layer import FisherTuneLayer
from .perturbation import DomainShift
from .schedules import density_at
from .selection import Selection

GROWTH_FILE = "fishertune_growth.safetensors"


@dataclass
class StageInfo:
    stage: str  # "warmup" or "tuning"
    density: float  # active fraction of all candidates (0 in warm-up)
    active: int  # active entries over all layers


class FisherTuneStages:
    """Warm-up, DR-FIM calibration and growing sparse tuning for one FisherTune adapter."""

    def __init__(
        self,
        model,
        calibration_data=None,
        adapter_name: str | None = None,
        accelerator=None,
        calibration_kwargs: dict | None = None,
    ):
        from peft import PeftModel

        self.peft_model = model
        self.tuner = model.base_model if isinstance(model, PeftModel) else model
        self.adapter_name = adapter_name or self.tuner.active_adapters[0]
        self.config = self.tuner.peft_config[self.adapter_name]
        self.calibration_data = calibration_data
        self.accelerator = accelerator
        self.calibration_kwargs = calibration_kwargs or {}
        self.scores = None
        self._step = 0
        self._recalibrated_at = None
        self._augmentation = None
        self._check_warmup_trains_something()
        if self.config.augment_shift:
            self._attach_augmentation()
        self._gradient_hooks = self._average_delta_gradients_across_processes()

    def _check_warmup_trains_something(self) -> None:
        """Fail at the start rather than inside the first backward: in the warm-up the adapter has no entries yet,
        so something else (``modules_to_save``, e.g. the task head) must train."""
        if self.config.warmup_steps == 0 or self.selected:
            return
        values = {id(p) for p in self.values()}
        if not any(p.requires_grad and id(p) not in values for p in self.tuner.model.parameters()):
            raise ValueError(
                f"FisherTune has nothing to train in its warm-up (warmup_steps={self.config.warmup_steps}): the "
                "adapter selects its entries only at the end of the warm-up, and no other parameter requires "
                "grad. Name the task head in modules_to_save (e.g. modules_to_save=['classifier']), or set "
                "warmup_steps=0 to calibrate before the first step."
            )

    def _average_delta_gradients_across_processes(self) -> list:
        """With several processes, average the deltas' gradients after each accumulation into them.

        DDP leaves the deltas alone (see ``FisherTuneModel._ddp_params_and_buffers_to_ignore``). Averaging the
        accumulated gradient after every backward is exact with gradient accumulation too: the part already
        averaged is the same in every process and stays as it is.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return []

        def average(param):
            if param.grad is not None and param.numel():
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad.div_(dist.get_world_size())

        return [param.register_post_accumulate_grad_hook(average) for param in self.values()]

    def _attach_augmentation(self) -> None:
        """Shift x while training in the tuning stage; the draw changes every step and skips calibration's ids."""
        shift = DomainShift(self.config.perturb_strength, self.config.seed + 1)
        root = self.tuner.model

        def current_draw():
            tuning = root.training and self._step >= self.warmup_steps and self.selected
            return shift.draw(self._step) if tuning else None

        self._augmentation = shift.attach(root, self.config.perturb_module, current_draw)

    def close(self) -> None:
        """Remove the augmentation and gradient hooks, if any."""
        if self._augmentation is not None:
            self._augmentation.remove()
            self._augmentation = None
        for handle in self._gradient_hooks:
            handle.remove()
        self._gradient_hooks = []

    # ------------------------------------------------------------------ queries
    @property
    def warmup_steps(self) -> int:
        return self.config.warmup_steps

    @property
    def selected(self) -> bool:
        return sum(self.config.selection_counts.values()) > 0

    def density(self, global_step: int) -> float:
        """The scheduled density for the step that follows ``global_step`` completed steps."""
        if global_step < self.warmup_steps:
            return 0.0
        c = self.config
        return density_at(c.schedule, global_step - self.warmup_steps, c.tuning_steps, c.density_min, c.density_max)

    def info(self, global_step: int) -> StageInfo:
        stage = "warmup" if global_step < self.warmup_steps or not self.selected else "tuning"
        active = sum(self.tuner.active_counts(self.adapter_name).values())
        return StageInfo(stage, self.density(global_step) if stage == "tuning" else 0.0, active)

    # ------------------------------------------------------------------ actions
    def step(self, global_step: int, optimizer=None) -> StageInfo:
        """Bring the adapter to the state for the step after ``global_step`` completed optimizer steps."""
        self._step = global_step
        if global_step >= self.warmup_steps and not self.selected:
            self.calibrate_and_select(optimizer)
        elif self._recalibration_due(global_step):
            self.recalibrate(optimizer)
        if self.selected:
            self.set_density(self.density(global_step), optimizer)
        return self.info(global_step)

    def _recalibration_due(self, global_step: int) -> bool:
        every, t = self.config.recalibrate_every, global_step - self.warmup_steps
        due = every > 0 and self.selected and 0 < t < self.config.tuning_steps and t % every == 0
        return due and self._recalibrated_at != global_step

    def calibrate_and_select(self, optimizer=None) -> None:
        """Run the DR-FIM pass on ``calibration_data`` and select; the training RNG stream is left as it was."""
        self.scores = self._calibrate()
        self.tuner.select(self.scores, adapter_name=self.adapter_name)
        if optimizer is not None:
            for param in self.values():
                _optimizer_state(optimizer).pop(param, None)

    def recalibrate(self, optimizer=None) -> None:
        """DR-FIM again at the current weights; the active entries keep their values and optimizer moments, the
        new scores rank the entries not active yet."""
        self.tuner.sort_active(self.adapter_name, optimizer)  # select(keep_active=True) keeps position order
        self.scores = self._calibrate()
        self.tuner.select(self.scores, adapter_name=self.adapter_name, keep_active=True)
        self._recalibrated_at = self._step
        if optimizer is None:
            return
        state = _optimizer_state(optimizer)
        for layer in self._layers().values():
            param = layer.fishertune_values[self.adapter_name]
            active = layer.active_count(self.adapter_name)
            for key, value in state.get(param, {}).items():
                if torch.is_tensor(value) and value.ndim == 1 and value.numel() != param.numel():
                    resized = torch.zeros_like(param, dtype=value.dtype)
                    resized[:active] = value[:active]
                    state[param][key] = resized

    def _calibrate(self):
        if self.calibration_data is None:
            raise ValueError("FisherTuneStages needs calibration_data to calibrate at the end of the warm-up")
        with torch.random.fork_rng(devices=_cuda_devices()):
            return calibrate(
                self.peft_model,
                self.calibration_data,
                self.config.calibration_steps,
                accelerator=self.accelerator,
                adapter_name=self.adapter_name,
                **self.calibration_kwargs,
            )

    def set_density(self, density: float, optimizer=None) -> None:
        """Grow the active prefix to ``density``; zero the optimizer moments of newly active entries."""
        before = self.tuner.active_counts(self.adapter_name)
        self.tuner.set_density(density, adapter_name=self.adapter_name)
        if optimizer is None:
            return
        state = _optimizer_state(optimizer)
        for name, layer in self._layers().items():
            param = layer.fishertune_values[self.adapter_name]
            start, end = before[name], layer.active_count(self.adapter_name)
            for value in state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape and end > start:
                    value[start:end] = 0

    def values(self) -> list[torch.nn.Parameter]:
        return [layer.fishertune_values[self.adapter_name] for layer in self._layers().values()]

    def _layers(self) -> dict[str, FisherTuneLayer]:
        return self.tuner._layers(self.adapter_name)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        """Write each layer's selected scores (descending), from which the growth order follows, to a checkpoint."""
        selection = self.tuner._selections.get(self.adapter_name)
        if selection is None:
            return
        tensors = {f"scores/{name}": selection.scores[name].contiguous() for name in selection.names}
        save_file(tensors, os.path.join(directory, GROWTH_FILE), metadata={"names": "\n".join(selection.names)})

    def load(self, directory: str, global_step: int | None = None) -> None:
        """Restore the growth order saved by ``save`` (the adapter itself comes with the checkpoint).

        ``global_step``: the checkpoint's step; a re-calibration due at that step is already in the checkpoint.
        A resumed run re-draws the calibration batches of later re-calibrations, so with ``recalibrate_every``
        it is not bit-identical to an uninterrupted one.
        """
        self._recalibrated_at = global_step
        path = os.path.join(directory, GROWTH_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: a checkpoint taken after the calibration carries the growth order there"
            )
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            names = handle.metadata()["names"].split("\n")
        tensors = load_file(path)
        layers = self._layers()
        if names != list(layers):
            raise ValueError(f"{path}: its modules do not match the adapter's ({len(names)} vs {len(layers)})")
        scores = {name: tensors.get(f"scores/{name}") for name in names}
        if any(scores[n] is None or scores[n].numel() != layers[n].num_entries(self.adapter_name) for n in names):
            raise ValueError(f"{path}: the saved scores do not match the adapter's selection")
        self.tuner._selections[self.adapter_name] = Selection(names=names, indices={}, scores=scores)


def create_optimizer(
    model, lr: float = 1e-4, backbone_lr: float = 1e-5, weight_decay: float = 0.05, **adamw_kwargs
) -> torch.optim.AdamW:
    """AdamW with the paper's two learning rates: ``backbone_lr`` for the FisherTune deltas, ``lr`` for the
    rest that trains (the decoder); biases and norm weights without weight decay.

    Build it right after ``get_peft_model`` (before any selection): the deltas' Parameters keep their
    identity through selections and loads, so the groups stay valid. Pass it to a Trainer as
    ``optimizers=(optimizer, None)``.
    """
    deltas, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "fishertune_values" in name:
            deltas.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": deltas, "lr": backbone_lr, "weight_decay": weight_decay, "name": "fishertune_deltas"},
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **adamw_kwargs)


def _optimizer_state(optimizer):
    return getattr(optimizer, "optimizer", optimizer).state


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
