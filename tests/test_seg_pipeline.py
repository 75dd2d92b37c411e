"""Training augmentation and the per-domain evaluation loop."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput

from peft_fishertune.seg.evaluation import evaluate_domains
from peft_fishertune.seg.transforms import photometric_jitter, random_crop, random_rescale, train_transform


def pair(height=300, width=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 19, (height // 10, width // 10), generator=generator)
    label = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
    return torch.rand(3, height, width, generator=generator), label


def test_train_transform_shapes_and_determinism():
    """Crops are 512 x 512 (padded with 255 when smaller), values stay in [0, 1], and one seed repeats."""
    image, label = pair()
    outs = [train_transform(image, label, torch.Generator().manual_seed(3)) for _ in range(2)]
    (a_img, a_lab), (b_img, b_lab) = outs
    assert a_img.shape == (3, 512, 512) and a_lab.shape == (512, 512)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert a_img.min() >= 0 and a_img.max() <= 1
    assert set(a_lab.unique().tolist()) <= set(range(19)) | {255}


def test_rescale_keeps_ratio_and_label_values():
    image, label = pair(100, 200)
    big_image, big_label = random_rescale(image, label, torch.Generator().manual_seed(0), scale=(400, 200))
    assert big_image.shape[-1] / big_image.shape[-2] == pytest.approx(2.0, rel=0.02)
    assert set(big_label.unique().tolist()) <= set(label.unique().tolist())


def test_crop_avoids_one_dominant_class():
    """With cat_max_ratio 0.75 the crop is retried away from a region of one class when it can be."""
    label = torch.zeros(600, 600, dtype=torch.long)
    label[:, 300:] = torch.arange(300).remainder(19)  # variety only in the right half
    image = torch.rand(3, 600, 600)
    _, crop = random_crop(image, label, torch.Generator().manual_seed(0), size=200)
    counts = torch.bincount(crop.reshape(-1))
    assert counts.max() / counts.sum() < 0.75


def test_jitter_changes_colours_but_not_shape():
    image, _ = pair(20, 30)
    out = photometric_jitter(image, torch.Generator().manual_seed(1))
    assert out.shape == image.shape and not torch.equal(out, image)


class Oracle(torch.nn.Module):
    """Reads the label back from channel 0 of the image (label / 18): a perfect per-pixel model."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values):
        classes = (pixel_values[:, 0] * 18).round().long().clamp(0, 18)
        return SemanticSegmenterOutput(logits=F.one_hot(classes, 19).permute(0, 3, 1, 2).float())


def test_evaluation_of_a_perfect_model_is_one():
    """Through resize-free sliding windows and dataset-level IoU, a perfect model scores mIoU 1 per domain."""

    def dataset(seed):
        items = []
        for i in range(2):
            _, label = pair(520, 700, seed + i)
            image = torch.stack(
                [
                    label.float() / 18,
                    torch.zeros_like(label, dtype=torch.float),
                    torch.zeros_like(label, dtype=torch.float),
                ]
            )
            label[:5] = 255
            items.append({"pixel_values": image, "labels": label})
        return items

    result = evaluate_domains(Oracle(), {"a": dataset(0), "b": dataset(5)}, scales={}, progress=False)
    assert result == {"a": pytest.approx(1.0), "b": pytest.approx(1.0), "mean": pytest.approx(1.0)}
