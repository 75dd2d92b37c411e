"""FisherTuneCallback: the three stages inside one transformers Trainer run (a thin adapter over FisherTuneStages).

    trainer = Trainer(model=model, args=TrainingArguments(max_steps=T1 + T3, ...), train_dataset=ds,
                      optimizers=(create_optimizer(model), None),      # optional: the paper's two learning rates
                      callbacks=[FisherTuneCallback()])
    trainer.train()
    trainer.train(resume_from_checkpoint=True)

- Calibration data: the Trainer's own train dataset and collator, in a loader of its own (per-device
  batch size, shuffled by a generator seeded with the config's seed), so the scores do not depend on
  where the training data iterator stands, and a resumed run calibrates exactly like an uninterrupted one.
- Checkpoints: the adapter (values, indices, active counts, per-module counts in its config) is saved by
  the Trainer; this callback adds the growth order (``fishertune_growth.safetensors``) to each checkpoint
  folder. Resuming a tuning-stage checkpoint reads it from ``output_dir/checkpoint-<step>``.
- Logs: ``fishertune_stage`` (0 warm-up, 1 tuning), ``fishertune_density`` and ``fishertune_active``.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import TrainerCallback

from .stages import FisherTuneStages


class FisherTuneCallback(TrainerCallback):
    """Runs warm-up, DR-FIM calibration and density growth for the Trainer's FisherTune model."""

    def __init__(self, adapter_name: str | None = None, calibration_kwargs: dict | None = None):
        self.adapter_name = adapter_name
        self.calibration_kwargs = {"progress": False, **(calibration_kwargs or {})}
        self.stages: FisherTuneStages | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        _run_first(self)
        if self.stages is not None:
            self.stages.close()
        self.stages = FisherTuneStages(
            _unwrap(model), None, self.adapter_name, calibration_kwargs=self.calibration_kwargs
        )
        self.stages.calibration_data = _calibration_loader(train_dataloader, args, self.stages.config.seed)
        if state.global_step > 0 and self.stages.selected:
            self.stages.load(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state.global_step)
        self.stages.step(state.global_step, optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.stages.step(state.global_step, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.stages is not None:
            self.stages.close()
            # The final adapter's active entries in position order: the smallest file (checkpoints, which must
            # stay aligned with their optimizer state, are written before this).
            self.stages.tuner.sort_active(self.stages.adapter_name, optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            self.stages.save(folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stages is None:
            return
        info = self.stages.info(state.global_step)
        entries = {
            "fishertune_stage": 0 if info.stage == "warmup" else 1,
            "fishertune_density": info.density,
            "fishertune_active": info.active,
        }
        if logs is not None:  # the dict every callback's on_log receives (printed line, TensorBoard, W&B, ...)
            logs.update(entries)
        if state.log_history:
            state.log_history[-1].update(entries)


def _run_first(callback) -> None:
    """Move ``callback`` to the front of the Trainer's callbacks, so that the entries its ``on_log`` adds to the
    logs reach the ``on_log`` of every other callback, also those registered before it.

    The Trainer passes callbacks no handle on its CallbackHandler; the handler is the caller of this event,
    found on the call stack. Moving the callback from position k to 0 leaves every position after k as it
    was, so the dispatch of the current event goes on unchanged. Without a handler (a loop that calls the
    callback itself) nothing moves.
    """
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            if callback in handler.callbacks and handler.callbacks[0] is not callback:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return
        frame = frame.f_back


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "base_model"):
        model = model.module
    return model


def _calibration_loader(train_dataloader, args, seed: int):
    if train_dataloader is None:
        return None
    return torch.utils.data.DataLoader(
        train_dataloader.dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=train_dataloader.collate_fn,
        num_workers=0,
    )
