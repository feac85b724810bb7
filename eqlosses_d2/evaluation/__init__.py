"""
Evaluation: LVIS AP with lvis-api's semantics (computed with hotcoco), Fixed, Pooled and
Boundary AP, Detectron2's evaluator on arrays, and the AP table and plot.

One module per concern (imports go down this list, never up):

- ``params``: lvis-api's parameters and metric names
- ``json_io``: fast json reading (orjson, stdlib fallback)
- ``results``: results as arrays (``ResultArrays``, ``CategoryPools``)
- ``ground_truth``: ``LVISGroundTruth`` and its rules
- ``rules``: the results prepared by lvis-api's rules (per-image cap, zero areas, NaN scores)
- ``summary``: lvis-api's summary of the precision/recall arrays
- ``hotcoco_backend`` / ``lvis_api_backend``: matching and accumulation
- ``fixed_ap``, ``pooled_ap``, ``boundary``: the other protocols
- ``evaluate``: ``evaluate_lvis`` / ``evaluate_lvis_detailed``
- ``evaluator``: ``LVISEvaluator`` (Detectron2's, on arrays)
- ``table``, ``plot``: the AP table and the per-category plot
- ``cli``: ``python -m eqlosses_d2.evaluation --annotations LVIS.json --results results.json``
"""
from .boundary import evaluate_lvis_boundary
from .evaluate import LVISEvalResult, evaluate_lvis, evaluate_lvis_detailed, per_category_records
from .evaluator import LVISEvaluator
from .fixed_ap import top_detections_per_category
from .ground_truth import LVISGroundTruth
from .params import LVIS_FIXED_METRICS, LVIS_METRICS, POOLED_METRICS
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
