from .class_stats import ClassStatsBuffers, find_class_stats
from .roi_heads import LongTailStandardROIHeads

__all__ = ["ClassStatsBuffers", "find_class_stats", "LongTailStandardROIHeads"]
