from .box_predictor import CosineClassifier, LongTailOutputLayers
from .class_stats import ClassStatsBuffers, find_class_stats
from .roi_heads import LongTailCascadeROIHeads, LongTailStandardROIHeads

__all__ = [
    "ClassStatsBuffers",
    "CosineClassifier",
    "LongTailCascadeROIHeads",
    "LongTailOutputLayers",
    "LongTailStandardROIHeads",
    "find_class_stats",
]
