"""
lvis-api 0.5.3 itself, for the ground truth hotcoco cannot evaluate exactly (``ignore``
flags, an annotation with id 0: :attr:`~.ground_truth.LVISGroundTruth.lvis_api_reason`),
and for Boundary AP. lvis-api 0.5.3 (the PyPI ``lvis`` package Detectron2 uses) crashes in
``LVISEval.accumulate`` on numpy >= 1.24 (``np.float``), so it runs under
:func:`numpy_float_alias`; its matching is pure Python (slow).
"""
import contextlib

import numpy as np

from .ground_truth import LVISGroundTruth

__all__ = ["accumulate_lvis_api", "numpy_float_alias"]


@contextlib.contextmanager
def numpy_float_alias():
    """lvis-api 0.5.3's accumulate() uses ``np.float``, removed in numpy 1.24."""
    if hasattr(np, "float"):
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


def accumulate_lvis_api(gt: LVISGroundTruth, predictions, iou_type, max_dets):
    """lvis-api itself, on copies (rules 1-3 are its own); for ground truth with "ignore" flags.

    Returns:
        (precision, recall, number of detections evaluated, records as
        :func:`~.hotcoco_backend.accumulate_hotcoco`'s)
    """
    from lvis import LVISEval, LVISResults

    lvis_gt = gt.lvis_api()
    keys = {"image_id", "category_id", "score", "bbox", "segmentation"}
    dts = [{k: v for k, v in d.items() if k in keys} for d in predictions]
    if iou_type == "segm":
        for d in dts:
            d.pop("bbox", None)
    with numpy_float_alias():
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
