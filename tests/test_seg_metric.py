"""Segmentation evaluation pieces: the label mapping, the dataset-level mIoU, the sliding window."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch

from peft_fishertune.seg import (
    MEAN_IOU_PATH,
    IoUAccumulator,
    domain_miou,
    gta5_to_train_ids,
    intersection_union,
    resize_keep_ratio,
    slide_inference,
)
from peft_fishertune.seg.classes import RAW_IDS, colorize
from peft_fishertune.seg.inference import keep_ratio_size, predict_labels


def reference_miou(preds, labels, num_classes=19, ignore=255):
    """A plain per-class loop: intersection and union summed over the dataset."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        valid = label != ignore
        for c in range(num_classes):
            p, t = (pred == c) & valid, (label == c) & valid
            inter[c] += np.logical_and(p, t).sum()
            union[c] += np.logical_or(p, t).sum()
    present = union > 0
    return (inter[present] / union[present]).mean(), np.where(present, inter / np.maximum(union, 1), np.nan)


def random_dataset(seed, n=5, shape=(37, 53)):
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, 19, shape) for _ in range(n)]
    for label in labels:
        label[rng.random(shape) < 0.1] = 255
    labels[0][labels[0] == 18] = 255  # a class absent from some images
    preds = [
        np.where(rng.random(shape) < 0.6, np.where(lab == 255, 0, lab), rng.integers(0, 19, shape)) for lab in labels
    ]
    return preds, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_miou_matches_reference(seed):
    """bincount-based dataset mIoU equals the per-class reference to 1e-6, per class and in the mean."""
    preds, labels = random_dataset(seed)
    accumulator = IoUAccumulator()
    for pred, label in zip(preds, labels):
        accumulator.update(pred, label)
    result = accumulator.compute()
    expected_mean, expected_per_class = reference_miou(preds, labels)
    assert result["mean_iou"] == pytest.approx(expected_mean, abs=1e-6)
    np.testing.assert_allclose(result["per_class_iou"], expected_per_class, atol=1e-6)


def test_absent_class_left_out_and_bad_values_raise():
    label = np.array([[0, 0], [1, 255]])
    inter, union = intersection_union(np.array([[0, 1], [1, 5]]), label)
    assert inter[:2].tolist() == [1, 1] and union[:2].tolist() == [2, 2] and union[5] == 0
    accumulator = IoUAccumulator()
    accumulator.update(np.array([[0, 1], [1, 5]]), label)
    assert accumulator.compute()["mean_iou"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels must be"):
        intersection_union(np.zeros((2, 2)), np.full((2, 2), 19))
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((2, 2)), np.zeros((2, 3)))


def test_evaluate_module_loads_offline_from_the_package():
    """evaluate.load(<path inside the package>) gives the same numbers as the accumulator."""
    preds, labels = random_dataset(3, n=3, shape=(8, 9))
    metric = evaluate.load(MEAN_IOU_PATH)
    result = metric.compute(predictions=[p.tolist() for p in preds], references=[t.tolist() for t in labels])
    assert result["mean_iou"] == pytest.approx(reference_miou(preds, labels)[0], abs=1e-6)


def test_domain_mean():
    assert domain_miou({"cityscapes": 0.6, "bdd100k": 0.5, "mapillary": 0.7})["mean"] == pytest.approx(0.6)


def test_gta5_mapping():
    """Raw ids 7, 8, 11, ... 33 become 0..18; everything else 255; values outside 0..255 are refused."""
    raw = np.arange(256).reshape(16, 16)
    train = gta5_to_train_ids(raw)
    assert [int(train.flat[r]) for r in RAW_IDS] == list(range(19))
    assert (np.delete(train.ravel(), RAW_IDS) == 255).all()
    with pytest.raises(ValueError, match="0..255"):
        gta5_to_train_ids(np.array([300]))
    assert colorize(np.array([[0, 255]])).tolist() == [[[128, 64, 128], [0, 0, 0]]]


@pytest.mark.parametrize("height,width", [(512, 1024), (300, 700), (700, 512), (400, 400)])
def test_sliding_window_of_identity_equals_whole_image(height, width):
    """A per-pixel model gives the same logits through 512/341 windows as on the whole image."""
    images = torch.randn(2, 4, height, width)

    def model(x):
        return torch.tanh(2 * x) + x.roll(1, dims=1)  # per pixel: no dependence on the window

    torch.testing.assert_close(slide_inference(model, images, num_classes=4), model(images), rtol=1e-6, atol=1e-6)


def test_keep_ratio_resize_and_label_size_argmax():
    assert keep_ratio_size(1024, 2048, (1024, 512)) == (512, 1024)  # Cityscapes 2048x1024 -> 1024x512
    assert keep_ratio_size(720, 1280, (1280, 720)) == (720, 1280)  # BDD100K stays
    assert keep_ratio_size(3000, 4000, (float("inf"), 512)) == (512, 683)  # Mapillary: short side 512
    assert resize_keep_ratio(torch.zeros(1, 3, 1024, 2048), (1024, 512)).shape[-2:] == (512, 1024)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 1
    assert predict_labels(logits, (4, 4)).shape == (1, 4, 4)


def test_window_batching_does_not_change_the_result():
    """Windows through the model one at a time or eight at a time give the same averaged logits."""
    images = torch.randn(2, 3, 700, 900)
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return torch.cat([x, x[:, :1] * 2], dim=1)

    one = slide_inference(model, images, num_classes=4, windows_per_batch=1)
    many = slide_inference(model, images, num_classes=4, windows_per_batch=8)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    assert max(calls) == 2 * 6  # 2 x 3 windows of a 700 x 900 image, 2 images: one call of 12 crops
