#!/usr/bin/env python
"""
LVIS evaluation speed: eqlosses_d2's evaluate_lvis (hotcoco matching) against lvis-api
0.5.3 (with np.float aliased for it) on generated LVIS-format data, both tasks, checking
that every metric is identical.

    python benchmarks/bench_lvis_eval.py [--images 2000] [--classes 1203] [--dets 300]
                                         [--tasks bbox segm] [--fixed-ap] [--memory | --held | --cli]

Ground truth: 640x480 images with about 12 instances each (LVIS v1 val has ~12), classes
drawn with a long tail and an r/c/f split by training image count, per-image negative
and not-exhaustive category lists. Results: ``--dets`` per image (jittered copies of the
ground truth plus random boxes of random classes), rectangles as RLE masks for segm.
Times are wall-clock seconds of the evaluation call from results in memory (lvis-api:
``LVISResults`` + ``LVISEval.run``); prints a Markdown table. ``--memory`` instead runs
each evaluator in a fresh process and reports how far its peak resident memory rises
above the memory holding the generated data and results (Linux ``ru_maxrss``). ``--held``
compares what the main process of a distributed evaluation holds once the results are
gathered: Detectron2's ``LVISEvaluator`` keeps a dict per result, ours arrays per image.
``--cli`` times the whole evaluation from json files (the annotation file and the
results file written to a temporary directory first): lvis-api's ``LVIS(path)``,
``LVISResults(gt, path)``, ``LVISEval.run()`` against ``python -m eqlosses_d2.evaluation``'s
``main`` in this process (json parsing included), and both commands as fresh processes
(interpreter start and imports included; ours imports torch and Detectron2 through
``import eqlosses_d2``), checking that the metrics are identical.
"""
import argparse
import copy
import math
import os
import sys
import time

import numpy as np

from proc_memory import rss_mb  # (this script's directory)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_data(num_images, num_classes, dets_per_image, seed=0):
    from pycocotools import mask as mask_utils

    rng = np.random.RandomState(seed)
    ranks = np.arange(1, num_classes + 1)
    prob = 1.0 / ranks**1.1
    prob /= prob.sum()
    image_count = np.maximum(1, np.round(100000 * prob)).astype(int)
    categories = [
        {"id": c + 1, "name": f"class_{c + 1}", "image_count": int(image_count[c]),
         "frequency": "r" if image_count[c] <= 10 else "c" if image_count[c] <= 100 else "f"}
        for c in range(num_classes)
    ]
    w, h = 640, 480
    images, annotations, results = [], [], []

    def rle(box):
        x, y, bw, bh = box
        return mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]

    def random_box(n):
        bw = rng.uniform(8, 200, n)
        bh = rng.uniform(8, 200, n)
        return np.stack([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], 1)

    for i in range(1, num_images + 1):
        n_gt = max(1, rng.poisson(12))
        gt_classes = rng.choice(num_classes, n_gt, p=prob) + 1
        gt_boxes = random_box(n_gt)
        present = set(gt_classes.tolist())
        neg = [int(c) for c in rng.choice(num_classes, 8, replace=False) + 1 if c not in present]
        images.append({"id": i, "width": w, "height": h, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": [int(c) for c in list(present)[:1] if rng.rand() < 0.3]})
        for c, box in zip(gt_classes.tolist(), gt_boxes.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c), "bbox": box,
                                "area": box[2] * box[3], "segmentation": [[box[0], box[1], box[0] + box[2], box[1],
                                                                           box[0] + box[2], box[1] + box[3], box[0],
                                                                           box[1] + box[3]]], "iscrowd": 0})
        # jittered copies of the ground truth (hits, near misses), then random boxes
        n_hit = min(dets_per_image, 3 * n_gt)
        src = rng.randint(0, n_gt, n_hit)
        boxes = gt_boxes[src] + rng.normal(0, 6, (n_hit, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 4)
        classes = np.where(rng.rand(n_hit) < 0.7, gt_classes[src], rng.choice(num_classes, n_hit, p=prob) + 1)
        n_rand = dets_per_image - n_hit
        boxes = np.concatenate([boxes, random_box(n_rand)])
        classes = np.concatenate([classes, rng.choice(num_classes, n_rand) + 1])
        scores = rng.rand(dets_per_image)
        for box, c, s in zip(boxes.tolist(), classes.tolist(), scores.tolist()):
            results.append({"image_id": i, "category_id": int(c), "bbox": box, "score": s})
    gt = {"images": images, "annotations": annotations, "categories": categories, "info": {}, "licenses": []}
    return gt, results, rle


def run_lvis_api(gt, results, iou_type, max_dets, per_category):
    from lvis import LVIS, LVISEval, LVISResults

    from eqlosses_d2.evaluation import top_detections_per_category

    lvis_gt = LVIS.__new__(LVIS)
    import logging

    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    start = time.perf_counter()
    if per_category:
        results = top_detections_per_category(results, per_category)
    had_float = hasattr(np, "float")
    np.float = float
    try:
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), iou_type)
        if per_category:
            ev.params.max_dets = -1
        ev.run()
    finally:
        if not had_float:
            del np.float
    elapsed = time.perf_counter() - start
    return {k: (float("nan") if v == -1 else float(v * 100)) for k, v in ev.get_results().items()}, elapsed


def _memory_child(which, task, images, classes, dets, fixed_ap, queue):
    import resource

    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.evaluation import LVISGroundTruth, evaluate_lvis

    gt, results, rle = make_data(images, classes, dets)
    if task == "segm":
        results = [dict(r, segmentation=rle(r["bbox"])) for r in results]
    max_dets, per_category = (-1, 10000) if fixed_ap else (300, None)
    base = rss_mb()
    if which == "ours":
        evaluate_lvis(LVISGroundTruth(gt), results, task, max_dets, per_category)
    else:
        run_lvis_api(gt, results, task, max_dets, per_category)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((base, peak))


def measure_memory(args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    print(f"\n### LVIS evaluation peak memory above the loaded data, {args.images} images x {args.classes} "
          f"classes x {args.dets} results\n")
    print("| task | data + results MB | evaluate_lvis +MB | lvis-api 0.5.3 +MB |")
    print("|---|---|---|---|")
    for task in args.tasks:
        row = {}
        for which in ("ours", "lvis-api"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(which, task, args.images, args.classes, args.dets,
                                                           args.fixed_ap, queue))
            proc.start()
            row[which] = queue.get()
            proc.join()
        base = row["ours"][0]
        print(f"| {task} | {base:.0f} | {row['ours'][1] - row['ours'][0]:.0f} | "
              f"{row['lvis-api'][1] - row['lvis-api'][0]:.0f} |", flush=True)


def _per_image(results, rle, with_masks):
    """The generated results as LVISEvaluator.process keeps them (arrays per image, see
    eqlosses_d2/evaluation/results.py) and as Detectron2's keeps them (dicts per result)."""
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    compact, dicts = [], []
    for image_id, rs in by_image.items():
        boxes = np.array([r["bbox"] for r in rs], dtype=np.float32)
        scores = np.array([r["score"] for r in rs], dtype=np.float32)
        classes = np.array([r["category_id"] - 1 for r in rs], dtype=np.int64)
        record = {"image_id": image_id, "boxes": boxes, "scores": scores, "classes": classes}
        entries = [{"image_id": image_id, "category_id": int(c), "bbox": b, "score": s}
                   for c, b, s in zip(classes.tolist(), boxes.tolist(), scores.tolist())]
        if with_masks:
            masks = [rle(r["bbox"]) for r in rs]
            record["rles"] = [m["counts"].decode("utf-8") for m in masks]
            record["mask_size"] = tuple(masks[0]["size"])
            for e, counts in zip(entries, record["rles"]):
                e["segmentation"] = {"size": list(record["mask_size"]), "counts": counts}
        compact.append({"image_id": image_id, "instances": record})
        dicts.append({"image_id": image_id, "instances": entries})
    return compact, dicts


def measure_held(args):
    """What the main process holds once every process's results are gathered: the
    unpickled lists (tracemalloc), the bytes gathered and saved (pickle), and the time
    from them to the metrics."""
    import pickle
    import tracemalloc

    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.evaluation import LVISGroundTruth, evaluate_lvis
    from eqlosses_d2.evaluation.results import ResultArrays

    gt, results, rle = make_data(args.images, args.classes, args.dets)
    print(f"\n### Gathered results on the main process, {args.images} images x {args.dets} results\n")
    print("| task | kept as | pickled MB | held after unpickling MB | evaluation s |")
    print("|---|---|---|---|---|")
    lvis_gt = LVISGroundTruth(gt)
    for task in args.tasks:
        compact, dicts = _per_image(results, rle, with_masks=task == "segm")
        for label, kept in (("dicts (Detectron2)", dicts), ("arrays (eqlosses_d2)", compact)):
            blob = pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
            del kept
            tracemalloc.start()
            held = pickle.loads(blob)
            held_mb = tracemalloc.get_traced_memory()[0] / 2**20
            tracemalloc.stop()
            start = time.perf_counter()
            if label.startswith("dicts"):
                flat = [dict(d, category_id=d["category_id"] + 1) for p in held for d in p["instances"]]
                metrics = evaluate_lvis(lvis_gt, flat, task)
            else:
                metrics = evaluate_lvis(lvis_gt, ResultArrays.from_records([p["instances"] for p in held]), task)
            elapsed = time.perf_counter() - start
            print(f"| {task} | {label} | {len(blob) / 2**20:.0f} | {held_mb:.0f} | {elapsed:.1f} "
                  f"(AP {metrics['AP']:.3f}) |", flush=True)
            del held, blob


_LVIS_API_FROM_FILES = """
import json, sys, time
import numpy as np
np.float = float  # lvis-api 0.5.3 on numpy >= 1.24
from lvis import LVIS, LVISEval, LVISResults
start, cpu = time.perf_counter(), time.process_time()
gt = LVIS(sys.argv[1])
results = sys.argv[2]
if int(sys.argv[4]) < 0:  # Fixed AP, as the authors' evaluate_ap_fixed.py: each category's top 10,000 first
    with open(results) as f:
        by_category = {}
        for r in json.load(f):
            by_category.setdefault(r["category_id"], []).append(r)
    results = [r for rs in by_category.values() for r in sorted(rs, key=lambda r: r["score"], reverse=True)[:10000]]
ev = LVISEval(gt, LVISResults(gt, results, max_dets=int(sys.argv[4])), sys.argv[3])
if int(sys.argv[4]) < 0:
    ev.params.max_dets = -1
ev.run()
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "metrics": ev.get_results()}))
"""


def measure_cli(args):
    """The whole evaluation from json files: lvis-api against our command line."""
    import contextlib
    import io
    import json
    import subprocess
    import tempfile

    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.evaluation.cli import main as cli_main

    gt, results, rle = make_data(args.images, args.classes, args.dets)
    max_dets = -1 if args.fixed_ap else 300
    protocol = ["--protocol", "fixed"] if args.fixed_ap else []
    print(f"\n### LVIS evaluation from json files, {args.images} images x {args.classes} classes x {args.dets} "
          f"results, {'Fixed AP' if args.fixed_ap else 'standard (300 per image)'}\n")
    print("| task | lvis-api 0.5.3 s | `python -m eqlosses_d2.evaluation` (main) s | speed-up | CPU s: lvis-api / "
          "ours (speed-up) | as processes: lvis-api s / ours s | largest metric difference |")
    print("|---|---|---|---|---|---|---|")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, res_path, out_path = (os.path.join(tmp, n) for n in ("gt.json", "results.json", "ours.json"))
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        for task in args.tasks:
            task_results = results
            if task == "segm":  # no bbox: lvis-api then uses the mask area, as Detectron2 and we do
                task_results = []
                for r in results:
                    mask = rle(r["bbox"])
                    task_results.append({"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                                         "segmentation": {"size": mask["size"], "counts": mask["counts"].decode("ascii")}})
            with open(res_path, "w") as f:
                json.dump(task_results, f)
            argv = ["--annotations", gt_path, "--results", res_path, "--iou-type", task, "--output", out_path]
            start, cpu = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli_main(argv + protocol) == 0
            t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu
            ours = json.load(open(out_path))["metrics"]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "eqlosses_d2.evaluation"] + argv + protocol, check=True, cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            p_ours = time.perf_counter() - start
            start = time.perf_counter()
            ref = subprocess.run([sys.executable, "-c", _LVIS_API_FROM_FILES, gt_path, res_path, task, str(max_dets)],
                                 check=True, capture_output=True, text=True)
            p_ref = time.perf_counter() - start
            ref = json.loads(ref.stdout.strip().splitlines()[-1])
            t_ref, c_ref = ref["seconds"], ref["cpu"]
            worst = 0.0
            for key, value in ref["metrics"].items():
                mine = ours[key]
                if value == -1:
                    assert mine is None, key
                else:
                    worst = max(worst, abs(mine - value * 100))
            print(f"| {task} | {t_ref:.1f} | {t_ours:.2f} | {t_ref / t_ours:.1f}x | {c_ref:.1f} / {c_ours:.2f} "
                  f"({c_ref / c_ours:.1f}x) | {p_ref:.1f} / {p_ours:.1f} ({p_ref / p_ours:.1f}x) | {worst:.1e} |",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--dets", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--fixed-ap", action="store_true", help="Fixed AP (10,000 per class, no per-image cap)")
    parser.add_argument("--skip-lvis-api", action="store_true", help="time ours only")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of time")
    parser.add_argument("--held", action="store_true",
                        help="memory of the gathered results on the main process: Detectron2's dicts vs our arrays")
    parser.add_argument("--cli", action="store_true",
                        help="from json files: lvis-api against python -m eqlosses_d2.evaluation")
    args = parser.parse_args()
    if args.memory:
        measure_memory(args)
        return
    if args.held:
        measure_held(args)
        return
    if args.cli:
        measure_cli(args)
        return

    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.evaluation import LVISGroundTruth, evaluate_lvis

    start = time.perf_counter()
    gt, results, rle = make_data(args.images, args.classes, args.dets)
    print(f"generated {len(gt['images'])} images, {len(gt['annotations'])} ground truths, "
          f"{len(results)} results in {time.perf_counter() - start:.1f} s", flush=True)
    max_dets, per_category = (-1, 10000) if args.fixed_ap else (300, None)
    rows = []
    for task in args.tasks:
        task_results = results
        if task == "segm":
            task_results = [dict(r, segmentation=rle(r["bbox"])) for r in results]
        start = time.perf_counter()
        ours = evaluate_lvis(LVISGroundTruth(gt), task_results, task, max_dets, per_category)
        t_ours = time.perf_counter() - start
        if args.skip_lvis_api:
            rows.append((task, t_ours, None, None, ours["AP"]))
            continue
        ref, t_ref = run_lvis_api(gt, task_results, task, max_dets, per_category)
        worst = max(0.0 if (math.isnan(ours[k]) and math.isnan(ref[k])) else abs(ours[k] - ref[k]) for k in ref)
        rows.append((task, t_ours, t_ref, worst, ours["AP"]))
        print(f"{task}: ours {t_ours:.1f} s, lvis-api {t_ref:.1f} s", flush=True)
    protocol = "Fixed AP" if args.fixed_ap else "standard (300 per image)"
    print(f"\n### LVIS evaluation, {args.images} images x {args.classes} classes x {args.dets} results, {protocol}\n")
    print("| task | evaluate_lvis s | lvis-api 0.5.3 s | speed-up | largest metric difference | AP |")
    print("|---|---|---|---|---|---|")
    for task, t_ours, t_ref, worst, ap in rows:
        if t_ref is None:
            print(f"| {task} | {t_ours:.1f} | - | - | - | {ap:.3f} |")
        else:
            print(f"| {task} | {t_ours:.1f} | {t_ref:.1f} | {t_ref / t_ours:.1f}x | {worst:.1e} | {ap:.3f} |")


if __name__ == "__main__":
    main()
