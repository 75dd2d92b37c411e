"""FisherTuneConfig: METHOD.md defaults, validation that names field and value, JSON round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest
from peft import PeftConfig

from peft_fishertune import FisherTuneConfig


def test_defaults_follow_the_method():
    """The defaults are the paper's settings as METHOD.md states them."""
    config = FisherTuneConfig()
    assert (config.density_min, config.density_max, config.schedule) == (0.01, 0.15, "exponential")
    assert (config.gamma, config.tau, config.lam) == (0.01, 0.01, 0.5)
    assert (config.warmup_steps, config.calibration_steps, config.tuning_steps) == (10_000, 2_000, 28_000)
    assert (config.estimator, config.init_selection, config.init_weights) == ("closed_form", "none", True)


def test_every_field_documented():
    """Each FisherTune field carries a help text."""
    base_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(FisherTuneConfig):
        if f.name not in base_fields:
            assert f.metadata.get("help"), f.name


BAD = [
    ("density_min", 0.0),
    ("density_min", 1.5),
    ("density_min", math.nan),
    ("density_min", "0.1"),
    ("density_max", 0.005),
    ("density_max", 1.01),
    ("schedule", "step"),
    ("estimator", "exact"),
    ("init_selection", "top"),
    ("fisher_scale", "sum"),
    ("allocation", "per_layer"),
    ("recalibrate_every", -1),
    ("recalibrate_every", 1.5),
    ("gamma", 0.0),
    ("tau", -1.0),
    ("eps", 0),
    ("lam", 1.2),
    ("lam", -0.1),
    ("perturb_strength", -1.0),
    ("warmup_steps", -1),
    ("warmup_steps", 2.5),
    ("calibration_steps", 0),
    ("tuning_steps", 0),
    ("seed", -3),
    ("init_weights", "yes"),
    ("perturb_module", ""),
    ("selection_counts", {"lin0": -1}),
    ("selection_counts", {"lin0": 1.5}),
    ("selection_counts", [1]),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_names_field_and_value(field, value):
    """A bad value raises ValueError whose message names the field and repeats the value."""
    with pytest.raises(ValueError) as error:
        FisherTuneConfig(**{field: value})
    echoed = repr(next(iter(value.values()))) if isinstance(value, dict) else repr(value).strip("'")
    assert field in str(error.value) and echoed in str(error.value)


def test_json_round_trip(tmp_path):
    """save_pretrained/from_pretrained keep every field, including the per-module counts."""
    config = FisherTuneConfig(
        target_modules=["q_proj", "fc1"],
        lam=0.3,
        estimator="variational",
        perturb_module="embeddings",
        selection_counts={"a.q_proj": 5},
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FisherTuneConfig)
    assert loaded.to_dict() == config.to_dict()
