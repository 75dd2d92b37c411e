"""Per-domain mIoU of a segmentation model under the test-time protocol, and their mean."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .classes import IGNORE_INDEX, NUM_CLASSES
from .inference import predict_labels, resize_keep_ratio, slide_inference
from .metric import IoUAccumulator, domain_miou

# Keep-ratio test scales (long side, short side) as in the protocol of METHOD.md.
TEST_SCALES = {
    "cityscapes": (2048, 512),
    "bdd100k": (1280, 720),
    "mapillary": (float("inf"), 512),
    "acdc": (2048, 512),
    "gta5": (2048, 512),
}


def evaluate_domains(model, datasets: Mapping[str, object], **options) -> dict[str, float]:
    """mIoU of ``model`` on each dataset, plus "mean" over them; ``options`` as for ``evaluate_per_class``."""
    per_class = evaluate_per_class(model, datasets, **options)
    return domain_miou({name: result["mean_iou"] for name, result in per_class.items()})


@torch.no_grad()
def evaluate_per_class(
    model,
    datasets: Mapping[str, object],
    scales: Mapping[str, tuple] | None = None,
    crop: int = 512,
    stride: int = 341,
    num_classes: int = NUM_CLASSES,
    progress: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, dict]:
    """Per-class IoU and mIoU of ``model`` (``model(pixel_values=...).logits``) on each dataset:
    {dataset: {"mean_iou", "per_class_iou" (K,)}}.

    Each image is resized keeping its ratio to its dataset's scale (``scales``, default ``TEST_SCALES``; a
    dataset missing from it, or with the scale None, is not resized), predicted with crop x crop windows at
    ``stride`` (an image smaller than a window is one window), and the logits are resized to the label's size
    before the argmax; intersection and union are summed over the whole dataset.
    """
    scales = TEST_SCALES if scales is None else scales
    was_training = model.training
    model.eval()
    results = {}
    device = next(model.parameters()).device
    try:
        for name, dataset in datasets.items():
            accumulator = IoUAccumulator(num_classes, ignore_index)
            for item in tqdm(dataset, desc=f"eval {name}", disable=not progress):
                images = item["pixel_values"][None].to(device)  # (1, 3, H, W)
                if scales.get(name) is not None:
                    images = resize_keep_ratio(images, scales[name])
                logits = slide_inference(lambda x: model(pixel_values=x).logits, images, num_classes, crop, stride)
                accumulator.update(predict_labels(logits, item["labels"].shape[-2:])[0].cpu(), item["labels"])
            results[name] = accumulator.compute()
    finally:
        model.train(was_training)
    return results
