from .box_predictor import CosineClassifier, LongTailOutputLayers
from .class_stats import ClassStatsBuffers, find_class_stats
from .config_checks import validate_detectron2_names  # registration: a config check
from .decoupling import validate_box_decoupling  # registration: a config check
from .lws import LearnableWeightScaling
from .mask_predictor import NormalizedConv2d, normalize_mask_predictor
from .memory import FeatureMemory, jitter_boxes
from .one_stage import LongTailFCOS, LongTailRetinaNet  # registration: one-stage meta-architectures
from .tde import CausalNormClassifier, validate_box_tde  # registration: a config check
from .vmf import validate_box_vmf  # registration: a config check
from .roi_heads import (
    LongTailCascadeROIHeads,
    LongTailIterativeROIHeads,
    LongTailLOCEROIHeads,
    LongTailStandardROIHeads,
)
from .trainable import restrict_trainable

__all__ = [
    "CausalNormClassifier",
    "ClassStatsBuffers",
    "CosineClassifier",
    "FeatureMemory",
    "LongTailCascadeROIHeads",
    "LongTailFCOS",
    "LongTailIterativeROIHeads",
    "LongTailLOCEROIHeads",
    "LongTailOutputLayers",
    "LongTailRetinaNet",
    "LongTailStandardROIHeads",
    "LearnableWeightScaling",
    "NormalizedConv2d",
    "find_class_stats",
    "jitter_boxes",
    "normalize_mask_predictor",
    "restrict_trainable",
    "validate_box_decoupling",
    "validate_box_tde",
    "validate_box_vmf",
    "validate_detectron2_names",
]
