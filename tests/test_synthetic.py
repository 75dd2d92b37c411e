"""The procedural multi-domain street scenes: deterministic, one layout distribution in every domain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_fishertune.seg.synthetic import CLASSES, DOMAINS, layout, render, synthetic_dataset


def test_deterministic_per_seed():
    """The same seed gives the same scenes, bit for bit; another seed gives other layouts."""
    a, b = synthetic_dataset("rain", 3, seed=5), synthetic_dataset("rain", 3, seed=5)
    for i in range(3):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and torch.equal(a[i]["labels"], b[i]["labels"])
    assert not np.array_equal(layout(5, 0), layout(6, 0))


def test_every_domain_has_the_same_labels_and_its_own_look():
    """Labels depend on (seed, index) only, so their statistics are identical across domains; images differ."""
    datasets = {domain: synthetic_dataset(domain, 4, seed=1) for domain in DOMAINS}
    reference = datasets["source"]
    for domain, dataset in datasets.items():
        for i in range(4):
            assert torch.equal(dataset[i]["labels"], reference[i]["labels"])
            image = dataset[i]["pixel_values"]
            assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
            if domain != "source":
                assert (image - reference[i]["pixel_values"]).abs().mean() > 0.02, domain


def test_all_classes_appear():
    counts = np.bincount(np.stack([layout(0, i) for i in range(50)]).ravel(), minlength=len(CLASSES))
    assert (counts > 0).all() and len(CLASSES) >= 6 and len(DOMAINS) >= 5


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match="'snow'"):
        render(layout(0, 0), "snow", 0, 0)
