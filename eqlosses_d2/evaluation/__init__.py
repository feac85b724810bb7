"""Evaluation: LVIS AP with lvis-api's semantics (computed with hotcoco), and the AP table."""
from .lvis_evaluation import (
    LVIS_FIXED_METRICS,
    LVIS_METRICS,
    POOLED_METRICS,
    LVISEvalResult,
    LVISEvaluator,
    LVISGroundTruth,
    evaluate_lvis,
    evaluate_lvis_detailed,
    per_category_records,
    top_detections_per_category,
)
from .boundary import evaluate_lvis_boundary
from .results import ResultArrays, compact_instances
from .table import AP_COLUMNS, format_ap_table

__all__ = [
    "AP_COLUMNS",
    "LVIS_FIXED_METRICS",
    "LVIS_METRICS",
    "POOLED_METRICS",
    "ResultArrays",
    "LVISEvalResult",
    "LVISEvaluator",
    "LVISGroundTruth",
    "compact_instances",
    "evaluate_lvis",
    "evaluate_lvis_boundary",
    "evaluate_lvis_detailed",
    "format_ap_table",
    "per_category_records",
    "top_detections_per_category",
]
