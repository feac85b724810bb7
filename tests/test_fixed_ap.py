"""Fixed AP and Pooled AP (Dave et al. 2021): parity with the authors' procedures run
through lvis-api, the per-category cut and a pooled AP by hand, the evaluator's bounded
pools and score floor (exact), the RoI heads' floor filter, and the protocol key end to
end."""
import copy
import json
import math
import uuid

import numpy as np
import pytest
import torch

from eqlosses_d2.evaluation import (
    LVIS_FIXED_METRICS,
    POOLED_METRICS,
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


def pooled_ap_reference(monkeypatch, tmp_path, gt, preds, iou_type, k):
    """lvis-api's matching (LVISEval.evaluate) after Fixed AP's cut, then pooled precision
    written out as the authors' LVISPooledEval.accumulate describes it, loop by loop."""
    from lvis import LVIS, LVISEval, LVISResults

    path = tmp_path / f"gt_{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(gt))
    cut = top_detections_per_category(copy.deepcopy(preds), k)
    if iou_type == "segm":
        for ann in cut:
            ann.pop("bbox", None)
    with monkeypatch.context() as m:
        m.setattr(np, "float", float, raising=False)
        lvis_gt = LVIS(str(path))
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, cut, max_dets=-1), iou_type)
        ev.params.max_dets = -1
        ev.evaluate()
    p = ev.params
    num_areas, num_imgs = len(p.area_rng), len(p.img_ids)
    pools = {"all": list(range(len(p.cat_ids))), "r": ev.freq_groups[0], "c": ev.freq_groups[1], "f": ev.freq_groups[2]}
    out = {}
    for name, cats in pools.items():
        E = [ev.eval_imgs[c * num_areas * num_imgs + 0 + i] for i in range(num_imgs) for c in cats]
        E = [e for e in E if e is not None]
        gt_ig = np.concatenate([e["gt_ignore"] for e in E])
        num_gt = int(np.count_nonzero(gt_ig == 0))
        if not E or num_gt == 0:
            out[f"AP-pooled-{name}"] = NAN
            continue
        scores = np.concatenate([e["dt_scores"] for e in E])
        idx = np.argsort(-scores, kind="mergesort")
        dt_m = np.concatenate([e["dt_matches"] for e in E], axis=1)[:, idx]
        dt_ig = np.concatenate([e["dt_ignore"] for e in E], axis=1)[:, idx]
        tps = np.logical_and(dt_m, np.logical_not(dt_ig))
        fps = np.logical_and(np.logical_not(dt_m), np.logical_not(dt_ig))
        values = []
        for tp, fp in zip(np.cumsum(tps, axis=1).astype(float), np.cumsum(fps, axis=1).astype(float)):
            rc = tp / num_gt
            pr = (tp / (fp + tp + np.spacing(1))).tolist()
            for i in range(len(tp) - 1, 0, -1):
                if pr[i] > pr[i - 1]:
                    pr[i - 1] = pr[i]
            at_recall = [0.0] * len(p.rec_thrs)
            for j, pos in enumerate(np.searchsorted(rc, p.rec_thrs, side="left")):
                if pos >= len(pr):
                    break
                at_recall[j] = pr[pos]
            values.append(at_recall)
        out[f"AP-pooled-{name}"] = float(np.mean(np.array(values))) * 100
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_pooled_ap_parity_with_the_authors_definition(generated, monkeypatch, tmp_path, iou_type):
    gt, preds = generated
    ours = evaluate_lvis(gt, preds, iou_type, max_dets_per_image=-1, max_dets_per_category=60, pooled=True)
    assert list(ours) == list(LVIS_FIXED_METRICS) + list(POOLED_METRICS)
    ref = pooled_ap_reference(monkeypatch, tmp_path, gt, preds, iou_type, 60)
    for key in POOLED_METRICS:
        assert _same(ours[key], ref[key]), (key, ours[key], ref[key])
    assert 0 < ours["AP-pooled-all"] < 100
    # pooling is not averaging: it differs from the per-category mean
    assert ours["AP-pooled-all"] != ours["AP"]


def test_pooled_ap_by_hand():
    # one image, two categories (f and r), one ground truth each; three detections:
    # cat 1 hit (0.9), cat 2 false positive (0.8), cat 2 hit (0.7)
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "a", "frequency": "f", "image_count": 500},
                       {"id": 2, "name": "b", "frequency": "r", "image_count": 2}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0,
             "segmentation": [[50, 50, 80, 50, 80, 80, 50, 80]]},
        ],
    }
    preds = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [0, 60, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "score": 0.7},
    ]
    ours = evaluate_lvis(gt, preds, "bbox", pooled=True)
    # pooled over both: ranks TP, FP, TP; recall 0.5 at precision 1, recall 1 at precision 2/3;
    # 51 recall thresholds <= 0.5 get 1, the other 50 get 2/3 (the max to the right), at every IoU
    assert ours["AP-pooled-all"] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101 * 100, abs=1e-9)
    assert ours["AP-pooled-f"] == pytest.approx(100, abs=1e-9)
    # the rare pool alone: FP then TP: precision 1/2 everywhere
    assert ours["AP-pooled-r"] == pytest.approx(50, abs=1e-9)
    assert math.isnan(ours["AP-pooled-c"])  # no common category
    # per-category AP is the same numbers averaged per class: (100 + 50) / 2
    assert ours["AP"] == pytest.approx(75, abs=1e-9)


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
        largest_pool = max(largest_pool, max(evaluator._pools.held().values()))
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
        "TEST.EQLOSSES.POOLED_AP", "True",
    ]
    results = _run(["--config-file", QUICKSTART] + opts)
    for task in ("bbox", "segm"):
        assert list(results[task]) == list(LVIS_FIXED_METRICS) + list(POOLED_METRICS)
        assert math.isnan(results[task]["AP"]) or 0 <= results[task]["AP"] <= 100
    assert train_net.cli(["--config-file", QUICKSTART, "TEST.EQLOSSES.PROTOCOL", "pooled"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "train_net.py: error: TEST.EQLOSSES.PROTOCOL must be one of standard, fixed, boundary; got 'pooled'"
    ]


def test_result_arrays_cut_per_category_as_the_dicts_are():
    from eqlosses_d2.evaluation import ResultArrays

    scores = [0.5, 0.7, 0.9, 0.5, 0.1, 0.5]
    arrays = ResultArrays(np.arange(6), np.array([2, 1, 2, 2, 1, 2]), np.ones((6, 4), np.float32),
                          np.array(scores, np.float32))
    # the example of test_top_detections_per_category_by_hand, on arrays
    assert arrays.top_per_category(3).tolist() == [2, 0, 3, 1, 4]
    with pytest.raises(ValueError, match="must be > 0"):
        arrays.top_per_category(0)


# ---------------------------------------------------------------------------
# Bounded memory: the mask head in chunks, compact pools, the per-process cut
# ---------------------------------------------------------------------------


def _quickstart_model(num_classes=30):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from eqlosses_d2 import add_eqlosses_config

    from test_training import QUICKSTART

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "TEST.EQLOSSES.PROTOCOL", "fixed",
                         "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes)])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _random_detections(num, seed, size=128, num_classes=30):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(num, 2, generator=g) * (size - 30)
    extent = torch.rand(num, 2, generator=g) * 60 + 2
    inst = Instances((size, size))
    inst.pred_boxes = Boxes(torch.cat([corner, (corner + extent).clamp(max=size)], 1))
    inst.scores = torch.rand(num, generator=g)
    inst.pred_classes = torch.randint(0, num_classes, (num,), generator=g)
    return inst


def test_mask_head_runs_in_bounded_chunks_with_the_masks_of_one_call():
    """Without a per-image cap the mask head would see every detection at once; in chunks
    of at most mask_inference_chunk it gives the same masks (float rounding aside: a
    convolution may round differently for another batch size, as Detectron2's one call
    does between images with 1 and 2 detections)."""
    model = _quickstart_model()
    heads = model.roi_heads
    assert heads.mask_inference_chunk == 300
    calls = []
    heads.mask_head.register_forward_pre_hook(lambda m, args: calls.append(sum(len(x) for x in args[1])))
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)))
        for sizes, chunk, expected_calls in (
            ([700, 301], 300, [233, 233, 234, 150, 151]),
            ([0, 45], 16, [0, 15, 15, 15]),
            ([120, 80], 300, [200]),  # under the chunk: one call for the batch, as Detectron2
        ):
            detections = [_random_detections(n, seed) for seed, n in enumerate(sizes)]
            heads.mask_inference_chunk = 0  # one call
            calls.clear()
            whole = heads.forward_with_given_boxes(features, [x[:] for x in detections])
            assert calls == [sum(sizes)]
            heads.mask_inference_chunk = chunk
            calls.clear()
            chunked = heads.forward_with_given_boxes(features, [x[:] for x in detections])
            assert calls == expected_calls and max(calls) <= chunk
            for one, parts, n in zip(whole, chunked, sizes):
                assert len(parts) == n and parts.pred_masks.shape == (n, 1, 28, 28)
                assert torch.equal(parts.pred_boxes.tensor, one.pred_boxes.tensor)
                assert torch.equal(parts.pred_classes, one.pred_classes)
                assert torch.allclose(parts.pred_masks, one.pred_masks, rtol=0, atol=1e-6)
                assert torch.equal(parts.pred_masks > 0.5, one.pred_masks > 0.5)


def _fixed_ap_data(num_images=24, num_cats=4, dets_per_image=120, size=64, seed=0):
    """Small LVIS ground truth (64 px images, every category annotated or negative in each
    image) and a model's outputs for it: near-hits on the ground truth and random boxes,
    scores with ties, box-shaped masks."""
    from detectron2.structures import Boxes, Instances

    rng = np.random.RandomState(seed)
    cats = [{"id": c + 1, "name": f"c{c}", "frequency": "rcf"[c % 3], "image_count": 10} for c in range(num_cats)]
    images, anns, inputs, outputs = [], [], [], []
    for n in range(num_images):
        img_id = 1 + n
        present = sorted(rng.choice(num_cats, 2, replace=False).tolist())
        images.append({"id": img_id, "height": size, "width": size, "not_exhaustive_category_ids": [],
                       "neg_category_ids": [c + 1 for c in range(num_cats) if c not in present]})
        hits, hit_classes = [], []
        for c in present:
            x, y = rng.uniform(0, size / 2, 2)
            w, h = rng.uniform(8, size / 2, 2)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c + 1, "bbox": [x, y, w, h],
                         "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            hits += [[x + 1, y, x + w, y + h]] * 3
            hit_classes += [c] * 3
        num_random = dets_per_image - len(hits)
        corner = rng.uniform(0, size - 10, (num_random, 2))
        boxes = np.concatenate([np.array(hits), np.concatenate([corner, corner + rng.uniform(2, 30, (num_random, 2))], 1)])
        boxes = boxes.clip(0, size)
        inst = Instances((size, size))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(np.round(rng.rand(len(boxes)), 2), dtype=torch.float32)  # ties
        inst.pred_classes = torch.tensor(hit_classes + rng.randint(0, num_cats, num_random).tolist())
        masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
        for j, (a, b, c, d) in enumerate(boxes.round().astype(int)):
            masks[j, b:d, a:c] = True
        inst.pred_masks = masks
        inputs.append({"image_id": img_id, "height": size, "width": size})
        outputs.append({"instances": inst})
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, inputs, outputs


def _as_lvis_results(inputs, outputs):
    """What Detectron2's LVISEvaluator makes of the outputs (dicts, 1-based category ids)."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    results = []
    for inp, out in zip(inputs, outputs):
        results += instances_to_coco_json(out["instances"], inp["image_id"])
    for d in results:
        d["category_id"] += 1
    return results


def _register(tmp_path, gt):
    from detectron2.data import MetadataCatalog

    json_file = tmp_path / f"gt_{uuid.uuid4().hex}.json"
    json_file.write_text(json.dumps(gt))
    name = f"eqlosses_test_fixed_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=[c["name"] for c in gt["categories"]])
    return name


def test_evaluator_pools_are_compact_arrays_and_stay_under_2k(tmp_path):
    """Each category pool holds fewer than 2K results after every image, as arrays: under
    400 bytes a result here (measured 240: the numbers, the RLE string, the arrays'
    headers), where the pools of result dicts held 9.5 KB per kept result; the metrics are
    those of one cut of all results."""
    import tracemalloc

    gt, inputs, outputs = _fixed_ap_data()
    k = 40
    evaluator = LVISEvaluator(_register(tmp_path, gt), distributed=False, max_dets_per_image=-1,
                              max_dets_per_category=k)
    evaluator.reset()
    largest = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for inp, out in zip(inputs, outputs):
            evaluator.process([inp], [out])
            largest = max(largest, max(evaluator._pools.held().values()))
        held = sum(evaluator._pools.held().values())
        pool_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert k < largest <= 2 * k - 1
    assert evaluator._predictions == []  # nothing per image besides the pools
    assert pool_bytes / held < 400, (pool_bytes, held)
    results = evaluator.evaluate()
    flat = _as_lvis_results(inputs, outputs)
    assert len(flat) > 4 * 2 * k
    for task in ("bbox", "segm"):
        expected = evaluate_lvis(gt, flat, task, max_dets_per_image=-1, max_dets_per_category=k)
        assert 0 < expected["AP"] < 100
        for key in LVIS_FIXED_METRICS:
            assert _same(results[task][key], expected[key], tol=0), (task, key)


def test_each_process_sends_only_its_top_k_and_the_result_is_that_of_one_cut(tmp_path, monkeypatch):
    """Two ranks (Detectron2's gather simulated): each sends at most K results per category,
    and rank 0's Fixed AP (and Pooled AP) equal those of one cut of all results in
    Detectron2's gather order (rank 0's images, then rank 1's)."""
    import detectron2.utils.comm as comm

    gt, inputs, outputs = _fixed_ap_data(seed=1)
    k = 40
    name = _register(tmp_path, gt)
    shards = [(inputs[:12], outputs[:12]), (inputs[12:], outputs[12:])]
    sent = {}
    results = None
    for rank in (1, 0):
        monkeypatch.setattr(comm, "is_main_process", lambda rank=rank: rank == 0)
        monkeypatch.setattr(comm, "gather", lambda data, dst=0, rank=rank: sent.update({rank: data}) or (
            [sent[0], sent[1]] if rank == 0 else []))
        evaluator = LVISEvaluator(name, distributed=True, output_dir=str(tmp_path / f"rank{rank}"),
                                  max_dets_per_image=-1, max_dets_per_category=k, pooled=True)
        evaluator.reset()
        for inp, out in zip(*shards[rank]):
            evaluator.process([inp], [out])
        results = evaluator.evaluate()
        assert (results is None) == (rank == 1)
    for rank in (0, 1):
        (entry,) = sent[rank]
        per_class = np.bincount(entry["instances"]["classes"], minlength=4)
        assert per_class.max() == k  # the cut bit: every class has more than K on each rank
        all_of_rank = np.bincount(
            np.concatenate([out["instances"].pred_classes.numpy() for out in shards[rank][1]]), minlength=4)
        assert all_of_rank.min() > k
    flat = _as_lvis_results(inputs, outputs)
    for task in ("bbox", "segm"):
        expected = evaluate_lvis(gt, flat, task, max_dets_per_image=-1, max_dets_per_category=k, pooled=True)
        assert 0 < expected["AP"] < 100 and 0 < expected["AP-pooled-all"] < 100
        assert list(results[task]) == list(expected)
        for key in expected:
            assert _same(results[task][key], expected[key], tol=0), (task, key)


def _fixed_ap_on_rank(json_file, k, dump_dir):
    """One of two gloo processes: evaluate this rank's half of _fixed_ap_data(seed=1)."""
    import detectron2.utils.comm as comm
    from detectron2.data import MetadataCatalog

    gt, inputs, outputs = _fixed_ap_data(seed=1)
    name = "eqlosses_test_fixed_ap_two_ranks"
    MetadataCatalog.get(name).set(json_file=json_file, thing_classes=[c["name"] for c in gt["categories"]])
    rank, world_size = comm.get_rank(), comm.get_world_size()
    evaluator = LVISEvaluator(name, distributed=True, max_dets_per_image=-1, max_dets_per_category=k, pooled=True)
    evaluator.reset()
    shard = len(inputs) // world_size
    for inp, out in list(zip(inputs, outputs))[rank * shard : (rank + 1) * shard]:
        evaluator.process([inp], [out])
    held = evaluator._pools.held()
    results = evaluator.evaluate()
    torch.save({"world_size": world_size, "held": held, "results": results}, f"{dump_dir}/rank{rank}.pt")


def test_two_gloo_processes_give_the_fixed_ap_of_one_cut(tmp_path):
    """The same as the simulated gather above, with Detectron2's gather between two real
    processes (gloo on the CPU)."""
    from eqlosses_d2.compat import launch

    gt, inputs, outputs = _fixed_ap_data(seed=1)
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    k = 40
    launch(_fixed_ap_on_rank, 2, dist_url="auto", args=(str(json_file), k, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[1]["results"] is None
    for rank in range(2):  # every class has more than K results on each rank: the pools were cut
        classes = torch.cat([out["instances"].pred_classes for out in outputs[rank * 12 : (rank + 1) * 12]])
        assert torch.bincount(classes, minlength=4).min() > k
        assert k <= min(ranks[rank]["held"].values()) and max(ranks[rank]["held"].values()) < 2 * k
    results = ranks[0]["results"]
    flat = _as_lvis_results(inputs, outputs)
    for task in ("bbox", "segm"):
        expected = evaluate_lvis(gt, flat, task, max_dets_per_image=-1, max_dets_per_category=k, pooled=True)
        for key in expected:
            assert _same(results[task][key], expected[key], tol=0), (task, key)


def test_compact_instances_encodes_masks_in_chunks_as_detectron2_does():
    """Over 64 masks (two chunks and a part): the RLE strings of Detectron2's one call per mask."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    from eqlosses_d2.evaluation import compact_instances

    _, inputs, outputs = _fixed_ap_data(num_images=1, dets_per_image=150)
    instances = outputs[0]["instances"]
    record = compact_instances(instances, 1)
    expected = instances_to_coco_json(instances, 1)
    assert len(record["rles"]) == 150
    assert record["rles"] == [d["segmentation"]["counts"] for d in expected]
    assert record["mask_size"] == (64, 64)
