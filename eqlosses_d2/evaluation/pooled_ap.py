"""
Pooled AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in
the Details", 2021): ``evaluate_lvis(..., pooled=True)`` adds ``AP-pooled-all``, ``-r``,
``-c``, ``-f``. The per-(image, category) matching is the standard one, but each pool of
categories (all, or one frequency group) is ranked as a single list, its detections
concatenated image by image and category by category within an image, then sorted by
score (a stable sort) with the pool's non-ignored ground truth as the denominator;
precision at lvis-api's 101 recall thresholds, averaged over them and the IoU
thresholds. This is the authors' ``LVISPooledEval.accumulate``; the matching records
come from hotcoco (lvis-api's on the fallback path).
"""
from collections import OrderedDict
from typing import Dict

import numpy as np

from .ground_truth import LVISGroundTruth
from .params import IOU_THRESHOLDS, POOLED_METRICS, RECALL_THRESHOLDS

__all__ = ["pooled_ap", "pooled_precision"]


def pooled_precision(records):
    """
    (T, R) precision of one pool from its per-(image, category) matching records
    ``(scores (D,), matched (T, D), ignored (T, D), gt_ignore (G,))`` in pool order, as
    the authors' ``LVISPooledEval.accumulate``; None when the pool has no ground truth.
    """
    num_gt = sum(int(np.count_nonzero(np.asarray(r[3]) == 0)) for r in records)
    if not records or num_gt == 0:
        return None
    num_thrs = len(IOU_THRESHOLDS)
    scores = np.concatenate([np.asarray(r[0], dtype=np.float64) for r in records])
    order = np.argsort(-scores, kind="mergesort")
    shape = (num_thrs, -1)
    matched = np.concatenate([np.asarray(r[1]).reshape(shape) != 0 for r in records], axis=1)[:, order]
    ignored = np.concatenate([np.asarray(r[2]).reshape(shape) != 0 for r in records], axis=1)[:, order]
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    precision = np.zeros((num_thrs, len(RECALL_THRESHOLDS)))
    for t in range(num_thrs):
        tp, fp = tp_sum[t], fp_sum[t]
        rc = tp / num_gt
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # the best precision at any higher recall
        at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        inside = at < pr.size  # recall thresholds never reached keep precision 0
        precision[t, inside] = pr[at[inside]]
    return precision


def pooled_ap(gt: LVISGroundTruth, records) -> Dict[str, float]:
    """Pooled AP x 100 per pool (:data:`POOLED_METRICS`), NaN for a pool without ground truth."""
    image_ids = sorted(gt.img_ids)
    pools = [range(len(gt.cat_ids))] + list(gt.freq_groups)
    out = OrderedDict()
    for name, pool in zip(POOLED_METRICS, pools):
        cat_ids = [gt.cat_ids[k] for k in pool]
        pool_records = [records[key] for img in image_ids for key in ((img, c) for c in cat_ids) if key in records]
        precision = pooled_precision(pool_records)
        out[name] = float("nan") if precision is None else float(np.mean(precision)) * 100
    return out
