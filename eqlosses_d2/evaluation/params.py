"""
lvis-api 0.5.3's evaluation parameters (``lvis.eval.Params``) and the metric names it
reports, shared by every module of the evaluation.
"""
import numpy as np

__all__ = [
    "AREA_LABELS",
    "DEFAULT_MAX_DETS",
    "FREQUENCY_LABELS",
    "IOU_THRESHOLDS",
    "LVIS_FIXED_METRICS",
    "LVIS_METRICS",
    "POOLED_METRICS",
    "RECALL_THRESHOLDS",
]

#: Metric names, in lvis-api's order (``LVISEval.get_results()`` keys).
LVIS_METRICS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    "AR@300", "ARs@300", "ARm@300", "ARl@300",
)  # fmt: skip
#: Pooled AP's metric names (``evaluate_lvis(..., pooled=True)``), one per pool.
POOLED_METRICS = ("AP-pooled-all", "AP-pooled-r", "AP-pooled-c", "AP-pooled-f")
#: Metric names under Fixed AP (lvis-api's keys with ``params.max_dets = -1``).
LVIS_FIXED_METRICS = LVIS_METRICS[:9] + ("AR@-1", "ARs@-1", "ARm@-1", "ARl@-1")

#: IoU thresholds 0.50:0.05:0.95, computed as lvis-api computes them (bit for bit).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: The 101 recall thresholds 0:0.01:1, as lvis-api computes them.
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
#: Area ranges, in lvis-api's order (the last axis of the precision array).
AREA_LABELS = ("all", "small", "medium", "large")
#: LVIS frequency groups (rare, common, frequent), in lvis-api's order.
FREQUENCY_LABELS = ("r", "c", "f")
#: Detections per image (Detectron2's and lvis-api's default).
DEFAULT_MAX_DETS = 300
