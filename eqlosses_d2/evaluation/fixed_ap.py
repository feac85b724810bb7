"""
Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in
the Details", 2021).

``max_dets_per_category=K`` (10,000 for LVIS) with ``max_dets_per_image=-1``: each
category keeps its K highest-scoring results over the whole result set (a stable sort,
so ties keep results order; categories in order of first appearance), then the
evaluation runs with no per-image cap. This is the authors' ``evaluate_ap_fixed.py``
(per-category cut, ``LVISResults(max_dets=-1)``, ``params.max_dets = -1``), so the
recall keys read ``AR@-1`` etc. as lvis-api prints them
(:data:`~.params.LVIS_FIXED_METRICS`). On result dicts: :func:`top_detections_per_category`;
on arrays: :meth:`~.results.ResultArrays.top_per_category` (the same cut).
:class:`~.evaluator.LVISEvaluator` with ``max_dets_per_category`` keeps only each
category's running top K while it collects results (:class:`~.results.CategoryPools`).
"""

__all__ = ["FIXED_AP_MAX_DETS_PER_CATEGORY", "top_detections_per_category"]

#: The per-category cut of Fixed AP on LVIS.
FIXED_AP_MAX_DETS_PER_CATEGORY = 10000


def top_detections_per_category(predictions, k: int) -> list:
    """
    Fixed AP's cut: each category's ``k`` highest-scoring results over the whole list,
    by a stable sort (ties in list order), categories in order of first appearance.
    """
    if k <= 0:
        raise ValueError(f"detections per category must be > 0, got {k}")
    by_category = {}
    for d in predictions:
        by_category.setdefault(d["category_id"], []).append(d)
    out = []
    for results in by_category.values():
        out.extend(_best(results, k))
    return out


def _best(results, k):
    """The ``k`` highest-scoring results, best first, ties in list order (a stable sort)."""
    return sorted(results, key=lambda d: d["score"], reverse=True)[:k]
