"""Density schedules, the three stages inside one Trainer run, exact resume, the plain Accelerate loop."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_fishertune import FisherTuneCallback, FisherTuneConfig, create_optimizer, density_at, vit_target_modules
from peft_fishertune.quickstart import build_model, synthetic_batch
from peft_fishertune.selection import count_for_density

from .models import synthetic_trainer_data

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names
T1, T2, T3 = 3, 2, 6

SCHEDULE_TABLE = [  # (schedule, t, T3, min, max, hand-computed value)
    ("exponential", 0, 10, 0.01, 0.16, 0.01),
    ("exponential", 5, 10, 0.01, 0.16, 0.04),  # 0.01 * 16 ** 0.5
    ("exponential", 10, 10, 0.01, 0.16, 0.16),
    ("exponential", 15, 10, 0.01, 0.16, 0.16),  # clipped past T3
    ("linear", 0, 4, 0.01, 0.05, 0.01),
    ("linear", 1, 4, 0.01, 0.05, 0.02),
    ("linear", 3, 4, 0.01, 0.05, 0.04),
    ("cosine", 0, 4, 0.0, 1.0, 0.0),
    ("cosine", 1, 4, 0.0, 1.0, (1 - math.sqrt(0.5)) / 2),
    ("cosine", 2, 4, 0.0, 1.0, 0.5),
    ("cosine", 4, 4, 0.0, 1.0, 1.0),
]


@pytest.mark.parametrize("name,t,total,low,high,expected", SCHEDULE_TABLE)
def test_schedule_table(name, t, total, low, high, expected):
    """Each schedule at a few steps equals the value computed by hand."""
    assert density_at(name, t, total, low, high) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="'step'"):
        density_at("step", 0, 1, 0.1, 0.2)


def make_data():
    return synthetic_trainer_data(24)


def make_model(**overrides):
    config = FisherTuneConfig(
        target_modules=VIT,
        modules_to_save=["decode_head"],
        warmup_steps=T1,
        calibration_steps=T2,
        tuning_steps=T3,
        density_max=0.2,
        **overrides,
    )
    return get_peft_model(build_model(), config)


def make_trainer(model, output_dir, extra_callbacks=(), save_steps=1):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=T1 + T3,
        per_device_train_batch_size=4,
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-3,
        save_only_model=False,
    )
    optimizer = create_optimizer(model, lr=1e-3, backbone_lr=5e-4)
    return Trainer(
        model=model,
        args=args,
        train_dataset=make_data(),
        optimizers=(optimizer, None),
        callbacks=[FisherTuneCallback(), *extra_callbacks],
    )


class Recorder(TrainerCallback):
    """Checks, before every optimizer step, what that step may train; snapshots after it."""

    def __init__(self, model):
        self.model = model
        self.tuner = model.base_model
        self.base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        self.events = []

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        counts = self.tuner.active_counts()
        active = sum(counts.values())
        if step < T1:
            expected = 0
            assert sum(self.tuner.peft_config["default"].selection_counts.values()) == 0
        else:
            density = density_at("exponential", step - T1, T3, 0.01, 0.2)
            expected = count_for_density(density, self.tuner.num_candidates())
            per_layer = self.tuner._selections["default"].counts_at(expected)
            assert all(abs(counts[n] - per_layer[n]) <= 1 for n in counts)
        assert active == expected, (step, active, expected)
        for layer in self.tuner._layers().values():
            values = layer.fishertune_values["default"]
            assert torch.count_nonzero(values[layer.active_count("default") :]) == 0
        head = self.model.base_model.model.decode_head.modules_to_save["default"].weight
        self.events.append((step, active, head.detach().clone()))

    def on_step_end(self, args, state, control, **kwargs):
        for n, p in self.model.named_parameters():
            if "base_layer" in n:
                assert torch.equal(p, self.base[n]), n


def test_trainer_runs_the_three_stages(tmp_path):
    """Warm-up trains the head only; calibration at T1; active count follows the schedule at every step;
    inactive deltas stay 0; base weights never move; the decoder changes at every step; stages are logged."""
    torch.manual_seed(0)
    model = make_model()
    recorder = Recorder(model)
    trainer = make_trainer(model, tmp_path, [recorder], save_steps=100)
    trainer.train()
    steps = [e[0] for e in recorder.events]
    assert steps == list(range(T1 + T3))
    heads = [e[2] for e in recorder.events]
    assert all(not torch.equal(a, b) for a, b in zip(heads, heads[1:]))
    assert [e[1] for e in recorder.events][:T1] == [0] * T1 and recorder.events[T1][1] > 0
    logged = [h for h in trainer.state.log_history if "fishertune_stage" in h and "loss" in h]
    assert [h["fishertune_stage"] for h in logged][: T1 - 1] == [0] * (T1 - 1)
    assert logged[-1]["fishertune_density"] == pytest.approx(0.2)
    trained = sum(
        int(torch.count_nonzero(v))
        for v in (layer.fishertune_values["default"] for layer in model.base_model._layers().values())
    )
    assert trained > 0


def final_adapter(output_dir):
    return load_file(os.path.join(output_dir, f"checkpoint-{T1 + T3}", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    torch.manual_seed(0)
    make_trainer(make_model(), output_dir).train()
    return output_dir


@pytest.mark.parametrize("resume_step", [1, T1 - 1, T1, T1 + 2], ids=["warmup", "end-warmup", "at-T1", "tuning"])
def test_resume_gives_the_uninterrupted_adapter(uninterrupted, tmp_path, resume_step):
    """A run killed after `resume_step` steps and resumed in a fresh process state ends bit-identical."""
    shutil.copytree(uninterrupted / f"checkpoint-{resume_step}", tmp_path / f"checkpoint-{resume_step}")
    torch.manual_seed(123)  # a different global RNG state: the checkpoint must restore what matters
    make_trainer(make_model(), tmp_path).train(resume_from_checkpoint=True)
    expected, got = final_adapter(uninterrupted), final_adapter(tmp_path)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_plain_accelerate_loop_example():
    """examples/accelerate_loop.py runs the three stages and ends at density_max."""
    root = os.path.dirname(os.path.dirname(__file__))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "accelerate_loop.py"),
            "--warmup",
            "4",
            "--calibration",
            "2",
            "--tuning",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert "warmup" in lines[0] and "tuning" in lines[-1] and "density 0.150" in lines[-1]


def test_augment_shift_changes_training_forward_in_tuning_only():
    """With augment_shift the tuning-stage training forward sees shifted inputs; warm-up and eval do not."""
    from peft_fishertune import FisherTuneStages

    model = make_model(augment_shift=True)
    images, labels = synthetic_batch(4, torch.Generator().manual_seed(3))
    stages = FisherTuneStages(
        model, [{"pixel_values": images, "labels": labels}], calibration_kwargs={"progress": False}
    )

    def loss(train):
        model.train(train)
        with torch.no_grad():
            return model(pixel_values=images, labels=labels).loss

    stages.step(0)
    clean = loss(False)
    assert loss(True) == clean  # warm-up: no shift
    stages.step(T1)
    tuned_eval = loss(False)
    assert loss(True) != tuned_eval  # tuning, training: shifted
    stages.close()
    assert loss(True) == tuned_eval


def test_recalibration_every_k_tuning_steps_keeps_what_was_trained():
    """recalibrate_every=k: DR-FIM runs again after k and 2k tuning steps (not at T1 + T3, not twice at one
    step); the active entries keep their values and Adam moments; training goes on with the resized state."""
    from peft_fishertune import FisherTuneStages

    model = make_model(recalibrate_every=2)
    images, labels = synthetic_batch(4, torch.Generator().manual_seed(3))
    batch = {"pixel_values": images, "labels": labels}
    stages = FisherTuneStages(model, [batch], calibration_kwargs={"progress": False})
    calls = []
    calibrate_once = stages._calibrate
    stages._calibrate = lambda: calls.append(stages._step) or calibrate_once()
    optimizer = create_optimizer(model, lr=1e-3, backbone_lr=1e-2)
    stages.step(0, optimizer)
    for step in range(T1 + T3):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layers = model.base_model._layers()
        kept = {n: layer.active_entries("default") for n, layer in layers.items()}
        moments = {n: optimizer.state[layer.fishertune_values["default"]] for n, layer in layers.items()}
        sums = {n: float(m["exp_avg_sq"][: layers[n].active_count("default")].sum()) for n, m in moments.items() if m}
        stages.step(step + 1, optimizer)
        if step + 1 in (T1 + 2, T1 + 4):
            for name, layer in layers.items():
                indices, values = layer.active_entries("default")
                now = dict(zip(indices.tolist(), values.tolist()))
                assert all(now[i] == v for i, v in zip(kept[name][0].tolist(), kept[name][1].tolist()))
                state = optimizer.state[layer.fishertune_values["default"]]
                if name in sums:
                    assert state["exp_avg_sq"].shape == layer.fishertune_values["default"].shape
                    assert float(state["exp_avg_sq"].sum()) == pytest.approx(sums[name], rel=1e-6)
    assert calls == [T1, T1 + 2, T1 + 4]
    stages.step(T1 + 4, optimizer)
    assert calls == [T1, T1 + 2, T1 + 4]
    stages.close()


class LogRecorder(TrainerCallback):
    """Keeps every ``logs`` dict that reaches its on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_stage_entries_reach_callbacks_registered_before_and_after(tmp_path):
    """fishertune_stage/density/active reach the on_log of every callback (what the printed line and reporting
    integrations read), not only trainer.state.log_history."""
    torch.manual_seed(0)
    model = make_model()
    before, after = LogRecorder(), LogRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=T1 + 2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    callbacks = [before, FisherTuneCallback(), after]
    Trainer(model=model, args=args, train_dataset=make_data(), callbacks=callbacks).train()
    for recorder in (before, after):
        training = [logs for logs in recorder.logs if "loss" in logs]
        assert len(training) == T1 + 2
        assert [logs["fishertune_stage"] for logs in training] == [0] * (T1 - 1) + [1] * 3
        assert training[-1]["fishertune_active"] > 0


def test_warmup_with_nothing_to_train_fails_at_the_start(tmp_path):
    """warmup_steps > 0 and no modules_to_save: the Trainer stops before any step with a message that says what
    to do, not with autograd's 'does not require grad' inside backward. warmup_steps=0 is fine."""
    from peft_fishertune import FisherTuneStages

    config = FisherTuneConfig(target_modules=VIT, warmup_steps=T1, calibration_steps=T2, tuning_steps=T3)
    model = get_peft_model(build_model(), config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=T1 + T3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=make_data(), callbacks=[FisherTuneCallback()])
    with pytest.raises(ValueError, match="modules_to_save"):
        trainer.train()
    assert trainer.state.global_step == 0
    ready = get_peft_model(build_model(), FisherTuneConfig(target_modules=VIT, warmup_steps=0, calibration_steps=T2))
    FisherTuneStages(ready, [{"pixel_values": torch.rand(2, 3, 56, 56)}]).close()
