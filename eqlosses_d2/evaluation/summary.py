"""
lvis-api 0.5.3's summary (``LVISEval.summarize``) of the precision and recall arrays.

Averages: a category without ground truth (in an area range) has precision and recall
-1 and is left out of every mean, as in lvis-api. Where lvis-api returns -1 for a whole
mean (e.g. ``APr`` with no rare category that has ground truth), this returns NaN
instead of -100; per-category AP is NaN for a category without ground truth.
"""
from collections import OrderedDict

import numpy as np

from .params import AREA_LABELS, DEFAULT_MAX_DETS, FREQUENCY_LABELS, IOU_THRESHOLDS

__all__ = ["mean_ap", "summarize"]


def mean_ap(s):
    """lvis-api's ``summarize`` average: entries > -1 only; NaN (lvis-api: -1) if none."""
    s = s[s > -1]
    return float(np.mean(s)) * 100 if s.size else float("nan")


def summarize(precision, recall, freq_groups, ar_max_dets=DEFAULT_MAX_DETS):
    """lvis-api's ``LVISEval.summarize``, with its indexing so the float sums match bit for bit."""
    area = {lbl: [i] for i, lbl in enumerate(AREA_LABELS)}
    t50 = np.where(0.50 == IOU_THRESHOLDS)[0]
    t75 = np.where(0.75 == IOU_THRESHOLDS)[0]
    out = OrderedDict()
    out["AP"] = mean_ap(precision[:, :, :, area["all"]])
    out["AP50"] = mean_ap(precision[t50][:, :, :, area["all"]])
    out["AP75"] = mean_ap(precision[t75][:, :, :, area["all"]])
    out["APs"] = mean_ap(precision[:, :, :, area["small"]])
    out["APm"] = mean_ap(precision[:, :, :, area["medium"]])
    out["APl"] = mean_ap(precision[:, :, :, area["large"]])
    for lbl, group in zip(FREQUENCY_LABELS, freq_groups):
        out["AP" + lbl] = mean_ap(precision[:, :, group, area["all"]])
    out[f"AR@{ar_max_dets}"] = mean_ap(recall[:, :, area["all"]])
    for lbl in ("small", "medium", "large"):
        out[f"AR{lbl[0]}@{ar_max_dets}"] = mean_ap(recall[:, :, area[lbl]])
    return out
