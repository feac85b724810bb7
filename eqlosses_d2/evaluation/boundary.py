"""
Boundary AP on LVIS (Cheng et al., "Boundary IoU: Improving Object-Centric Image
Segmentation Evaluation", CVPR 2021).

A mask's boundary region is the set of its pixels within distance d of its contour,
d = round(0.02 × image diagonal) (at least 1): the mask minus its erosion by a 3×3
square applied d times, the image border counting as background (so a mask cut by the
border has a boundary there). A detection matches a ground truth by
``min(mask IoU, boundary IoU)``, the boundary IoU being the IoU of the two boundary
regions; everything else is lvis-api's LVIS evaluation (federated rules, 300 per image,
frequency groups).

The matching runs in lvis-api itself (0.5.3, ``np.float`` aliased for it) with only its
per-pair IoU replaced, which is how the authors' ``boundary_iou.lvis_instance_api``
computes it; boundaries are computed once per mask with OpenCV. It is much slower than
the hotcoco path of the standard protocol (lvis-api matches in Python and every mask is
decoded at full image size): an option for final numbers, not for every evaluation.
"""
from collections import OrderedDict
from typing import Dict

import numpy as np

from .ground_truth import LVISGroundTruth
from .lvis_api_backend import numpy_float_alias
from .results import check_mask_results
from .rules import check_scores

__all__ = ["BOUNDARY_DILATION_RATIO", "evaluate_lvis_boundary", "mask_to_boundary"]

BOUNDARY_DILATION_RATIO = 0.02


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """(H, W) uint8 0/1 mask -> its boundary region (uint8 0/1), see the module docstring."""
    import cv2

    h, w = mask.shape
    dilation = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=dilation)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def _lvis_eval_with_boundary_iou(dilation_ratio):
    from lvis import LVISEval
    from pycocotools import mask as mask_utils

    class BoundaryLVISEval(LVISEval):
        """lvis-api's LVISEval on masks, matching by min(mask IoU, boundary IoU)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._boundaries = {}

        def _boundary(self, source, ann):
            key = (source, ann["id"])
            if key not in self._boundaries:
                boundary = mask_to_boundary(mask_utils.decode(ann["segmentation"]), dilation_ratio)
                self._boundaries[key] = mask_utils.encode(np.asfortranarray(boundary))
            return self._boundaries[key]

        def compute_iou(self, img_id, cat_id):
            gt, dt = self._get_gt_dt(img_id, cat_id)
            if len(gt) == 0 and len(dt) == 0:
                return []
            dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")]
            iscrowd = [int(g.get("iscrowd", 0)) for g in gt]
            mask_ious = mask_utils.iou([d["segmentation"] for d in dt], [g["segmentation"] for g in gt], iscrowd)
            boundary_ious = mask_utils.iou(
                [self._boundary("dt", d) for d in dt], [self._boundary("gt", g) for g in gt], iscrowd
            )
            return np.minimum(np.asarray(mask_ious), np.asarray(boundary_ious))

    return BoundaryLVISEval


def evaluate_lvis_boundary(
    lvis_gt, predictions, max_dets_per_image=300, dilation_ratio=BOUNDARY_DILATION_RATIO
) -> Dict[str, float]:
    """
    Boundary AP x 100 of mask results (``segmentation`` RLEs) against LVIS ground truth,
    with lvis-api's metric keys (AP, AP50, ..., APr/c/f, AR@300, ...; NaN where lvis-api
    says -1). Inputs are not modified.
    """
    from lvis import LVISResults

    gt = lvis_gt if isinstance(lvis_gt, LVISGroundTruth) else LVISGroundTruth(lvis_gt)
    predictions = list(predictions)
    check_mask_results(predictions)
    check_scores(predictions)
    keys = ("image_id", "category_id", "score", "segmentation")
    # new top-level dicts (lvis-api writes area/id/bbox into them; the RLEs it only reads);
    # no bbox: mask areas, as for segm
    dts = [{k: d[k] for k in keys} for d in predictions]
    if not dts:
        return OrderedDict()
    lvis_api_gt = gt.lvis_api()
    with numpy_float_alias():
        ev = _lvis_eval_with_boundary_iou(dilation_ratio)(
            lvis_api_gt, LVISResults(lvis_api_gt, dts, max_dets=max_dets_per_image), "segm"
        )
        ev.run()
    return OrderedDict((k, float("nan") if v == -1 else float(v) * 100) for k, v in ev.get_results().items())
