"""
LVIS box/mask AP that gives lvis-api's numbers with today's numpy.

:func:`evaluate_lvis` evaluates LVIS-style results (dicts with ``image_id``, 1-based
dataset ``category_id``, ``score``, ``bbox`` in xywh and/or an RLE ``segmentation``)
against LVIS ground truth (a json path, a loaded dict, or an object with a ``.dataset``
dict such as ``lvis.LVIS``). It returns lvis-api's summary metrics times 100: ``AP AP50
AP75 APs APm APl APr APc APf`` and ``AR@300 ARs@300 ARm@300 ARl@300`` (lvis-api's own key
names; like lvis-api, the ``@300`` does not change with ``max_dets_per_image``).
:func:`evaluate_lvis_detailed` returns the same metrics plus per-category AP and the
precision/recall arrays. Both also take the results as :class:`~.results.ResultArrays`
(arrays instead of a dict per detection).

Why not lvis-api itself: lvis-api 0.5.3 (the PyPI ``lvis`` package Detectron2 uses)
crashes in ``LVISEval.accumulate`` on numpy >= 1.24 (``np.float``), and it is slow: its
matching is pure Python. Here hotcoco matches and accumulates (:mod:`.hotcoco_backend`),
on the input prepared by lvis-api's rules (:mod:`.ground_truth`, :mod:`.rules`), and
lvis-api's summary is computed with its own indexing (:mod:`.summary`), so every number
matches lvis-api's to the last bit; ground truth that only lvis-api evaluates exactly
goes to lvis-api (:mod:`.lvis_api_backend`). Fixed AP: :mod:`.fixed_ap`; Pooled AP:
:mod:`.pooled_ap`; Boundary AP: :mod:`.boundary`.

Quick benchmark on this machine (2 CPU cores shared with other jobs, load ~3, so
+-30%): synthetic LVIS-format data, 500 images, 100 categories, 10 box/polygon ground
truths and 300 detections per image (150,000 detections), results in memory, both
producing the same numbers:

    ====  ====================  =============  =======  ================================
    task  lvis-api 0.5.3 + shim  evaluate_lvis  speedup  matching + accumulation only
    ====  ====================  =============  =======  ================================
    bbox  9.7 - 17.0 s          0.43 - 0.67 s  ~25x     9.4 - 16.6 s vs 0.10 - 0.20 s, ~80x
    segm  12.6 - 17.8 s         1.2 - 2.2 s    ~9x      10.4 - 15.1 s vs 0.32 - 0.65 s, ~25x
    ====  ====================  =============  =======  ================================

Outside hotcoco the time goes into reading the results list (and, for masks, the RLE
areas), which lvis-api also does. ``benchmarks/bench_lvis_eval.py`` measures it at LVIS
size, and the command line (:mod:`.cli`) from json files.

An empty results list gives NaN for every metric and a warning, as Detectron2 does
(lvis-api itself would raise).
"""
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .fixed_ap import top_detections_per_category
from .ground_truth import LVISGroundTruth
from .hotcoco_backend import accumulate_hotcoco
from .lvis_api_backend import accumulate_lvis_api
from .params import DEFAULT_MAX_DETS, LVIS_FIXED_METRICS, LVIS_METRICS, POOLED_METRICS
from .pooled_ap import pooled_ap
from .results import ResultArrays, check_mask_results
from .rules import check_scores, prepare_arrays, prepare_detections
from .summary import mean_ap, summarize

__all__ = ["LVISEvalResult", "evaluate_lvis", "evaluate_lvis_detailed", "per_category_records"]

logger = logging.getLogger(__name__)


@dataclass
class LVISEvalResult:
    """What :func:`evaluate_lvis_detailed` returns."""

    iou_type: str
    #: lvis-api's summary metrics x 100 (keys: :data:`LVIS_METRICS`); NaN where lvis-api says -1.
    metrics: Dict[str, float]
    #: category id -> AP x 100 over all areas; NaN for a category without ground truth.
    per_category_ap: Dict[int, float]
    #: the ground-truth category dicts, sorted by id.
    categories: List[dict] = field(repr=False, default_factory=list)
    #: ``(iou_thr, recall_thr, category, area)``, -1 where a category has no ground truth.
    precision: Optional[np.ndarray] = field(repr=False, default=None)
    #: ``(iou_thr, category, area)``, -1 where a category has no ground truth.
    recall: Optional[np.ndarray] = field(repr=False, default=None)
    #: "hotcoco", "lvis-api", or "none" (empty results).
    backend: str = "hotcoco"
    #: results evaluated after the per-image cap and lvis-api's filters.
    num_detections: int = 0


def evaluate_lvis_detailed(
    lvis_gt, predictions, iou_type, max_dets_per_image=DEFAULT_MAX_DETS, max_dets_per_category=None, pooled=False
) -> LVISEvalResult:
    """
    Like :func:`evaluate_lvis`, but also returns per-category AP and the
    precision/recall arrays (see :class:`LVISEvalResult`).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if max_dets_per_image is None:
        max_dets_per_image = DEFAULT_MAX_DETS
    gt = lvis_gt if isinstance(lvis_gt, LVISGroundTruth) else LVISGroundTruth(lvis_gt)
    arrays = predictions if isinstance(predictions, ResultArrays) else None
    if arrays is None:
        predictions = list(predictions)
        if predictions and (iou_type == "segm" or "bbox" not in predictions[0]):  # masks are read
            check_mask_results(predictions)
    check_scores(predictions)
    if arrays is not None and gt.lvis_api_reason:
        predictions, arrays = arrays.to_dicts(), None  # lvis-api takes dicts
    if max_dets_per_category is not None:
        if arrays is not None:
            predictions = arrays = arrays.take(arrays.top_per_category(max_dets_per_category))
        else:
            predictions = top_detections_per_category(predictions, max_dets_per_category)
        ar_max_dets, metric_names = -1, LVIS_FIXED_METRICS
    else:
        ar_max_dets, metric_names = DEFAULT_MAX_DETS, LVIS_METRICS
    if not len(predictions):
        logger.warning("No predictions from the model! LVIS %s metrics are NaN.", iou_type)
        nan = float("nan")
        return LVISEvalResult(
            iou_type=iou_type,
            metrics=OrderedDict((k, nan) for k in metric_names + (POOLED_METRICS if pooled else ())),
            per_category_ap={c: nan for c in gt.cat_ids},
            categories=gt.categories,
            backend="none",
        )
    if gt.lvis_api_reason:
        logger.warning("LVIS ground truth has %s: evaluating %s with lvis-api (slow).", gt.lvis_api_reason, iou_type)
        precision, recall, num, records = accumulate_lvis_api(gt, predictions, iou_type, max_dets_per_image)
        backend = "lvis-api"
    else:
        prepare = prepare_detections if arrays is None else prepare_arrays
        dts, per_image = prepare(predictions, iou_type, gt, max_dets_per_image)
        precision, recall, records = accumulate_hotcoco(gt, dts, per_image, iou_type, with_records=pooled)
        num, backend = len(dts), "hotcoco"
    per_category_ap = {cat_id: mean_ap(precision[:, :, k, 0]) for k, cat_id in enumerate(gt.cat_ids)}
    metrics = summarize(precision, recall, gt.freq_groups, ar_max_dets)
    if pooled:
        metrics.update(pooled_ap(gt, records))
    return LVISEvalResult(
        iou_type=iou_type,
        metrics=metrics,
        per_category_ap=per_category_ap,
        categories=gt.categories,
        precision=precision,
        recall=recall,
        backend=backend,
        num_detections=num,
    )


def evaluate_lvis(
    lvis_gt, predictions, iou_type, max_dets_per_image=DEFAULT_MAX_DETS, max_dets_per_category=None, pooled=False
) -> Dict[str, float]:
    """
    lvis-api 0.5.3's metrics (``LVISResults(gt, predictions, max_dets)`` then
    ``LVISEval(...).run()``), computed with hotcoco; see the module docstring.

    Args:
        lvis_gt: LVIS json path, loaded dict, object with a ``.dataset`` dict
            (``lvis.LVIS``), or :class:`LVISGroundTruth`. Not modified.
        predictions: list of result dicts (``image_id``, dataset ``category_id``,
            ``score``, ``bbox`` xywh and/or RLE ``segmentation``), or the same results as
            :class:`~.results.ResultArrays` (no dict per detection). Not modified.
        iou_type: "bbox" or "segm".
        max_dets_per_image: lvis-api's per-image cap across all categories;
            negative: no cap; None: 300.
        max_dets_per_category: Fixed AP's per-category cut over the whole set (applied
            first); None: none. Fixed AP is ``max_dets_per_image=-1,
            max_dets_per_category=10000``.
        pooled: also Pooled AP (:data:`POOLED_METRICS`).

    Returns:
        ``{metric: value x 100}`` for :data:`LVIS_METRICS` (:data:`LVIS_FIXED_METRICS`
        with ``max_dets_per_category``), NaN where undefined.
    """
    return evaluate_lvis_detailed(
        lvis_gt, predictions, iou_type, max_dets_per_image, max_dets_per_category, pooled
    ).metrics


def per_category_records(result: LVISEvalResult):
    """One dict per category (id, name, frequency, image_count, AP; AP None when undefined)."""
    records = []
    for cat in result.categories:
        ap = result.per_category_ap[cat["id"]]
        records.append(
            {
                "id": cat["id"],
                "name": cat.get("name"),
                "frequency": cat.get("frequency"),
                "image_count": cat.get("image_count"),
                "AP": None if math.isnan(ap) else ap,
            }
        )
    return records
