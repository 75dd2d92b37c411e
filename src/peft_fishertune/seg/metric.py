"""mIoU as the domain-generalised segmentation papers report it.

Per-class intersection and union are summed over a whole dataset (not averaged over images), labels equal to
the ignore index (255) are left out, and a class whose union is 0 over the dataset is left out of the mean.
Each target domain gets its mIoU; the headline number is the mean over domains.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .classes import IGNORE_INDEX, NUM_CLASSES


def intersection_union(pred, label, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
    """Per-class (intersection, union) counts of one batch, as int64 tensors of length num_classes.

    Vectorised with one bincount over class pairs: pixel (label l, prediction p) falls in bin
    l * num_classes + p, so the diagonal is the intersection and row sums + column sums - diagonal the union.
    """
    pred, label = torch.as_tensor(pred), torch.as_tensor(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"labels must be 0..{num_classes - 1} or {ignore_index}, found {int(label.max())}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must be 0..{num_classes - 1}, found {int(pred.max())}")
    confusion = torch.bincount(label * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return intersection, union


class IoUAccumulator:
    """Sums intersection and union over a dataset; ``compute()`` gives per-class IoU and mIoU."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred, label) -> None:
        intersection, union = intersection_union(pred, label, self.num_classes, self.ignore_index)
        self.intersection += intersection.cpu()
        self.union += union.cpu()

    def compute(self) -> dict:
        present = self.union > 0
        iou = torch.where(
            present,
            self.intersection / self.union.clamp_min(1),
            torch.full_like(self.union, float("nan"), dtype=torch.float64),
        )
        miou = float(iou[present].mean()) if present.any() else float("nan")
        return {"mean_iou": miou, "per_class_iou": iou.double().numpy()}


def domain_miou(per_domain: Mapping[str, float]) -> dict[str, float]:
    """{domain: mIoU} plus their mean under the key "mean"."""
    values = list(per_domain.values())
    return {**per_domain, "mean": float(np.mean(values)) if values else float("nan")}
