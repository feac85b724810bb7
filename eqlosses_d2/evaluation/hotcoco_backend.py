"""
The matching and accumulation of lvis-api, by hotcoco.

hotcoco (Rust; tested with 1.3.0) runs per-image matching and accumulation, in its LVIS
mode (``LVISEval`` = ``COCOeval(..., lvis_style=True)``), which applies the federated
rules: detections of a category that is neither annotated nor in the image's
``neg_category_ids`` are dropped, and unmatched detections of a category in
``not_exhaustive_category_ids`` are ignored. Its precision and recall arrays are
bit-identical to lvis-api's once the input is prepared the way lvis-api prepares it
(:mod:`.rules`, :mod:`.ground_truth`); the summary numbers are then computed with
lvis-api's own indexing and averaging (:mod:`.summary`), so they match to the last bit
(the tests compare every metric, bbox and segm, to 1e-9; the difference measured is
0.0). Since hotcoco could be made exact, the other options (faster-coco-eval's LVIS
mode, lvis-api under an ``np.float`` shim) were not needed; lvis-api is used only for
the one input hotcoco cannot express (:mod:`.lvis_api_backend`).
"""
import numpy as np

from .ground_truth import LVISGroundTruth
from .params import AREA_LABELS, DEFAULT_MAX_DETS, IOU_THRESHOLDS

__all__ = ["accumulate_hotcoco"]


def accumulate_hotcoco(gt: LVISGroundTruth, dts, per_image, iou_type, with_records=False):
    """
    hotcoco's LVIS evaluation of ``dts`` (prepared by :mod:`.rules`: the ``(N, 7)`` box
    array or the mask dicts; ``per_image``: {image_id: count}).

    Returns:
        (precision ``(T, R, K, A)``, recall ``(T, K, A)``, records): lvis-api's arrays
        without the max-dets axis; with ``with_records`` the matching of each (image,
        category) at area "all" ``{(image_id, category_id): (scores, matched, ignored,
        gt_ignore)}`` for Pooled AP, else None.
    """
    import hotcoco

    coco_gt = gt.hotcoco()
    coco_dt = hotcoco.LVISResults(coco_gt, dts, max_dets=-1)  # capped already (rule 1)
    ev = hotcoco.LVISEval(coco_gt, coco_dt, iou_type)
    # Rule 5: no per-(image, category) limit, as in lvis-api.
    ev.params.max_dets = [max(DEFAULT_MAX_DETS, max(per_image.values(), default=0))]
    ev.evaluate()
    ev.accumulate()
    params = ev.params
    if (
        list(params.cat_ids) != gt.cat_ids
        or list(params.area_rng_lbl) != list(AREA_LABELS)
        or not np.allclose(params.iou_thrs, IOU_THRESHOLDS, rtol=0, atol=1e-12)
    ):
        raise RuntimeError("hotcoco's LVIS evaluation is not laid out as lvis-api's; check its version")
    evaluation = ev.eval  # built by each access
    precision = np.asarray(evaluation["precision"])[..., -1]  # drop the max_dets axis
    recall = np.asarray(evaluation["recall"])[..., -1]
    records = None
    if with_records:  # the matching of each (image, category) at area "all", for Pooled AP
        all_area = list(params.area_rng[0])
        records = {
            (e["image_id"], e["category_id"]): (e["dtScores"], e["dtMatched"], e["dtIgnore"], e["gtIgnore"])
            for e in ev.eval_imgs
            if e is not None and list(e["aRng"]) == all_area
        }
    return precision, recall, records
