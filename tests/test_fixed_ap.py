"""Fixed AP (Dave et al. 2021): parity with the authors' procedure run through lvis-api,
the per-category cut by hand, the evaluator's bounded pools and score floor (exact), the
RoI heads' floor filter, and the protocol key end to end."""
import copy
import json
import math
import uuid

import numpy as np
import pytest
import torch

from eqlosses_d2.evaluation import (
    LVIS_FIXED_METRICS,
    LVISEvaluator,
    evaluate_lvis,
    evaluate_lvis_detailed,
    top_detections_per_category,
)

from test_lvis_evaluation import NAN, _same, make_lvis_data


def run_fixed_ap_reference(monkeypatch, tmp_path, gt, preds, iou_type, k):
    """The authors' evaluate_ap_fixed.py procedure on lvis-api 0.5.3: per-category top k
    (stable sort by score), LVISResults(max_dets=-1), params.max_dets = -1."""
    from lvis import LVIS, LVISEval, LVISResults

    path = tmp_path / f"gt_{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(gt))
    by_cat = {}
    for ann in copy.deepcopy(preds):
        if iou_type == "segm":
            ann.pop("bbox", None)  # Detectron2: mask area for small/medium/large
        by_cat.setdefault(ann["category_id"], []).append(ann)
    cut = []
    for anns in by_cat.values():
        cut.extend(sorted(anns, key=lambda a: a["score"], reverse=True)[:k])
    with monkeypatch.context() as m:
        m.setattr(np, "float", float, raising=False)
        lvis_gt = LVIS(str(path))
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, cut, max_dets=-1), iou_type)
        ev.params.max_dets = -1
        ev.run()
    return ev.get_results()


@pytest.fixture(scope="module")
def generated():
    return make_lvis_data(seed=3, num_images=20, num_cats=10)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fixed_ap_parity_with_the_authors_procedure(generated, monkeypatch, tmp_path, iou_type):
    gt, preds = generated
    per_category = {}
    for p in preds:
        per_category[p["category_id"]] = per_category.get(p["category_id"], 0) + 1
    k = 60
    assert max(per_category.values()) > k > min(per_category.values())  # the cut bites, not everywhere
    preds_before = copy.deepcopy(preds)
    ours = evaluate_lvis_detailed(gt, preds, iou_type, max_dets_per_image=-1, max_dets_per_category=k)
    assert preds == preds_before
    ref = run_fixed_ap_reference(monkeypatch, tmp_path, gt, preds, iou_type, k)
    assert list(ref) == list(LVIS_FIXED_METRICS) == list(ours.metrics)
    for key in LVIS_FIXED_METRICS:
        expected = NAN if ref[key] == -1 else float(ref[key] * 100)
        assert _same(ours.metrics[key], expected), (key, ours.metrics[key], expected)
    assert 0 < ours.metrics["AP"] < 100
    # and the cut matters: without it the numbers differ
    uncut = evaluate_lvis(gt, preds, iou_type, max_dets_per_image=-1)
    assert uncut["AP"] != ours.metrics["AP"]


def test_top_detections_per_category_by_hand():
    preds = [
        {"category_id": 2, "score": 0.5, "n": 0},
        {"category_id": 1, "score": 0.7, "n": 1},
        {"category_id": 2, "score": 0.9, "n": 2},
        {"category_id": 2, "score": 0.5, "n": 3},
        {"category_id": 1, "score": 0.1, "n": 4},
        {"category_id": 2, "score": 0.5, "n": 5},
    ]
    out = top_detections_per_category(preds, 3)
    # category 2 first (first seen), best first, the tie at 0.5 broken by list order (0, 3; not 5)
    assert [d["n"] for d in out] == [2, 0, 3, 1, 4]
    with pytest.raises(ValueError, match="must be > 0"):
        top_detections_per_category(preds, 0)


def _instances(boxes, scores, classes, size=100):
    from detectron2.structures import Boxes, Instances

    inst = Instances((size, size))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_evaluator_pools_are_bounded_exact_and_feed_the_score_floor(tmp_path):
    from detectron2.data import MetadataCatalog
    from types import SimpleNamespace

    gt, _ = make_lvis_data(seed=5, num_images=12, num_cats=4)
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    name = f"eqlosses_test_fixed_{uuid.uuid4().hex}"
    cats = sorted(c["id"] for c in gt["categories"])
    assert cats == [1, 2, 3, 4]
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=[str(c) for c in cats])

    k = 5
    consumer = SimpleNamespace(test_score_floor="unset")
    evaluator = LVISEvaluator(name, tasks=("bbox",), distributed=False, max_dets_per_image=-1, max_dets_per_category=k)
    evaluator.score_floor_consumers.append(consumer)
    evaluator.reset()
    assert consumer.test_score_floor is None
    rng = np.random.RandomState(0)
    flat = []
    largest_pool = 0
    for img in gt["images"]:
        # the image's ground truth (some hits) and random boxes, scores with ties
        truth = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] in cats]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in truth)]
        classes = [a["category_id"] - 1 for a in truth]
        n = 9
        x0 = rng.uniform(0, 60, n)
        y0 = rng.uniform(0, 60, n)
        boxes += np.stack([x0, y0, x0 + rng.uniform(5, 30, n), y0 + rng.uniform(5, 30, n)], 1).tolist()
        classes += rng.randint(0, 4, n).tolist()
        scores = np.round(rng.rand(len(boxes)), 1).clip(0.05).tolist()
        evaluator.process([{"image_id": img["id"]}], [{"instances": _instances(boxes, scores, classes)}])
        largest_pool = max(largest_pool, max(len(p) for p in evaluator._pools.values()))
        for b, s, c in zip(boxes, scores, classes):
            flat.append({"image_id": img["id"], "category_id": c + 1, "score": float(np.float32(s)),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    assert largest_pool < 2 * k
    # the floor each class was given is the k-th best score of the results seen before it
    floor = consumer.test_score_floor
    assert isinstance(floor, torch.Tensor) and floor.shape == (4,)
    for c in range(4):
        if torch.isfinite(floor[c]):
            assert floor[c] <= sorted((d["score"] for d in flat if d["category_id"] == c + 1), reverse=True)[k - 1] + 1e-6
    assert torch.isfinite(floor).any()
    results = evaluator.evaluate()
    assert consumer.test_score_floor is None  # inference after evaluation is not filtered
    expected = evaluate_lvis(gt, flat, "bbox", max_dets_per_image=-1, max_dets_per_category=k)
    for key in LVIS_FIXED_METRICS:
        assert _same(results["bbox"][key], expected[key]), key
    assert 0 < results["bbox"]["AP"] < 100


def test_roi_heads_drop_detections_below_the_floor_before_the_mask_head(tiny_dataset):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import train_net
    from eqlosses_d2 import add_eqlosses_config

    from test_training import QUICKSTART, _opts

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(_opts(tiny_dataset, "/tmp/unused") + ["TEST.EQLOSSES.PROTOCOL", "fixed"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.roi_heads.box_predictor.test_topk_per_image == -1  # no per-image cap
    image = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}
    calls = []
    model.roi_heads.mask_head.register_forward_pre_hook(lambda m, args: calls.append(len(args[1][0])))
    with torch.no_grad():
        full = model([image])[0]["instances"]
        assert len(full) > 10
        floor = torch.full((cfg.MODEL.ROI_HEADS.NUM_CLASSES,), float("-inf"))
        floor[0] = full.scores[full.pred_classes == 0].median()
        floor[1] = float("inf")
        model.roi_heads.test_score_floor = floor
        kept = model([image])[0]["instances"]
        model.roi_heads.test_score_floor = None
    expected = full[full.scores >= floor[full.pred_classes]]
    assert 0 < len(kept) < len(full)
    assert calls == [len(full), len(kept)]  # the mask head saw only the kept detections
    assert torch.equal(kept.scores, expected.scores) and torch.equal(kept.pred_classes, expected.pred_classes)
    assert torch.equal(kept.pred_masks, expected.pred_masks)
    assert not (kept.pred_classes == 1).any()


def test_fixed_protocol_end_to_end_and_bad_keys(tiny_dataset, tmp_path, capsys):
    import train_net

    from test_training import QUICKSTART, _opts, _run

    opts = _opts(tiny_dataset, tmp_path, max_iter=2) + [
        "TEST.EQLOSSES.PROTOCOL", "fixed", "TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS", "50",
    ]
    results = _run(["--config-file", QUICKSTART] + opts)
    for task in ("bbox", "segm"):
        assert list(results[task]) == list(LVIS_FIXED_METRICS)
        assert math.isnan(results[task]["AP"]) or 0 <= results[task]["AP"] <= 100
    assert train_net.cli(["--config-file", QUICKSTART, "TEST.EQLOSSES.PROTOCOL", "pooled"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "train_net.py: error: TEST.EQLOSSES.PROTOCOL must be one of standard, fixed; got 'pooled'"
    ]
