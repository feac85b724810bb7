"""
The results as lvis-api 0.5.3 evaluates them, prepared for hotcoco.

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
   For results the area is ``w * h`` of ``bbox`` when the first result has a
   ``bbox``, else the mask area. Such results are dropped after the cap. (For
   ground truth: :mod:`.ground_truth`.)
3. Results whose ``category_id`` is not in ``categories`` are ignored; a result on
   an image that is not in the ground truth is an error.
4. ``iscrowd``, ``ignore`` flags and annotation id 0: :mod:`.ground_truth`.
5. No per-(image, category) limit: hotcoco's LVIS mode cuts each (image,
   category) at ``params.max_dets`` (300) even when the per-image cap is larger or
   off; lvis-api does not, so :mod:`.hotcoco_backend` raises that limit to the
   largest per-image count.
6. ``segm``: ``bbox`` is dropped from the results first, so the area used for the
   small/medium/large split is the mask area (Detectron2 does the same; with a
   ``bbox`` lvis-api would use the box area). ``bbox``: the ``segmentation`` is
   dropped (lvis-api never looks at it when a ``bbox`` is there).
7. Averages: :mod:`.summary`.
8. Inputs are never modified (lvis-api adds ``area``/``id``/``segmentation`` to
   result dicts).

A NaN score is an error (:func:`check_scores`: one line naming the first such result),
checked before the per-image cap or Fixed AP's cut could drop it silently; hotcoco
refuses one that survives them, lvis-api ranks it arbitrarily. A mask result whose
``segmentation`` is not a compressed RLE is an error naming the result
(:func:`~.results.check_mask_results`).
"""
from collections import Counter

import numpy as np

from .ground_truth import LVISGroundTruth
from .json_io import gc_paused
from .results import ResultArrays

__all__ = ["cap_arrays_per_image", "cap_per_image", "check_scores", "prepare_arrays", "prepare_detections"]


def check_scores(predictions):
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


def cap_per_image(dts, max_dets):
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


def prepare_detections(predictions, iou_type, gt: LVISGroundTruth, max_dets):
    """
    The results as lvis-api would evaluate them (rules 1-3 and 6 of the module
    docstring), in a new container: for boxes, hotcoco's ``(N, 7)`` array
    ``[image_id, x, y, w, h, score, category_id]`` (no dict per detection); for
    masks, new dicts holding only what the evaluation reads.

    Returns:
        (detections, {image_id: number of detections kept})
    """
    dts = cap_per_image(predictions, max_dets)
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
        with gc_paused():
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


def _id_counts(ids: np.ndarray):
    """``np.unique(ids, return_counts=True)``, by ``np.bincount`` where the ids are small
    non-negative integers (LVIS ids are), which costs no sort."""
    if ids.size and ids.min() >= 0 and ids.max() < max(1 << 22, 4 * ids.size):
        counts = np.bincount(ids)
        unique = np.flatnonzero(counts)
        return unique, counts[unique]
    return np.unique(ids, return_counts=True)


def _is_in(values: np.ndarray, allowed) -> np.ndarray:
    """``np.isin(values, allowed)``, by a lookup table where the ids are small non-negative integers."""
    allowed = np.asarray(allowed, dtype=np.int64)
    if values.size and allowed.size and values.min() >= 0 and allowed.min() >= 0:
        top = max(int(values.max()), int(allowed.max()))
        if top < max(1 << 22, 4 * values.size):
            table = np.zeros(top + 1, dtype=bool)
            table[allowed] = True
            return table[values]
    return np.isin(values, allowed)


def cap_arrays_per_image(results: ResultArrays, max_dets) -> np.ndarray:
    """:func:`cap_per_image` on arrays: the indices kept, in the order it keeps them."""
    num = len(results)
    if max_dets < 0 or num == 0 or _id_counts(results.image_ids)[1].max() <= max_dets:
        return np.arange(num)
    unique, first, inverse, counts = np.unique(
        results.image_ids, return_index=True, return_inverse=True, return_counts=True
    )
    group = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse]  # images by first appearance
    over = counts[inverse] > max_dets  # only these are sorted by score (stable), and cut
    score_key = np.where(over, -results.scores.astype(np.float64), 0.0)
    order = np.lexsort((np.arange(num), score_key, group))
    grouped = group[order]
    rank = np.arange(num) - np.searchsorted(grouped, grouped, side="left")
    return order[rank < max_dets]


def prepare_arrays(results: ResultArrays, iou_type, gt: LVISGroundTruth, max_dets):
    """:func:`prepare_detections` for :class:`ResultArrays` (the same rules, the same
    output), without a dict per detection on the way."""
    index = cap_arrays_per_image(results, max_dets)
    if len(index) == len(results):  # nothing cut (the indices are 0..N-1): no copies
        index = slice(None)
    image_ids = results.image_ids[index]
    unknown = set(_id_counts(image_ids)[0].tolist()) - gt.img_ids
    if unknown:
        raise ValueError(
            f"Results do not correspond to the LVIS ground truth: {len(unknown)} image ids are "
            f"not in it (e.g. {sorted(unknown)[:5]})"
        )
    if not len(image_ids):
        return [], {}
    category_ids = results.category_ids[index]
    known = _is_in(category_ids, gt.cat_ids)
    if iou_type == "bbox":
        boxes = results.boxes[index].astype(np.float64, copy=False)
        areas = boxes[:, 2] * boxes[:, 3]
        keep = known & (areas > 0) & (areas < np.inf)
        kept = slice(None) if keep.all() else keep  # no copies where every result stays
        out = np.empty((int(keep.sum()), 7), dtype=np.float64)
        out[:, 0] = image_ids[kept]
        out[:, 1:5] = boxes[kept]
        out[:, 5] = results.scores[index][kept]
        out[:, 6] = category_ids[kept]
        if max(np.abs(out[:, 0]).max(initial=0), np.abs(out[:, 6]).max(initial=0)) >= 2**53:
            raise ValueError("image/category ids too large for hotcoco's array input")
    else:
        import hotcoco

        if not results.has_masks:
            raise ValueError("segm evaluation of results without masks")
        masks = results.segmentations(None if isinstance(index, slice) else index)
        keep = known & (hotcoco.mask.area(masks).astype(np.float64) > 0)
        scores = results.scores[index].tolist()
        with gc_paused():
            out = [
                {"image_id": i, "category_id": c, "score": s, "segmentation": m}
                for i, c, s, m, k in zip(image_ids.tolist(), category_ids.tolist(), scores, masks, keep.tolist())
                if k
            ]
    ids, counts = _id_counts(image_ids[keep])
    return out, dict(zip(ids.tolist(), counts.tolist()))
