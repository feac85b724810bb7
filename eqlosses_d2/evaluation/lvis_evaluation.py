"""
LVIS box/mask AP that gives lvis-api's numbers with today's numpy.

What it does
------------
:func:`evaluate_lvis` evaluates LVIS-style results (dicts with ``image_id``,
1-based dataset ``category_id``, ``score``, ``bbox`` in xywh and/or an RLE
``segmentation``) against LVIS ground truth (a json path, a loaded dict, or an
object with a ``.dataset`` dict such as ``lvis.LVIS``). It returns lvis-api's
summary metrics times 100: ``AP AP50 AP75 APs APm APl APr APc APf`` and
``AR@300 ARs@300 ARm@300 ARl@300`` (lvis-api's own key names; like lvis-api, the
``@300`` does not change with ``max_dets_per_image``).
:func:`evaluate_lvis_detailed` returns the same metrics plus per-category AP and
the precision/recall arrays. Both also take the results as
:class:`~.results.ResultArrays` (arrays instead of a dict per detection).
:class:`LVISEvaluator` is Detectron2's own ``LVISEvaluator`` with the lvis-api call
replaced by :func:`evaluate_lvis`, and the results kept, gathered and saved as arrays.

Why not lvis-api itself
-----------------------
lvis-api 0.5.3 (the PyPI ``lvis`` package Detectron2 uses) crashes in
``LVISEval.accumulate`` on numpy >= 1.24 (``np.float``), and it is slow: its
matching is pure Python.

Which library does the matching
-------------------------------
hotcoco (Rust; tested with 1.3.0) runs per-image matching and accumulation, in
its LVIS mode (``LVISEval`` = ``COCOeval(..., lvis_style=True)``), which applies
the federated rules: detections of a category that is neither annotated nor in
the image's ``neg_category_ids`` are dropped, and unmatched detections of a
category in ``not_exhaustive_category_ids`` are ignored. Its precision and
recall arrays are bit-identical to lvis-api's once the input is prepared the way
lvis-api prepares it (below); the summary numbers are then computed here with
lvis-api's own indexing and averaging, so they match to the last bit (the tests
compare every metric, bbox and segm, to 1e-9; the difference measured is 0.0).
Since hotcoco could be made exact, the other options (faster-coco-eval's LVIS
mode, lvis-api under an ``np.float`` shim) were not needed; lvis-api is used only
for the one input hotcoco cannot express (rule 4).

Quick benchmark on this machine (2 CPU cores shared with other jobs, load ~3,
so +-30%): synthetic LVIS-format data, 500 images, 100 categories, 10 box/polygon
ground truths and 300 detections per image (150,000 detections), results in
memory, both producing the same numbers:

    ====  ====================  =============  =======  ================================
    task  lvis-api 0.5.3 + shim  evaluate_lvis  speedup  matching + accumulation only
    ====  ====================  =============  =======  ================================
    bbox  9.7 - 17.0 s          0.43 - 0.67 s  ~25x     9.4 - 16.6 s vs 0.10 - 0.20 s, ~80x
    segm  12.6 - 17.8 s         1.2 - 2.2 s    ~9x      10.4 - 15.1 s vs 0.32 - 0.65 s, ~25x
    ====  ====================  =============  =======  ================================

Outside hotcoco the time goes into reading the results list (and, for masks,
the RLE areas), which lvis-api also does.

lvis-api rules applied around hotcoco
-------------------------------------
1. Per-image cap (``LVISResults.limit_dets_per_image``): an image with more than
   ``max_dets_per_image`` results keeps its highest-scoring ones *across all
   categories*, ties in results order (stable sort); it is applied to the raw
   results, *before* anything below is dropped. A negative cap keeps all.
   ``None`` means 300, as in Detectron2. (hotcoco's ``LVISResults`` caps the
   same way, but rule 2 has to come after the cap, so the cap is done here.)
2. Zero area: lvis-api's ``get_ann_ids(cat_ids=...)`` keeps only annotations
   with ``0 < area < inf``; hotcoco keeps them all, so they are dropped here.
   For ground truth that is the json ``area`` field, and
   a dropped ground truth no longer makes its category "present" in the image
   (so detections of it there are ignored unless it is in the negative list).
   For results the area is ``w * h`` of ``bbox`` when the first result has a
   ``bbox``, else the mask area. Such results are dropped after the cap.
3. Results or ground truth whose ``category_id`` is not in ``categories`` are
   ignored; a result on an image that is not in the ground truth is an error.
4. lvis-api ignores ``iscrowd`` (all ground truth is matched as non-crowd);
   hotcoco honours it, so it is set to 0 on our copy. lvis-api honours a ground
   truth ``ignore`` flag, which hotcoco does not; and lvis-api records a match by
   the ground truth's ``id``, so a detection matched to an annotation with id 0
   counts as a false positive there (hotcoco counts it as a true positive). If
   any kept ground truth has a truthy ``ignore`` or the id 0, the evaluation
   falls back to lvis-api with ``np.float`` aliased to ``float`` for the
   duration of the call (LVIS json files have neither).
5. No per-(image, category) limit: hotcoco's LVIS mode cuts each
   (image, category) at ``params.max_dets`` (300) even when the per-image cap
   is larger or off; lvis-api does not, so that limit is raised to the largest
   per-image count.
6. ``segm``: ``bbox`` is dropped from the results first, so the area used for
   the small/medium/large split is the mask area (Detectron2 does the same; with
   a ``bbox`` lvis-api would use the box area). ``bbox``: the ``segmentation``
   is dropped (lvis-api never looks at it when a ``bbox`` is there).
7. Averages: a category without ground truth (in an area range) has precision
   and recall -1 and is left out of every mean, as in lvis-api. Where lvis-api
   returns -1 for a whole mean (e.g. ``APr`` with no rare category that has
   ground truth), this returns NaN instead of -100; per-category AP is NaN for
   a category without ground truth.
8. Inputs are never modified (lvis-api adds ``area``/``id``/``segmentation``
   to result dicts and ``ignore``/``_ignore`` and RLEs to ground truth).

An empty results list gives NaN for every metric and a warning, as Detectron2
does (lvis-api itself would raise). A NaN score is an error (one line naming the
first such result), checked before the per-image cap or Fixed AP's cut could drop
it silently; hotcoco refuses one that survives them, lvis-api ranks it arbitrarily.
A mask result whose ``segmentation`` is not a compressed RLE (a polygon, an
uncompressed RLE) is an error naming the result; lvis-api fails on one with a
``TypeError``, hotcoco scores an uncompressed RLE as an empty mask.

Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is
in the Details", 2021)
---------------------------------------------------------------------------------
``max_dets_per_category=K`` (10,000 for LVIS) with ``max_dets_per_image=-1``: each
category keeps its K highest-scoring results over the whole result set (a stable
sort, so ties keep results order; categories in order of first appearance), then the
evaluation runs with no per-image cap. This is the authors' ``evaluate_ap_fixed.py``
(per-category cut, ``LVISResults(max_dets=-1)``, ``params.max_dets = -1``), so the
recall keys read ``AR@-1`` etc. as lvis-api prints them (:data:`LVIS_FIXED_METRICS`).
:class:`LVISEvaluator` with ``max_dets_per_category`` keeps only each category's
running top K while it collects results, as arrays (:class:`~.results.CategoryPools`:
fewer than 2K per category after every image), sends only each category's top K to
the main process, and can hand the K-th best score of each category to the model
(``score_floor_consumers``), which then skips the mask head for detections that cannot
enter the top K; all exact: the final top K is unchanged.

Pooled AP (same paper): ``pooled=True`` adds ``AP-pooled-all``, ``-r``, ``-c``, ``-f``:
the per-(image, category) matching is the standard one, but each pool of categories
(all, or one frequency group) is ranked as a single list, its detections concatenated
image by image and category by category within an image, then sorted by score (a
stable sort) with the pool's non-ignored ground truth as the denominator; precision at
lvis-api's 101 recall thresholds, averaged over them and the IoU thresholds. This is
the authors' ``LVISPooledEval.accumulate``; the matching records come from hotcoco
(lvis-api's on the fallback path).
"""
import contextlib
import gc
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..atomic import atomic_write
from ..compat import apply_detectron2_patches
from .results import CategoryPools, ResultArrays, check_mask_results, compact_instances

apply_detectron2_patches()  # idempotent; detectron2.evaluation needs it without the C++ extension

from detectron2.evaluation import LVISEvaluator as _Detectron2LVISEvaluator  # noqa: E402
from detectron2.utils.logger import create_small_table  # noqa: E402

__all__ = [
    "LVIS_FIXED_METRICS",
    "LVIS_METRICS",
    "POOLED_METRICS",
    "LVISEvalResult",
    "LVISEvaluator",
    "LVISGroundTruth",
    "evaluate_lvis",
    "evaluate_lvis_detailed",
    "per_category_records",
    "top_detections_per_category",
]

logger = logging.getLogger(__name__)

#: Metric names, in lvis-api's order (``LVISEval.get_results()`` keys).
LVIS_METRICS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    "AR@300", "ARs@300", "ARm@300", "ARl@300",
)  # fmt: skip
#: Pooled AP's metric names (``evaluate_lvis(..., pooled=True)``), one per pool.
POOLED_METRICS = ("AP-pooled-all", "AP-pooled-r", "AP-pooled-c", "AP-pooled-f")
#: Metric names under Fixed AP (lvis-api's keys with ``params.max_dets = -1``).
LVIS_FIXED_METRICS = LVIS_METRICS[:9] + ("AR@-1", "ARs@-1", "ARm@-1", "ARl@-1")

# lvis-api's Params: IoU thresholds, area ranges (labels) and frequency groups.
_IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
_AREA_LBL = ["all", "small", "medium", "large"]
_FREQ_LBL = ["r", "c", "f"]
_DEFAULT_MAX_DETS = 300
_REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _load_dataset(lvis_gt):
    if isinstance(lvis_gt, (str, os.PathLike)):
        with open(lvis_gt, "r") as f:
            return json.load(f)
    if isinstance(lvis_gt, dict):
        return lvis_gt
    dataset = getattr(lvis_gt, "dataset", None)  # lvis.LVIS, hotcoco.COCO, pycocotools COCO
    if isinstance(dataset, dict):
        return dataset
    raise TypeError(f"Unsupported LVIS ground truth of type {type(lvis_gt).__name__}")


class LVISGroundTruth:
    """
    LVIS ground truth prepared once for :func:`evaluate_lvis` (pass it instead of
    a path or dict to evaluate several tasks or result sets without re-preparing).

    Holds its own copies of the kept annotations (``0 < area < inf``, known
    category, ``iscrowd`` 0); the caller's dataset is not modified.
    """

    def __init__(self, lvis_gt):
        dataset = _load_dataset(lvis_gt)
        self.categories: List[dict] = sorted(dataset["categories"], key=lambda c: c["id"])
        self.cat_ids: List[int] = [c["id"] for c in self.categories]
        self.images: List[dict] = list(dataset["images"])
        self.img_ids = {img["id"] for img in self.images}
        known = set(self.cat_ids)
        with _gc_paused():
            self.annotations: List[dict] = [
                dict(ann, iscrowd=0)
                for ann in dataset["annotations"]
                if ann["category_id"] in known and 0 < ann["area"] < float("inf")
            ]
        # lvis-api honours a ground-truth "ignore" flag; hotcoco does not (rule 4).
        self.has_ignore_flags = any(ann.get("ignore") for ann in self.annotations)
        # lvis-api never counts a match to an annotation with id 0 (rule 4).
        self.zero_id_annotation = next((ann for ann in self.annotations if ann.get("id") == 0), None)
        # lvis-api's LVISEval._prepare_freq_group: indices into the sorted cat_ids.
        self.freq_groups: List[List[int]] = [[] for _ in _FREQ_LBL]
        for idx, cat in enumerate(self.categories):
            self.freq_groups[_FREQ_LBL.index(cat["frequency"])].append(idx)
        self._hotcoco_gt = None

    @property
    def lvis_api_reason(self) -> Optional[str]:
        """Why only lvis-api evaluates this ground truth exactly (rule 4), or None."""
        if self.has_ignore_flags:
            return "'ignore' flags, which hotcoco does not honour"
        if self.zero_id_annotation is not None:
            ann = self.zero_id_annotation
            return (
                f"an annotation with id 0 (image_id {ann['image_id']}, category_id {ann['category_id']}), "
                "to which lvis-api never counts a match (its detection is a false positive) and hotcoco does"
            )
        return None

    def _dataset(self):
        return {"images": self.images, "categories": self.categories, "annotations": self.annotations}

    def hotcoco(self):
        """The ground truth as a ``hotcoco.COCO`` (built on first use)."""
        if self._hotcoco_gt is None:
            import hotcoco

            self._hotcoco_gt = hotcoco.COCO(self._dataset())
        return self._hotcoco_gt

    def lvis_api(self):
        """The ground truth as an ``lvis.LVIS`` owning copies of the annotation dicts
        (lvis-api writes into them)."""
        from lvis import LVIS

        gt = LVIS.__new__(LVIS)  # LVIS() only reads from a path
        gt.logger = logging.getLogger("lvis.lvis")
        gt.dataset = {
            "images": self.images,
            "categories": self.categories,
            "annotations": [dict(ann) for ann in self.annotations],
        }
        gt._create_index()
        return gt


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


@contextlib.contextmanager
def _gc_paused():
    """
    Creating 10^5-10^6 small dicts sets off full garbage collections that rescan every
    live object (the caller's results included): 6x slower at 150k results. Nothing
    cyclic is created meanwhile, so pause the collector for that loop.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_scores(predictions):
    """One clear error if a result's score is NaN (before any cut could drop it unseen)."""
    if isinstance(predictions, ResultArrays):
        scores = predictions.scores
    else:
        scores = np.fromiter((d["score"] for d in predictions), dtype=np.float64, count=len(predictions))
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        first = int(bad[0])
        if isinstance(predictions, ResultArrays):
            image_id, category_id = int(predictions.image_ids[first]), int(predictions.category_ids[first])
        else:
            image_id, category_id = predictions[first].get("image_id"), predictions[first].get("category_id")
        raise ValueError(
            f"LVIS results: {bad.size} result(s) have a NaN score, the first is result {first} "
            f"(image_id {image_id}, category_id {category_id}); scores rank the detections, so every metric "
            "would be undefined"
        )


def _cap_per_image(dts, max_dets):
    """lvis-api's ``LVISResults.limit_dets_per_image`` (a no-op where no image is over the cap)."""
    counts = Counter(d["image_id"] for d in dts)
    if max_dets < 0 or max(counts.values(), default=0) <= max_dets:
        return dts
    per_image = {}
    for dt in dts:
        per_image.setdefault(dt["image_id"], []).append(dt)
    out = []
    for anns in per_image.values():
        if len(anns) > max_dets:
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]  # stable
        out.extend(anns)
    return out


def _prepare_detections(predictions, iou_type, gt: LVISGroundTruth, max_dets):
    """
    The results as lvis-api would evaluate them (rules 1-3 and 6 of the module
    docstring), in a new container: for boxes, hotcoco's ``(N, 7)`` array
    ``[image_id, x, y, w, h, score, category_id]`` (no dict per detection); for
    masks, new dicts holding only what the evaluation reads.

    Returns:
        (detections, {image_id: number of detections kept})
    """
    dts = _cap_per_image(predictions, max_dets)
    unknown = {d["image_id"] for d in dts} - gt.img_ids
    if unknown:
        raise ValueError(
            f"Results do not correspond to the LVIS ground truth: {len(unknown)} image ids are "
            f"not in it (e.g. {sorted(unknown)[:5]})"
        )
    if not dts:
        return [], {}
    image_ids = np.array([d["image_id"] for d in dts], dtype=np.int64)
    category_ids = np.array([d["category_id"] for d in dts], dtype=np.int64)
    known = np.isin(category_ids, gt.cat_ids)
    if iou_type == "bbox" and "bbox" in dts[0]:  # lvis-api looks at the first result only
        boxes = np.array([d["bbox"] for d in dts], dtype=np.float64).reshape(-1, 4)
        areas = boxes[:, 2] * boxes[:, 3]
        keep = known & (areas > 0) & (areas < np.inf)
        out = np.empty((int(keep.sum()), 7), dtype=np.float64)
        out[:, 0] = image_ids[keep]
        out[:, 1:5] = boxes[keep]
        out[:, 5] = np.array([d["score"] for d in dts], dtype=np.float64)[keep]
        out[:, 6] = category_ids[keep]
        if np.abs(out[:, [0, 6]]).max(initial=0) >= 2**53:
            raise ValueError("image/category ids too large for hotcoco's array input")
    else:  # segm, or box evaluation of mask-only results (box and area from the mask)
        import hotcoco  # pixel count, as pycocotools' (whose list form overflows past 255 RLEs)

        masks = [d["segmentation"] for d in dts]
        areas = hotcoco.mask.area(masks).astype(np.float64)
        keep = known & (areas > 0)
        with _gc_paused():
            out = [
                {
                    "image_id": d["image_id"],
                    "category_id": d["category_id"],
                    "score": d["score"],
                    "segmentation": m,
                }
                for d, m, k in zip(dts, masks, keep.tolist())
                if k
            ]
    ids, counts = np.unique(image_ids[keep], return_counts=True)
    return out, dict(zip(ids.tolist(), counts.tolist()))


def _cap_arrays_per_image(results: ResultArrays, max_dets) -> np.ndarray:
    """:func:`_cap_per_image` on arrays: the indices kept, in the order it keeps them."""
    num = len(results)
    if max_dets < 0 or num == 0:
        return np.arange(num)
    unique, first, inverse, counts = np.unique(
        results.image_ids, return_index=True, return_inverse=True, return_counts=True
    )
    if counts.max() <= max_dets:
        return np.arange(num)
    group = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse]  # images by first appearance
    over = counts[inverse] > max_dets  # only these are sorted by score (stable), and cut
    score_key = np.where(over, -results.scores.astype(np.float64), 0.0)
    order = np.lexsort((np.arange(num), score_key, group))
    grouped = group[order]
    rank = np.arange(num) - np.searchsorted(grouped, grouped, side="left")
    return order[rank < max_dets]


def _prepare_arrays(results: ResultArrays, iou_type, gt: LVISGroundTruth, max_dets):
    """:func:`_prepare_detections` for :class:`ResultArrays` (the same rules, the same
    output), without a dict per detection on the way."""
    index = _cap_arrays_per_image(results, max_dets)
    image_ids = results.image_ids[index]
    unknown = set(np.unique(image_ids).tolist()) - gt.img_ids
    if unknown:
        raise ValueError(
            f"Results do not correspond to the LVIS ground truth: {len(unknown)} image ids are "
            f"not in it (e.g. {sorted(unknown)[:5]})"
        )
    if not len(index):
        return [], {}
    category_ids = results.category_ids[index]
    known = np.isin(category_ids, gt.cat_ids)
    if iou_type == "bbox":
        boxes = results.boxes[index].astype(np.float64)
        areas = boxes[:, 2] * boxes[:, 3]
        keep = known & (areas > 0) & (areas < np.inf)
        out = np.empty((int(keep.sum()), 7), dtype=np.float64)
        out[:, 0] = image_ids[keep]
        out[:, 1:5] = boxes[keep]
        out[:, 5] = results.scores[index][keep]
        out[:, 6] = category_ids[keep]
        if np.abs(out[:, [0, 6]]).max(initial=0) >= 2**53:
            raise ValueError("image/category ids too large for hotcoco's array input")
    else:
        import hotcoco

        if not results.has_masks:
            raise ValueError("segm evaluation of results without masks")
        masks = results.segmentations(index)
        keep = known & (hotcoco.mask.area(masks).astype(np.float64) > 0)
        scores = results.scores[index].tolist()
        with _gc_paused():
            out = [
                {"image_id": i, "category_id": c, "score": s, "segmentation": m}
                for i, c, s, m, k in zip(image_ids.tolist(), category_ids.tolist(), scores, masks, keep.tolist())
                if k
            ]
    ids, counts = np.unique(image_ids[keep], return_counts=True)
    return out, dict(zip(ids.tolist(), counts.tolist()))


def _accumulate_hotcoco(gt: LVISGroundTruth, dts, per_image, iou_type, with_records=False):
    import hotcoco

    coco_gt = gt.hotcoco()
    coco_dt = hotcoco.LVISResults(coco_gt, dts, max_dets=-1)  # capped already (rule 1)
    ev = hotcoco.LVISEval(coco_gt, coco_dt, iou_type)
    # Rule 5: no per-(image, category) limit, as in lvis-api.
    ev.params.max_dets = [max(_DEFAULT_MAX_DETS, max(per_image.values(), default=0))]
    ev.evaluate()
    ev.accumulate()
    params = ev.params
    if (
        list(params.cat_ids) != gt.cat_ids
        or list(params.area_rng_lbl) != _AREA_LBL
        or not np.allclose(params.iou_thrs, _IOU_THRS, rtol=0, atol=1e-12)
    ):
        raise RuntimeError("hotcoco's LVIS evaluation is not laid out as lvis-api's; check its version")
    precision = np.asarray(ev.eval["precision"])[..., -1]  # drop the max_dets axis
    recall = np.asarray(ev.eval["recall"])[..., -1]
    records = None
    if with_records:  # the matching of each (image, category) at area "all", for Pooled AP
        all_area = list(params.area_rng[0])
        records = {
            (e["image_id"], e["category_id"]): (e["dtScores"], e["dtMatched"], e["dtIgnore"], e["gtIgnore"])
            for e in ev.eval_imgs
            if e is not None and list(e["aRng"]) == all_area
        }
    return precision, recall, records


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis-api 0.5.3's accumulate() uses ``np.float``, removed in numpy 1.24."""
    if hasattr(np, "float"):
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


def _accumulate_lvis_api(gt: LVISGroundTruth, predictions, iou_type, max_dets):
    """lvis-api itself, on copies (rules 1-3 are its own); for ground truth with "ignore" flags."""
    from lvis import LVISEval, LVISResults

    lvis_gt = gt.lvis_api()
    keys = {"image_id", "category_id", "score", "bbox", "segmentation"}
    dts = [{k: v for k, v in d.items() if k in keys} for d in predictions]
    if iou_type == "segm":
        for d in dts:
            d.pop("bbox", None)
    with _numpy_float_alias():
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dts, max_dets=max_dets), iou_type)
        ev.evaluate()
        ev.accumulate()
    num = len(ev.lvis_dt.get_ann_ids(img_ids=ev.params.img_ids, cat_ids=ev.params.cat_ids))
    all_area = list(ev.params.area_rng[0])
    records = {
        (e["image_id"], e["category_id"]): (e["dt_scores"], e["dt_matches"], e["dt_ignore"], e["gt_ignore"])
        for e in ev.eval_imgs
        if e is not None and list(e["area_rng"]) == all_area
    }
    return ev.eval["precision"], ev.eval["recall"], num, records


def _pooled_precision(records):
    """
    (T, R) precision of one pool from its per-(image, category) matching records
    ``(scores (D,), matched (T, D), ignored (T, D), gt_ignore (G,))`` in pool order, as
    the authors' ``LVISPooledEval.accumulate``; None when the pool has no ground truth.
    """
    num_gt = sum(int(np.count_nonzero(np.asarray(r[3]) == 0)) for r in records)
    if not records or num_gt == 0:
        return None
    num_thrs = len(_IOU_THRS)
    scores = np.concatenate([np.asarray(r[0], dtype=np.float64) for r in records])
    order = np.argsort(-scores, kind="mergesort")
    shape = (num_thrs, -1)
    matched = np.concatenate([np.asarray(r[1]).reshape(shape) != 0 for r in records], axis=1)[:, order]
    ignored = np.concatenate([np.asarray(r[2]).reshape(shape) != 0 for r in records], axis=1)[:, order]
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    precision = np.zeros((num_thrs, len(_REC_THRS)))
    for t in range(num_thrs):
        tp, fp = tp_sum[t], fp_sum[t]
        rc = tp / num_gt
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # the best precision at any higher recall
        at = np.searchsorted(rc, _REC_THRS, side="left")
        inside = at < pr.size  # recall thresholds never reached keep precision 0
        precision[t, inside] = pr[at[inside]]
    return precision


def _pooled_ap(gt: "LVISGroundTruth", records) -> Dict[str, float]:
    """Pooled AP x 100 per pool (:data:`POOLED_METRICS`), NaN for a pool without ground truth."""
    image_ids = sorted(gt.img_ids)
    pools = [range(len(gt.cat_ids))] + list(gt.freq_groups)
    out = OrderedDict()
    for name, pool in zip(POOLED_METRICS, pools):
        cat_ids = [gt.cat_ids[k] for k in pool]
        pool_records = [records[key] for img in image_ids for key in ((img, c) for c in cat_ids) if key in records]
        precision = _pooled_precision(pool_records)
        out[name] = float("nan") if precision is None else float(np.mean(precision)) * 100
    return out


def _mean(s):
    """lvis-api's ``_summarize`` average: entries > -1 only; NaN (lvis-api: -1) if none."""
    s = s[s > -1]
    return float(np.mean(s)) * 100 if s.size else float("nan")


def _summarize(precision, recall, freq_groups, ar_max_dets=_DEFAULT_MAX_DETS):
    """lvis-api's ``LVISEval.summarize``, with its indexing so the float sums match bit for bit."""
    area = {lbl: [i] for i, lbl in enumerate(_AREA_LBL)}
    t50 = np.where(0.50 == _IOU_THRS)[0]
    t75 = np.where(0.75 == _IOU_THRS)[0]
    out = OrderedDict()
    out["AP"] = _mean(precision[:, :, :, area["all"]])
    out["AP50"] = _mean(precision[t50][:, :, :, area["all"]])
    out["AP75"] = _mean(precision[t75][:, :, :, area["all"]])
    out["APs"] = _mean(precision[:, :, :, area["small"]])
    out["APm"] = _mean(precision[:, :, :, area["medium"]])
    out["APl"] = _mean(precision[:, :, :, area["large"]])
    for lbl, group in zip(_FREQ_LBL, freq_groups):
        out["AP" + lbl] = _mean(precision[:, :, group, area["all"]])
    out[f"AR@{ar_max_dets}"] = _mean(recall[:, :, area["all"]])
    for lbl in ("small", "medium", "large"):
        out[f"AR{lbl[0]}@{ar_max_dets}"] = _mean(recall[:, :, area[lbl]])
    return out


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


def evaluate_lvis_detailed(
    lvis_gt, predictions, iou_type, max_dets_per_image=_DEFAULT_MAX_DETS, max_dets_per_category=None, pooled=False
) -> LVISEvalResult:
    """
    Like :func:`evaluate_lvis`, but also returns per-category AP and the
    precision/recall arrays (see :class:`LVISEvalResult`).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if max_dets_per_image is None:
        max_dets_per_image = _DEFAULT_MAX_DETS
    gt = lvis_gt if isinstance(lvis_gt, LVISGroundTruth) else LVISGroundTruth(lvis_gt)
    arrays = predictions if isinstance(predictions, ResultArrays) else None
    if arrays is None:
        predictions = list(predictions)
        if predictions and (iou_type == "segm" or "bbox" not in predictions[0]):  # masks are read
            check_mask_results(predictions)
    _check_scores(predictions)
    if arrays is not None and gt.lvis_api_reason:
        predictions, arrays = arrays.to_dicts(), None  # lvis-api takes dicts
    if max_dets_per_category is not None:
        if arrays is not None:
            predictions = arrays = arrays.take(arrays.top_per_category(max_dets_per_category))
        else:
            predictions = top_detections_per_category(predictions, max_dets_per_category)
        ar_max_dets, metric_names = -1, LVIS_FIXED_METRICS
    else:
        ar_max_dets, metric_names = _DEFAULT_MAX_DETS, LVIS_METRICS
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
        precision, recall, num, records = _accumulate_lvis_api(gt, predictions, iou_type, max_dets_per_image)
        backend = "lvis-api"
    else:
        prepare = _prepare_detections if arrays is None else _prepare_arrays
        dts, per_image = prepare(predictions, iou_type, gt, max_dets_per_image)
        precision, recall, records = _accumulate_hotcoco(gt, dts, per_image, iou_type, with_records=pooled)
        num, backend = len(dts), "hotcoco"
    per_category_ap = {cat_id: _mean(precision[:, :, k, 0]) for k, cat_id in enumerate(gt.cat_ids)}
    metrics = _summarize(precision, recall, gt.freq_groups, ar_max_dets)
    if pooled:
        metrics.update(_pooled_ap(gt, records))
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
    lvis_gt, predictions, iou_type, max_dets_per_image=_DEFAULT_MAX_DETS, max_dets_per_category=None, pooled=False
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


def _atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, allow_nan=False), binary=False)


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


class LVISEvaluator(_Detectron2LVISEvaluator):
    """
    Detectron2's ``LVISEvaluator`` (same arguments, ``process``/``reset``, gathering,
    proposal evaluation, saved files), with the lvis-api evaluation replaced by
    :func:`evaluate_lvis`. Each image's results are kept as arrays
    (:func:`~.results.compact_instances`), not as a dict per detection, so what the
    processes gather on the main process, and what it holds while evaluating, is a
    fraction of Detectron2's (``benchmarks/bench_lvis_eval.py --held``);
    ``lvis_instances_results.json`` is still Detectron2's file, byte for byte, written in
    chunks, and ``instances_predictions.pth`` holds those per-image arrays (plain dicts of
    numpy arrays and RLE strings). Each task's metrics (:data:`LVIS_METRICS`, x 100) are
    logged as a table, and with ``output_dir`` the per-category AP is written to
    ``<output_dir>/lvis_per_category_<task>.json`` and plotted against the training image
    count in ``lvis_per_category_<task>.png``.

    ``pooled=True`` adds Pooled AP (:data:`POOLED_METRICS`) to each task's metrics;
    ``boundary=True`` adds a task "boundary": Boundary AP of the masks
    (:mod:`eqlosses_d2.evaluation.boundary`).

    ``max_dets_per_category=K`` evaluates Fixed AP (pass ``max_dets_per_image=-1``):
    results are pooled per category as they arrive, as arrays
    (:class:`~.results.CategoryPools`: a pool is cut back to its top K whenever it holds
    2K, so it holds fewer than 2K after every image), and each process sends only each
    category's top K to the main process, which keeps the top K of those: the same
    results as one cut of everything. After each cut the K-th best score of the category
    is handed to every object in ``score_floor_consumers`` as ``test_score_floor`` ((C,)
    tensor, -inf where the pool was never cut; the RoI heads of eqlosses_d2 drop
    detections below it before their mask head). All exact: a result below this
    process's K-th best can never be in the final top K. Per process, the pools hold at
    most ``sum over classes of min(n_c, 2K - 1)`` results (n_c: the class's results on
    that process), about 60 bytes each plus the mask's RLE string; the main process
    receives at most ``world_size x sum_c min(n_c, K)``.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=None, max_dets_per_category=None, pooled=False, boundary=False):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self._pooled = pooled
        self._boundary = boundary
        if max_dets_per_category is not None and max_dets_per_category <= 0:
            raise ValueError(f"max_dets_per_category must be > 0, got {max_dets_per_category}")
        self._max_dets_per_category = max_dets_per_category
        self.score_floor_consumers = []
        self.reset()

    def reset(self):
        super().reset()
        k = self._max_dets_per_category
        num_classes = len(self._metadata.thing_classes)
        self._pools = None if k is None else CategoryPools(k, num_classes)
        self._set_score_floor(None)

    def _set_score_floor(self, floor):
        for consumer in self.score_floor_consumers:
            consumer.test_score_floor = floor

    def process(self, inputs, outputs):
        # Detectron2's per-image entries, with the results as arrays (compact_instances);
        # under Fixed AP the results go to the category pools instead
        for input, output in zip(inputs, outputs):
            prediction = {"image_id": input["image_id"]}
            if "instances" in output:
                record = compact_instances(output["instances"], input["image_id"])
                if self._pools is None:
                    prediction["instances"] = record
                else:
                    self._pool(record)
            if "proposals" in output:
                prediction["proposals"] = output["proposals"].to(self._cpu_device)
            if self._pools is None or "proposals" in prediction:
                self._predictions.append(prediction)

    def _pool(self, record):
        nan = np.isnan(record["scores"])
        if nan.any():  # the cut would sort them last and drop them unseen
            raise ValueError(
                f"image_id {record['image_id']}: {int(nan.sum())} detection(s) have a NaN score; scores rank the "
                "detections, so Fixed AP's per-category cut (and every metric) would be undefined"
            )
        results = ResultArrays.from_records([record], np.arange(len(self._pools.floor)))  # contiguous classes
        if self._pools.add(results):
            self._set_score_floor(torch.from_numpy(self._pools.floor.copy()))

    def evaluate(self):
        self._set_score_floor(None)
        if self._pools is not None:
            # one entry with each category's top K (as a plain record of arrays) before
            # Detectron2 gathers the processes' lists
            pooled = self._pools.results()
            self._predictions = [{"image_id": None, "instances": pooled.to_record()}] + self._predictions
            self._pools = CategoryPools(self._max_dets_per_category, len(self._pools.floor))
        return super().evaluate()

    def _lvis_ground_truth(self) -> LVISGroundTruth:
        gt = getattr(self, "_prepared_lvis_gt", None)
        if gt is None:
            gt = self._prepared_lvis_gt = LVISGroundTruth(self._lvis_api)
        return gt

    def _eval_predictions(self, predictions):
        """Detectron2's ``_eval_predictions`` on the arrays of :meth:`process`: the same
        category-id mapping, results file (byte for byte) and tasks, without building a
        dict per detection."""
        self._logger.info("Preparing results in the LVIS format ...")
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        dataset_ids = None  # LVIS: 0-based contiguous ids to 1-based category ids
        if id_map is not None:  # COCO categories evaluated with the LVIS evaluator
            reverse = {v: k for k, v in id_map.items()}
            dataset_ids = [reverse[k] for k in range(len(reverse))]
        results = ResultArrays.from_records([p["instances"] for p in predictions if "instances" in p], dataset_ids)
        tasks = self._tasks or (("bbox", "segm") if results.has_masks else ("bbox",))
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info("Saving results to {}".format(path))
            atomic_write(path, results.write_json, binary=False)
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info("Evaluating predictions ...")
        max_dets = _DEFAULT_MAX_DETS if self._max_dets_per_image is None else self._max_dets_per_image
        for task in sorted(tasks):
            if task == "segm" and self._boundary:
                self._results["boundary"] = self._evaluate_boundary(results.to_dicts(), max_dets)
            self._results[task] = self._evaluate_task(results, task, max_dets)

    def _evaluate_boundary(self, lvis_results, max_dets_per_image):
        from .boundary import evaluate_lvis_boundary

        self._logger.info("Evaluating Boundary AP (lvis-api matching with Boundary IoU; slow) ...")
        metrics = evaluate_lvis_boundary(self._lvis_ground_truth(), lvis_results, max_dets_per_image)
        self._logger.info("Boundary AP: \n" + create_small_table(metrics))
        return metrics

    def _evaluate_task(self, lvis_results, iou_type, max_dets_per_image):
        per_category = self._max_dets_per_category
        self._logger.info(
            f"Evaluating {iou_type} with max detections per image = {max_dets_per_image}"
            + ("" if per_category is None else f", per category = {per_category} (Fixed AP)")
        )
        result = evaluate_lvis_detailed(
            self._lvis_ground_truth(), lvis_results, iou_type, max_dets_per_image, per_category, self._pooled
        )
        self._logger.info(
            f"Evaluation results for {iou_type} ({result.backend}): \n" + create_small_table(result.metrics)
        )
        if self._output_dir:
            from .plot import plot_or_warn, plot_per_category_ap

            records = per_category_records(result)
            path = os.path.join(self._output_dir, f"lvis_per_category_{iou_type}.json")
            _atomic_write_json(path, records)
            plot = os.path.splitext(path)[0] + ".png"
            title = f"{self._metadata.name}: {iou_type} AP per category"
            plotted = plot_or_warn(plot_per_category_ap, records, path=plot, title=title) is not None  # never raises
            where = f"{path}, plotted in {plot}" if plotted else path
            self._logger.info(f"Per-category {iou_type} AP saved to {where}")
        return dict(result.metrics)
