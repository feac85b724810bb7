"""Boundary AP (Cheng et al. 2021): the boundary region by hand, the min(mask IoU, boundary
IoU) criterion on rectangles whose IoUs are computed by hand, and the protocol key."""
import copy
import json
import math

import numpy as np
import pytest

from eqlosses_d2.evaluation import evaluate_lvis, evaluate_lvis_boundary
from eqlosses_d2.evaluation.boundary import mask_to_boundary


def test_boundary_region_by_hand():
    # 20 x 20 image: d = round(0.02 * sqrt(800)) = round(0.57) = 1 -> a one-pixel ring
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, 5:15] = 1
    ring = mask_to_boundary(mask)
    assert ring.sum() == 100 - 64 and ring[5:15, 5].all() and not ring[6:14, 6:14].any()
    # the image border is background: a mask cut by it has a boundary along it
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[0:10, 0:10] = 1
    ring = mask_to_boundary(mask)
    assert ring.sum() == 36 and ring[0, :10].all() and ring[:10, 0].all()
    # 100 x 100: d = round(2.83) = 3 -> a ring three pixels wide
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[20:60, 20:60] = 1
    assert mask_to_boundary(mask).sum() == 40 * 40 - 34 * 34


def _rect_rle(x0, y0, x1, y1, size=100):
    from pycocotools import mask as mask_utils

    m = np.zeros((size, size), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _rings(x0, y0, x1, y1, d=3, size=100):
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    inner = np.zeros_like(m)
    inner[y0 + d : y1 - d, x0 + d : x1 - d] = True
    return m, m & ~inner


def _gt():
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "a", "frequency": "f", "image_count": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 40, 40], "area": 1600,
                         "iscrowd": 0, "segmentation": [[20, 20, 60, 20, 60, 60, 20, 60]]}],
    }


def test_boundary_iou_is_stricter_than_mask_iou():
    # the detection is the ground truth shifted by 8 px: mask IoU 32/48 = 0.667,
    # boundary IoU (3 px rings, computed here from the rings themselves) below 0.5
    gt_mask, gt_ring = _rings(20, 20, 60, 60)
    dt_mask, dt_ring = _rings(28, 20, 68, 60)
    mask_iou = (gt_mask & dt_mask).sum() / (gt_mask | dt_mask).sum()
    ring_iou = (gt_ring & dt_ring).sum() / (gt_ring | dt_ring).sum()
    assert mask_iou == pytest.approx(2 / 3) and 0.1 < ring_iou < 0.5
    preds = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rect_rle(28, 20, 68, 60)}]
    segm = evaluate_lvis(_gt(), preds, "segm")
    before = copy.deepcopy(preds)
    boundary = evaluate_lvis_boundary(_gt(), preds)
    assert preds == before  # inputs untouched
    # the polygon rasterises to the 40 x 40 square, so the segm IoU is mask_iou
    assert segm["AP50"] == pytest.approx(100, abs=1e-9)  # 0.667 >= 0.5
    assert boundary["AP50"] == pytest.approx(0, abs=1e-9)  # min(0.667, ring IoU) < 0.5
    # AP over thresholds: segm matches at 0.50..0.65 (4 of 10), boundary at none
    assert segm["AP"] == pytest.approx(40, abs=1e-9) and boundary["AP"] == pytest.approx(0, abs=1e-9)
    # a perfect mask is perfect under both
    perfect = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rect_rle(20, 20, 60, 60)}]
    assert evaluate_lvis_boundary(_gt(), perfect)["AP"] == pytest.approx(100, abs=1e-9)
    assert list(boundary)[:9] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]


def test_boundary_protocol_end_to_end(tiny_dataset, tmp_path):
    import train_net

    from test_training import QUICKSTART, _opts, _run

    results = _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, tmp_path, max_iter=2) + [
        "TEST.EQLOSSES.PROTOCOL", "boundary", "TEST.DETECTIONS_PER_IMAGE", "20",
    ])
    assert set(results) == {"bbox", "segm", "boundary"}
    ap = results["boundary"]["AP"]
    assert math.isnan(ap) or 0 <= ap <= 100
    assert train_net.cli(["--config-file", QUICKSTART, "TEST.EQLOSSES.PROTOCOL", "boundary",
                          "MODEL.MASK_ON", "False"]) == 2
