"""Domain-generalised semantic segmentation with FisherTune: classes, metric and inference protocol, the
Mask2Former recipe for real VFMs, and the embedded benchmark (procedural multi-domain scenes, a small
pre-trained backbone shipped with the package, the demo and the method comparison).
"""

from .classes import CITYSCAPES_CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, gta5_to_train_ids
from .data import load_segmentation_dataset, prepare
from .evaluation import evaluate_domains
from .foundation import FOUNDATION_PATH, TokenSegmenter, load_foundation
from .inference import resize_keep_ratio, slide_inference
from .metric import IoUAccumulator, domain_miou, intersection_union
from .model import ViTMask2Former, backbone_target_modules, default_feature_blocks, tiny_decoder_config
from .synthetic import synthetic_dataset

MEAN_IOU_PATH = str(__import__("pathlib").Path(__file__).parent / "mean_iou" / "mean_iou.py")

__all__ = [
    "CITYSCAPES_CLASSES",
    "FOUNDATION_PATH",
    "TokenSegmenter",
    "load_foundation",
    "synthetic_dataset",
    "IGNORE_INDEX",
    "IoUAccumulator",
    "MEAN_IOU_PATH",
    "NUM_CLASSES",
    "PALETTE",
    "ViTMask2Former",
    "backbone_target_modules",
    "default_feature_blocks",
    "domain_miou",
    "evaluate_domains",
    "load_segmentation_dataset",
    "prepare",
    "gta5_to_train_ids",
    "intersection_union",
    "resize_keep_ratio",
    "slide_inference",
    "tiny_decoder_config",
]
