"""LVIS evaluation: parity with lvis-api 0.5.3, hand-checked cases, and the Detectron2 evaluator."""
import copy
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest

from eqlosses_d2.compat import apply_detectron2_patches

apply_detectron2_patches()  # detectron2.evaluation without the C++ extension

import pycocotools.mask as mask_utils  # noqa: E402

from eqlosses_d2.evaluation import (  # noqa: E402
    LVIS_METRICS,
    LVISEvaluator,
    LVISGroundTruth,
    evaluate_lvis,
    evaluate_lvis_detailed,
)

NAN = float("nan")


# ---------------------------------------------------------------------------
# Generated LVIS-format data
# ---------------------------------------------------------------------------


def _rle(poly, h, w):
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    rle["counts"] = rle["counts"].decode("ascii")  # as Detectron2's instances_to_coco_json
    return rle


def _polygon_area(poly):
    x, y = np.array(poly[0::2]), np.array(poly[1::2])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def make_lvis_data(seed=0, num_images=30, num_cats=10):
    """
    Ground truth: categories r/c/f (the last one has no ground truth at all), per-image
    negative and not-exhaustive lists, polygon masks whose json ``area`` is the polygon
    area (not the mask's pixel count, as in LVIS), a few with ``area`` 0.
    A few have ``iscrowd`` 1, which lvis-api ignores.
    Results: score ties, 330 results on the first image (310 of one category), zero-area
    boxes and masks, categories neither annotated nor negative in the image, an unknown
    category id.
    """
    rng = np.random.RandomState(seed)
    cats = [
        {"id": i + 1, "name": f"cat{i + 1}", "frequency": "rcf"[i % 3], "image_count": int(rng.randint(300))}
        for i in range(num_cats)
    ]
    images, anns, preds = [], [], []
    for n in range(num_images):
        img_id = 100 + 3 * n
        h, w = int(rng.randint(200, 500)), int(rng.randint(200, 500))
        perm = [int(c) for c in rng.permutation(num_cats - 1) + 1]  # never the last category
        num_pos = int(rng.randint(1 if n == 0 else 0, 4))
        pos = perm[:num_pos]
        neg = perm[num_pos : num_pos + int(rng.randint(0, 4))] + ([num_cats] if rng.rand() < 0.5 else [])
        images.append(
            {
                "id": img_id,
                "height": h,
                "width": w,
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": [c for c in pos if rng.rand() < 0.3],
            }
        )
        gts = []
        for c in pos:
            for _ in range(rng.randint(1, 5)):
                bw, bh = rng.uniform(3, w / 2), rng.uniform(3, h / 2)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                sx, sy = rng.uniform(0.5, 1, size=2)
                poly = [x, y, x + bw, y, x + bw * sx, y + bh, x, y + bh * sy]
                poly = [round(float(v), 2) for v in poly]
                area = 0.0 if rng.rand() < 0.05 else _polygon_area(poly)
                ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": c, "segmentation": [poly]}
                if rng.rand() < 0.1:
                    ann["iscrowd"] = 1  # lvis-api ignores it (LVIS json has none)
                ann.update(bbox=[float(v) for v in mask_utils.toBbox(_rle(poly, h, w))], area=area)
                anns.append(ann)
                gts.append(ann)
        num_dets = 330 if n == 0 else int(rng.randint(0, 40))
        for k in range(num_dets):
            if gts and (n == 0 and k < 310 or rng.rand() < 0.5):
                g = gts[0] if n == 0 else gts[rng.randint(len(gts))]
                x, y, bw, bh = g["bbox"]
                x, y = x + rng.normal(0, 0.1 * bw), y + rng.normal(0, 0.1 * bh)
                bw, bh = bw * rng.uniform(0.8, 1.2), bh * rng.uniform(0.8, 1.2)
                c = g["category_id"] if n == 0 or rng.rand() < 0.8 else int(rng.randint(1, num_cats + 1))
            else:
                bw, bh = rng.uniform(1, w / 2), rng.uniform(1, h / 2)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                c = int(rng.randint(1, num_cats + 1))
            if rng.rand() < 0.01:
                c = 99  # not an LVIS category: ignored
            x, y = float(np.clip(x, 0, w - 2)), float(np.clip(y, 0, h - 2))
            bw, bh = float(min(bw, w - x)), float(min(bh, h - y))
            if rng.rand() < 0.03:
                bw = 0.0  # zero-area box (and mask)
            poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh * rng.uniform(0.3, 1)]
            if rng.rand() < 0.03:
                poly = [x, y, x, y, x, y]  # empty mask under a non-empty box
            preds.append(
                {
                    "image_id": img_id,
                    "category_id": c,
                    "bbox": [x, y, bw, bh],
                    "score": float(np.round(rng.rand(), 1)),  # many ties
                    "segmentation": _rle(poly, h, w),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": cats, "info": {}, "licenses": []}
    return gt, preds


def run_lvis_api(monkeypatch, tmp_path, gt, preds, iou_type, max_dets):
    """lvis-api 0.5.3 as Detectron2 calls it; returns (results, precision)."""
    from lvis import LVIS, LVISEval, LVISResults

    path = tmp_path / f"gt_{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(gt))
    preds = copy.deepcopy(preds)
    if iou_type == "segm":
        for p in preds:
            p.pop("bbox", None)  # Detectron2: mask area for small/medium/large
    with monkeypatch.context() as m:
        m.setattr(np, "float", float, raising=False)
        lvis_gt = LVIS(str(path))
        lvis_eval = LVISEval(lvis_gt, LVISResults(lvis_gt, preds, max_dets=max_dets), iou_type)
        lvis_eval.run()
    return lvis_eval.get_results(), lvis_eval.eval["precision"]


def near(value):
    """lvis-api's precision is tp / (tp + fp + eps): a perfect AP is 100 - 2e-14."""
    return pytest.approx(value, abs=1e-9)


def _same(a, b, tol=1e-9):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.fixture(scope="module")
def generated():
    gt, preds = make_lvis_data()
    counts = {}
    for p in preds:
        counts[p["image_id"]] = counts.get(p["image_id"], 0) + 1
    # the generator covers what it claims
    assert max(counts.values()) > 300
    first = [p["category_id"] for p in preds if p["image_id"] == preds[0]["image_id"]]
    assert max(first.count(c) for c in set(first)) > 300
    assert any(a.get("iscrowd") for a in gt["annotations"])
    assert any(p["bbox"][2] * p["bbox"][3] == 0 for p in preds)
    assert any(mask_utils.area(p["segmentation"]) == 0 and p["bbox"][2] > 0 for p in preds)
    assert any(a["area"] == 0 for a in gt["annotations"])
    assert len({p["score"] for p in preds}) <= 11
    assert {c["frequency"] for c in gt["categories"]} == {"r", "c", "f"}
    return gt, preds


@pytest.mark.parametrize("max_dets", [300, -1])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_parity_with_lvis_api(generated, monkeypatch, tmp_path, iou_type, max_dets):
    gt, preds = generated
    gt_before, preds_before = copy.deepcopy(gt), copy.deepcopy(preds)

    ours = evaluate_lvis_detailed(gt, preds, iou_type, max_dets_per_image=max_dets)
    assert gt == gt_before and preds == preds_before  # inputs untouched
    assert ours.backend == "hotcoco"

    ref, ref_precision = run_lvis_api(monkeypatch, tmp_path, gt, preds, iou_type, max_dets)
    assert list(ref) == list(LVIS_METRICS)
    for key in LVIS_METRICS:
        expected = NAN if ref[key] == -1 else float(ref[key] * 100)
        assert _same(ours.metrics[key], expected), (key, ours.metrics[key], expected)
    assert 0 < ours.metrics["AP"] < 100 and 0 < ours.metrics["APr"] < 100

    # per-category AP from lvis-api's own precision array; the last category has no GT
    cat_ids = sorted(c["id"] for c in gt["categories"])
    for k, cat_id in enumerate(cat_ids):
        s = ref_precision[:, :, k, 0]
        expected = float(np.mean(s[s > -1]) * 100) if (s > -1).any() else NAN
        assert _same(ours.per_category_ap[cat_id], expected), (cat_id, ours.per_category_ap[cat_id], expected)
    assert math.isnan(ours.per_category_ap[cat_ids[-1]])
    assert np.array_equal(ours.precision, ref_precision)


def test_parity_from_json_path_and_prepared_gt(generated, tmp_path):
    gt, preds = generated
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    from_dict = evaluate_lvis(gt, preds, "bbox")
    assert evaluate_lvis(str(path), preds, "bbox") == from_dict
    assert evaluate_lvis(LVISGroundTruth(gt), preds, "bbox") == from_dict


def test_ignore_flag_falls_back_to_lvis_api(generated, monkeypatch, tmp_path):
    """lvis-api honours a ground-truth "ignore" flag (hotcoco does not): exact via lvis-api."""
    gt, preds = generated
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"][::4]:
        ann["ignore"] = 1
    ours = evaluate_lvis_detailed(gt, preds, "bbox")
    assert ours.backend == "lvis-api"
    assert not hasattr(np, "float")  # the alias is gone again
    ref, _ = run_lvis_api(monkeypatch, tmp_path, gt, preds, "bbox", 300)
    for key in LVIS_METRICS:
        assert _same(ours.metrics[key], float(ref[key] * 100)), key


# ---------------------------------------------------------------------------
# Hand-checkable cases
# ---------------------------------------------------------------------------


def _box_gt(ann_id, image_id, category_id, box):
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(box),
        "area": float(w * h),
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def _image(image_id, neg):
    return {
        "id": image_id,
        "height": 100,
        "width": 100,
        "neg_category_ids": neg,
        "not_exhaustive_category_ids": [],
    }


def _tiny_gt():
    """Image 1: one box of category 1 and one of category 2; image 2: category 2 is negative."""
    return {
        "images": [
            _image(1, neg=[]),
            _image(2, neg=[2]),
        ],
        "annotations": [_box_gt(1, 1, 1, [10, 10, 20, 20]), _box_gt(2, 1, 2, [50, 50, 40, 40])],
        "categories": [
            {"id": 1, "name": "one", "frequency": "f", "image_count": 500},
            {"id": 2, "name": "two", "frequency": "c", "image_count": 50},
            {"id": 3, "name": "three", "frequency": "r", "image_count": 2},
        ],
    }


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


PERFECT = [_det(1, 1, [10, 10, 20, 20], 0.9), _det(1, 2, [50, 50, 40, 40], 0.5)]


def test_perfect_detections_give_100():
    out = evaluate_lvis_detailed(_tiny_gt(), PERFECT, "bbox")
    m = out.metrics
    for key in ("AP", "AP50", "AP75", "APf", "APc"):
        assert m[key] == near(100), key
    assert math.isnan(m["APr"])  # no rare category with ground truth: lvis-api says -1
    assert m["APs"] == near(100) and m["APm"] == near(100)  # 20x20 is small, 40x40 medium
    assert math.isnan(m["APl"])
    assert m["AR@300"] == near(100)
    assert out.per_category_ap[1] == near(100) and out.per_category_ap[2] == near(100)
    assert math.isnan(out.per_category_ap[3])


def test_unverified_category_is_ignored():
    """Category 3 is neither annotated nor negative anywhere: its detections change nothing."""
    dets = PERFECT + [_det(1, 3, [0, 0, 50, 50], 0.99), _det(2, 3, [5, 5, 30, 30], 0.99)]
    # category 1 on image 2, where it is neither annotated nor negative: ignored too
    dets.append(_det(2, 1, [10, 10, 20, 20], 0.95))
    out = evaluate_lvis_detailed(_tiny_gt(), dets, "bbox")
    assert out.metrics["AP"] == near(100)
    assert out.per_category_ap[1] == near(100) and math.isnan(out.per_category_ap[3])


def test_false_positive_in_negative_category():
    """Image 2 lists category 2 as negative: a detection of it there is a false positive."""
    gt = _tiny_gt()
    # ranked FP (0.8) then TP (0.5): precision 0 at recall 0, 1/2 at recall 1 -> interpolated
    # precision 1/2 at every recall threshold -> AP 50 at every IoU threshold
    out = evaluate_lvis_detailed(gt, PERFECT + [_det(2, 2, [0, 0, 30, 30], 0.8)], "bbox")
    assert out.per_category_ap[2] == near(50)
    assert out.per_category_ap[1] == near(100)
    assert out.metrics["AP"] == near(75)
    assert out.metrics["APc"] == near(50)
    # ranked after the only true positive, the same false positive costs nothing
    out = evaluate_lvis_detailed(gt, PERFECT + [_det(2, 2, [0, 0, 30, 30], 0.3)], "bbox")
    assert out.per_category_ap[2] == near(100)
    # if category 2 were not exhaustively annotated in image 1, an unmatched detection there
    # would be ignored; in image 2 it is only negative, so that does not apply
    gt["images"][0]["not_exhaustive_category_ids"] = [2]
    out = evaluate_lvis_detailed(gt, PERFECT + [_det(1, 2, [0, 0, 30, 30], 0.8)], "bbox")
    assert out.per_category_ap[2] == near(100)


def test_zero_area_is_dropped():
    gt = _tiny_gt()
    # a zero-area detection ranked first does not count as a false positive
    out = evaluate_lvis(gt, PERFECT + [_det(1, 1, [0, 0, 0, 30], 0.99)], "bbox")
    assert out["AP"] == near(100)
    # ground truth with area 0 is dropped, so category 1 is no longer "present" in image 1
    gt["annotations"][0]["area"] = 0.0
    out = evaluate_lvis_detailed(gt, PERFECT, "bbox")
    assert math.isnan(out.per_category_ap[1]) and out.metrics["AP"] == near(100)


def test_per_image_cap_is_across_categories():
    gt = _tiny_gt()
    # 300 higher-scoring detections of category 3 push category 1's true positive out
    flood = [_det(1, 3, [0, 0, 5, 5], 0.95) for _ in range(300)]
    assert evaluate_lvis_detailed(gt, flood + PERFECT, "bbox").per_category_ap[1] == near(0)
    uncapped = evaluate_lvis_detailed(gt, flood + PERFECT, "bbox", max_dets_per_image=-1)
    assert uncapped.per_category_ap[1] == near(100)


def test_segm_uses_mask_area():
    """With the box dropped, the 40x40 box around a 10x10 mask is 'small'."""
    gt = _tiny_gt()
    gt["annotations"] = [_box_gt(1, 1, 1, [10, 10, 10, 10])]
    rle = _rle([10, 10, 20, 10, 20, 20, 10, 20], 100, 100)
    det = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.9, "segmentation": rle}
    m = evaluate_lvis(gt, [det], "segm")
    assert m["AP"] == near(100) and m["APs"] == near(100) and math.isnan(m["APm"])
    assert "bbox" in det  # not modified


def test_empty_predictions(caplog):
    with caplog.at_level(logging.WARNING):
        out = evaluate_lvis_detailed(_tiny_gt(), [], "bbox")
    assert set(out.metrics) == set(LVIS_METRICS) and all(math.isnan(v) for v in out.metrics.values())
    assert "No predictions" in caplog.text
    # results that all get filtered out are not "empty": the categories with GT score 0
    out = evaluate_lvis(_tiny_gt(), [_det(1, 1, [0, 0, 0, 0], 0.5)], "bbox")
    assert out["AP"] == near(0)


def test_unknown_image_is_an_error():
    with pytest.raises(ValueError, match="image ids"):
        evaluate_lvis(_tiny_gt(), [_det(7, 1, [0, 0, 5, 5], 0.5)], "bbox")


# ---------------------------------------------------------------------------
# The Detectron2 evaluator
# ---------------------------------------------------------------------------


def test_detectron2_evaluator(tmp_path):
    import torch

    import detectron2.evaluation.lvis_evaluation as d2_lvis
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances

    gt = _tiny_gt()
    json_file = tmp_path / "tiny_lvis.json"
    json_file.write_text(json.dumps(gt))
    name = f"eqlosses_test_lvis_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=["one", "two", "three"])

    def masks_of(boxes):
        out = torch.zeros(len(boxes), 100, 100, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            out[i, y0:y1, x0:x1] = True
        return out

    def instances(boxes, scores, classes):
        inst = Instances((100, 100))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor(scores, dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inst.pred_masks = masks_of(boxes)
        return inst

    original = d2_lvis._evaluate_predictions_on_lvis
    out_dir = tmp_path / "out"
    evaluator = LVISEvaluator(name, distributed=False, output_dir=str(out_dir))
    evaluator.reset()
    # XYXY boxes, 0-based contiguous classes (category ids 1 and 2), masks = the boxes
    evaluator.process(
        [{"image_id": 1, "height": 100, "width": 100}],
        [{"instances": instances([[10, 10, 30, 30], [50, 50, 90, 90]], [0.9, 0.5], [0, 1])}],
    )
    evaluator.process([{"image_id": 2, "height": 100, "width": 100}], [{"instances": instances([], [], [])}])
    results = evaluator.evaluate()

    assert d2_lvis._evaluate_predictions_on_lvis is original  # restored
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == near(100) and results[task]["APc"] == near(100)
        assert math.isnan(results[task]["APr"])
        records = json.loads((out_dir / f"lvis_per_category_{task}.json").read_text())
        assert records == [
            {"id": 1, "name": "one", "frequency": "f", "image_count": 500, "AP": near(100)},
            {"id": 2, "name": "two", "frequency": "c", "image_count": 50, "AP": near(100)},
            {"id": 3, "name": "three", "frequency": "r", "image_count": 2, "AP": None},
        ]
    assert (out_dir / "lvis_instances_results.json").exists()  # Detectron2's own outputs
    assert (out_dir / "lvis_per_category_bbox.png").is_file() and (out_dir / "lvis_per_category_segm.png").is_file()
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]

    # a second round on the same evaluator: a false positive of category 2 on image 2
    evaluator.reset()
    evaluator.process(
        [{"image_id": 1}, {"image_id": 2}],
        [
            {"instances": instances([[10, 10, 30, 30], [50, 50, 90, 90]], [0.9, 0.5], [0, 1])},
            {"instances": instances([[0, 0, 30, 30]], [0.8], [1])},
        ],
    )
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == near(75)
    records = json.loads((out_dir / "lvis_per_category_bbox.json").read_text())
    assert records[1]["AP"] == near(50)


def test_per_category_plot(tmp_path):
    from PIL import Image

    from eqlosses_d2.evaluation.plot import main as plot_main, plot_per_category_ap

    records = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 500, "AP": 80.0},
        {"id": 2, "name": "b", "frequency": "c", "image_count": 50, "AP": 40.0},
        {"id": 3, "name": "c", "frequency": "r", "image_count": 2, "AP": 5.0},
        {"id": 4, "name": "d", "frequency": "r", "image_count": 3, "AP": None},  # no ground truth
    ]
    path = tmp_path / "ap.png"
    assert plot_per_category_ap(records, str(path)) == 3
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (840, 540)
    assert [f.name for f in tmp_path.iterdir()] == ["ap.png"]  # no temporary left
    (tmp_path / "records.json").write_text(json.dumps(records))
    assert plot_main([str(tmp_path / "records.json")]) == 0
    assert (tmp_path / "records.png").is_file()


# ---------------------------------------------------------------------------
# Results as arrays (what LVISEvaluator keeps and gathers)
# ---------------------------------------------------------------------------


def _as_float32(preds):
    """The dicts Detectron2 would make from float32 tensors: boxes and scores rounded to float32."""
    return [
        dict(p, bbox=[float(np.float32(v)) for v in p["bbox"]], score=float(np.float32(p["score"]))) for p in preds
    ]


@pytest.mark.parametrize("max_dets", [300, 7, -1])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_result_arrays_evaluate_exactly_as_dicts(generated, iou_type, max_dets):
    """Same precision arrays and metrics from ResultArrays as from the dicts, with the
    per-image cap biting (330 results on the first image; 7 cuts most images), score
    ties, zero areas and an unknown category among them."""
    from eqlosses_d2.evaluation.results import ResultArrays

    gt, preds = generated
    preds = _as_float32(preds)
    arrays = ResultArrays.from_dicts(preds)
    assert arrays.to_dicts() == preds  # the round trip is lossless
    gt = LVISGroundTruth(gt)
    expected = evaluate_lvis_detailed(gt, preds, iou_type, max_dets_per_image=max_dets)
    got = evaluate_lvis_detailed(gt, arrays, iou_type, max_dets_per_image=max_dets)
    assert got.backend == "hotcoco" and got.num_detections == expected.num_detections > 0
    assert np.array_equal(got.precision, expected.precision) and np.array_equal(got.recall, expected.recall)
    for key in LVIS_METRICS:
        assert _same(got.metrics[key], expected.metrics[key], tol=0), key
    # Fixed AP and pooled AP take the same arrays (through dicts)
    fixed = evaluate_lvis(gt, arrays, iou_type, max_dets_per_image=-1, max_dets_per_category=50, pooled=True)
    assert fixed == evaluate_lvis(gt, preds, iou_type, max_dets_per_image=-1, max_dets_per_category=50, pooled=True)


def test_per_image_cap_on_arrays_by_hand():
    """lvis-api's cap: images in order of first appearance; an image over the cap keeps its
    best results (ties in results order), an image under it keeps its results' order."""
    from eqlosses_d2.evaluation.rules import cap_arrays_per_image as _cap_arrays_per_image
    from eqlosses_d2.evaluation.results import ResultArrays

    image_ids = np.array([5, 3, 5, 5, 3, 5, 9])
    scores = np.array([0.1, 0.2, 0.9, 0.5, 0.1, 0.5, 0.3], dtype=np.float32)
    arrays = ResultArrays(image_ids, np.ones(7, np.int64), np.ones((7, 4), np.float32), scores)
    # image 5 (first seen, 4 results) is over a cap of 2: 0.9 (index 2), then the tie 0.5 at
    # indices 3 and 5 -> index 3; image 3 (2 results) keeps its order; then image 9
    assert _cap_arrays_per_image(arrays, 2).tolist() == [2, 3, 1, 4, 6]
    assert _cap_arrays_per_image(arrays, 4).tolist() == list(range(7))  # nobody over: untouched
    assert _cap_arrays_per_image(arrays, -1).tolist() == list(range(7))


def test_evaluator_keeps_arrays_and_writes_detectron2s_results_file(tmp_path):
    """The evaluator's arrays give Detectron2's results json byte for byte and the metrics of
    Detectron2's dicts; what it keeps per image is a few arrays, not a dict per result."""
    import pickle
    import tracemalloc

    import torch

    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.structures import Boxes, Instances

    gt, _ = make_lvis_data(seed=1, num_images=12, num_cats=6)
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    name = f"eqlosses_test_lvis_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=[f"c{i}" for i in range(6)])

    rng = np.random.RandomState(0)
    inputs, outputs = [], []
    for img in gt["images"]:
        h, w, k = img["height"], img["width"], int(rng.randint(0, 60))
        x0, y0 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
        boxes = np.stack([x0, y0, x0 + rng.uniform(1, w / 2, k), y0 + rng.uniform(1, h / 2, k)], 1)
        classes = rng.randint(0, 6, k)
        # and a near-hit on every ground truth of the image
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        hits = np.array([[a["bbox"][0] + 1, a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                         for a in anns]).reshape(-1, 4)
        boxes = np.concatenate([boxes, hits])
        classes = np.concatenate([classes, [a["category_id"] - 1 for a in anns]]).astype(np.int64)
        k = len(boxes)
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor(np.round(rng.rand(k), 2), dtype=torch.float32)  # ties
        inst.pred_classes = torch.tensor(classes)
        masks = torch.zeros(k, h, w, dtype=torch.bool)
        for j, (a, b, c, d) in enumerate(boxes.round().astype(int)):
            masks[j, b:d, a:c] = True
        inst.pred_masks = masks
        inputs.append({"image_id": img["id"], "height": h, "width": w})
        outputs.append({"instances": inst})

    expected = []  # what Detectron2's evaluator evaluates and writes
    for inp, out in zip(inputs, outputs):
        expected += instances_to_coco_json(out["instances"], inp["image_id"])
    for d in expected:
        d["category_id"] += 1
    assert 300 < len(expected)

    out_dir = tmp_path / "out"
    evaluator = LVISEvaluator(name, distributed=False, output_dir=str(out_dir))
    evaluator.reset()
    for inp, out in zip(inputs, outputs):
        evaluator.process([inp], [out])
    kept = evaluator._predictions
    assert all(set(p["instances"]) == {"image_id", "boxes", "scores", "classes", "rles", "mask_size"} for p in kept)
    # what the main process holds once the processes' lists are gathered (unpickled)
    dicts = [{"image_id": i["image_id"], "instances": instances_to_coco_json(o["instances"], i["image_id"])}
             for i, o in zip(inputs, outputs)]
    held = {}
    for label, obj in (("arrays", kept), ("dicts", dicts)):
        blob = pickle.dumps(obj)
        tracemalloc.start()
        unpickled = pickle.loads(blob)
        held[label] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del unpickled
    assert held["arrays"] < 0.5 * held["dicts"], held

    results = evaluator.evaluate()
    assert (out_dir / "lvis_instances_results.json").read_text() == json.dumps(expected)
    for task in ("bbox", "segm"):
        reference = evaluate_lvis(gt, expected, task)
        assert 0 < reference["AP"] < 100
        for key in LVIS_METRICS:
            assert _same(results[task][key], reference[key], tol=0), (task, key)
    assert not [f for f in os.listdir(out_dir) if f.endswith(".part")]


# ---------------------------------------------------------------------------
# Edge cases of an outside parity run against lvis-api
# ---------------------------------------------------------------------------


def test_annotation_id_0_is_evaluated_as_lvis_api_does(monkeypatch, tmp_path, caplog):
    """lvis-api records a match by the ground truth's id, so a detection matched to an
    annotation with id 0 is a false positive there (hotcoco: a true positive). Every path
    (dicts, arrays, Fixed AP) falls back to lvis-api and gives its numbers."""
    from eqlosses_d2.evaluation.results import ResultArrays

    gt = _tiny_gt()
    gt["annotations"][0]["id"] = 0  # the category-1 box, hit by PERFECT's 0.9 detection
    ref, _ = run_lvis_api(monkeypatch, tmp_path, gt, PERFECT, "bbox", 300)
    assert ref["AP"] == pytest.approx(0.5, abs=1e-9)  # lvis-api: category 1 has AP 0, category 2 AP 100
    with caplog.at_level(logging.WARNING):
        ours = evaluate_lvis_detailed(gt, PERFECT, "bbox")
    assert "annotation with id 0 (image_id 1, category_id 1)" in caplog.text
    assert ours.backend == "lvis-api"
    assert ours.per_category_ap[1] == near(0) and ours.per_category_ap[2] == near(100)
    for key in LVIS_METRICS:
        assert _same(ours.metrics[key], NAN if ref[key] == -1 else float(ref[key] * 100)), key
    arrays = evaluate_lvis_detailed(gt, ResultArrays.from_dicts(PERFECT), "bbox")
    assert arrays.backend == "lvis-api"
    assert all(_same(arrays.metrics[key], ours.metrics[key], tol=0) for key in LVIS_METRICS)
    fixed = evaluate_lvis_detailed(gt, ResultArrays.from_dicts(PERFECT), "bbox", -1, max_dets_per_category=5)
    assert fixed.backend == "lvis-api" and fixed.metrics["AP"] == near(50)
    # a zero-area annotation with id 0 is dropped anyway (rule 2): hotcoco stays exact
    gt["annotations"][0]["area"] = 0.0
    assert evaluate_lvis_detailed(gt, PERFECT, "bbox").backend == "hotcoco"


@pytest.mark.parametrize("fixed", [False, True])
def test_nan_score_is_an_error_even_where_the_cut_would_drop_it(fixed):
    """Image 1 holds 3 results; the cap of 1 per image (or Fixed AP's 1 per category) would
    sort the NaN last and drop it: one clear error instead, on dicts and on arrays."""
    from eqlosses_d2.evaluation.results import ResultArrays

    dets = PERFECT + [_det(1, 1, [0, 0, 5, 5], NAN)]
    kwargs = dict(max_dets_per_image=-1, max_dets_per_category=1) if fixed else dict(max_dets_per_image=1)
    message = r"1 result\(s\) have a NaN score, the first is result 2 \(image_id 1, category_id 1\)"
    for predictions in (dets, ResultArrays.from_dicts(dets)):
        with pytest.raises(ValueError, match=message):
            evaluate_lvis(_tiny_gt(), predictions, "bbox", **kwargs)


def test_evaluator_refuses_nan_scores_before_its_pools_cut_them(tmp_path):
    import torch

    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances

    json_file = tmp_path / "tiny_lvis.json"
    json_file.write_text(json.dumps(_tiny_gt()))
    name = f"eqlosses_test_lvis_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=["one", "two", "three"])
    evaluator = LVISEvaluator(name, distributed=False, max_dets_per_image=-1, max_dets_per_category=1)
    evaluator.reset()
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 10, 30, 30], [0, 0, 5, 5]]))
    inst.scores = torch.tensor([0.9, float("nan")])
    inst.pred_classes = torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"image_id 1: 1 detection\(s\) have a NaN score"):
        evaluator.process([{"image_id": 1}], [{"instances": inst}])


@pytest.mark.parametrize(
    "segmentation, kind",
    [
        ([[10, 10, 20, 10, 20, 20, 10, 20]], "a polygon list"),
        ({"size": [100, 100], "counts": [0, 5, 9995]}, "a dict without a compressed RLE"),
        (None, "missing"),
    ],
)
def test_a_mask_result_that_is_no_rle_is_one_clear_error(segmentation, kind):
    from eqlosses_d2.evaluation import evaluate_lvis_boundary
    from eqlosses_d2.evaluation.results import ResultArrays

    good = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9,
            "segmentation": _rle([10, 10, 20, 10, 20, 20, 10, 20], 100, 100)}
    bad = dict(good, image_id=2, category_id=3, segmentation=segmentation)
    if segmentation is None:
        del bad["segmentation"]
    message = rf"segm result 1 \(image_id 2, category_id 3\): 'segmentation' is {kind}"
    with pytest.raises(ValueError, match=message):
        evaluate_lvis(_tiny_gt(), [good, bad], "segm")
    with pytest.raises(ValueError, match=message):
        evaluate_lvis_boundary(_tiny_gt(), [good, bad])
    if segmentation is not None:
        with pytest.raises(ValueError, match=message):
            ResultArrays.from_dicts([good, bad])
    # box evaluation with boxes does not read the masks (rule 6)
    assert evaluate_lvis(_tiny_gt(), [good, bad], "bbox")["AP"] == near(100 / 2)
