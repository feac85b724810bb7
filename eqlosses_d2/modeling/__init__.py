from .box_predictor import CosineClassifier, LongTailOutputLayers
from .class_stats import ClassStatsBuffers, find_class_stats
from .mask_predictor import NormalizedConv2d, normalize_mask_predictor
from .roi_heads import LongTailCascadeROIHeads, LongTailStandardROIHeads

__all__ = [
    "ClassStatsBuffers",
    "CosineClassifier",
    "LongTailCascadeROIHeads",
    "LongTailOutputLayers",
    "LongTailStandardROIHeads",
    "NormalizedConv2d",
    "find_class_stats",
    "normalize_mask_predictor",
]
