"""The project's mIoU as an `evaluate` metric: `evaluate.load(peft_fishertune.seg.MEAN_IOU_PATH)`.

Works offline (a local path, not a Hub name). Inputs: ``predictions`` and ``references``, lists of (H, W)
integer arrays; intersection and union are summed over all of them before the per-class IoU.
"""

import datasets
import evaluate

from peft_fishertune.seg.metric import IoUAccumulator


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Dataset-level mIoU: per-class intersection and union summed over all images, ignore 255.",
            citation="",
            inputs_description="predictions, references: lists of (H, W) integer label maps",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_classes: int = 19, ignore_index: int = 255):
        import numpy as np

        accumulator = IoUAccumulator(num_classes, ignore_index)
        for pred, label in zip(predictions, references):
            accumulator.update(np.asarray(pred), np.asarray(label))
        return accumulator.compute()
