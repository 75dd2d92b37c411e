"""Per-domain mIoU of a segmentation model under the test-time protocol, and their mean."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .classes import NUM_CLASSES
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


@torch.no_grad()
def evaluate_domains(
    model,
    datasets: Mapping[str, object],
    scales: Mapping[str, tuple] | None = None,
    crop: int = 512,
    stride: int = 341,
    num_classes: int = NUM_CLASSES,
    progress: bool = True,
) -> dict[str, float]:
    """mIoU of ``model`` (``model(pixel_values=...).logits``) on each dataset, plus "mean" over them.

    Each image is resized keeping its ratio to its dataset's scale (``scales``, default ``TEST_SCALES``; a
    dataset missing from it is not resized), predicted with 512 x 512 windows at stride 341, and the
    logits are resized to the label's size before the argmax; intersection and union are summed over the
    whole dataset.
    """
    scales = TEST_SCALES if scales is None else scales
    was_training = model.training
    model.eval()
    results = {}
    device = next(model.parameters()).device
    try:
        for name, dataset in datasets.items():
            accumulator = IoUAccumulator(num_classes)
            for item in tqdm(dataset, desc=f"eval {name}", disable=not progress):
                images = item["pixel_values"][None].to(device)  # (1, 3, H, W)
                if name in scales:
                    images = resize_keep_ratio(images, scales[name])
                logits = slide_inference(lambda x: model(pixel_values=x).logits, images, num_classes, crop, stride)
                accumulator.update(predict_labels(logits, item["labels"].shape[-2:])[0].cpu(), item["labels"])
            results[name] = accumulator.compute()["mean_iou"]
    finally:
        model.train(was_training)
    return domain_miou(results)
