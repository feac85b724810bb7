#!/usr/bin/env python
"""
Fixed-AP inference memory and time: the quickstart Mask R-CNN (R-18-FPN, mask head 64
channels) with a stub box head that emits N random detections per image (no per-image
cap, as ``TEST.EQLOSSES.PROTOCOL fixed``), then what the Fixed-AP evaluation does per
image: the score floor, the mask head, Detectron2's mask pasting, and
``LVISEvaluator.process`` into the per-category pools; then ``evaluate()`` (bbox and segm).

    python benchmarks/bench_fixed_ap.py [--dets 300 1000 3000 10000] [--images 3]
        [--classes 1203] [--size 128] [--k 10000] [--chunk 300] [--code DIR] [--one-call]
        [--device cuda]
    python benchmarks/bench_fixed_ap.py --pools-only [--images 500] [--dets 2000] [--k 10000] [--code DIR]

Each N runs in a fresh process, which reports its peak resident memory (Linux
``ru_maxrss``), the rise of that peak over its memory before the first image (model,
ground truth and detections loaded), the seconds per image of inference + ``process``,
the seconds of ``evaluate()``, the results the pools hold at the end and the bytes per
held result (tracemalloc); with ``--device cuda`` also the peak GPU memory of inference
(``torch.cuda.max_memory_allocated``, the model loaded before it). ``--one-call`` sets ``mask_inference_chunk = 0`` (the mask head
on all of an image's detections at once, as before the chunking); ``--code DIR`` imports
``eqlosses_d2`` from another checkout, e.g. the code before a change::

    mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    python benchmarks/bench_fixed_ap.py --code /tmp/before

A run whose one-call mask logits (N x C x 28 x 28 float32) would pass ``--budget-gb`` is
skipped and its estimate printed instead. ``--pools-only`` runs ``LVISEvaluator.process``
alone (no model) on ``--images`` images of random long-tailed detections with box masks,
to show what the per-category pools hold at a realistic number of results: results held,
the largest class pool (< 2K), bytes per held result, the peak RSS rise and seconds per
image. Prints Markdown tables.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from proc_memory import rss_mb  # (this script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_gt(num_images, num_classes, size, seed=0):
    import numpy as np

    rng = np.random.RandomState(seed)
    categories = [{"id": c + 1, "name": f"class_{c + 1}", "frequency": "rcf"[c % 3], "image_count": 10}
                  for c in range(num_classes)]
    images, annotations = [], []
    for i in range(1, num_images + 1):
        present = rng.choice(num_classes, 12, replace=False)
        images.append({"id": i, "height": size, "width": size, "not_exhaustive_category_ids": [],
                       "neg_category_ids": [int(c) + 1 for c in rng.choice(num_classes, 20) if c not in present]})
        for c in present.tolist():
            x, y = rng.uniform(0, size / 2, 2)
            w, h = rng.uniform(8, size / 2, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1,
                                "bbox": [x, y, w, h], "area": w * h,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    return {"images": images, "annotations": annotations, "categories": categories}


def _stub_box_inference(num_dets, num_classes, seed):
    """A ``_forward_box`` for inference that returns ``num_dets`` random detections per image."""
    import torch
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)

    def forward_box(features, proposals, *args, **kwargs):
        out = []
        for p in proposals:
            height, width = p.image_size
            device = p.proposal_boxes.device
            corner = torch.rand(num_dets, 2, generator=generator) * torch.tensor([width - 8.0, height - 8.0])
            extent = torch.rand(num_dets, 2, generator=generator) * (min(height, width) / 2) + 4
            inst = Instances((height, width))
            inst.pred_boxes = Boxes(torch.cat([corner, corner + extent], 1).clamp(max=max(height, width)))
            inst.scores = torch.rand(num_dets, generator=generator)
            inst.pred_classes = torch.randint(0, num_classes, (num_dets,), generator=generator)
            out.append(inst.to(device))
        return out

    return forward_box


def pools_child(args):
    """``--pools-only``: ``LVISEvaluator.process`` alone on random detections with box
    masks (no model), to show what the pools hold at a realistic result count."""
    import pickle
    import resource
    import tempfile
    import tracemalloc
    import uuid

    import numpy as np
    import torch

    import eqlosses_d2  # noqa: F401
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from eqlosses_d2.evaluation import LVISEvaluator

    (num_dets,) = args.dets
    gt = _make_gt(1, args.classes, args.size)
    json_file = os.path.join(tempfile.mkdtemp(), "gt.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    name = f"bench_fixed_ap_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=json_file, thing_classes=[c["name"] for c in gt["categories"]])
    evaluator = LVISEvaluator(name, distributed=False, max_dets_per_image=-1, max_dets_per_category=args.k)
    evaluator.reset()
    rng = np.random.RandomState(0)
    prob = 1.0 / np.arange(1, args.classes + 1) ** 1.1  # a long tail of classes
    prob /= prob.sum()
    size = args.size

    def output():
        corner = rng.uniform(0, size - 8, (num_dets, 2))
        boxes = np.concatenate([corner, np.minimum(corner + rng.uniform(4, size / 2, (num_dets, 2)), size)], 1)
        inst = Instances((size, size))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(rng.rand(num_dets), dtype=torch.float32)
        inst.pred_classes = torch.tensor(rng.choice(args.classes, num_dets, p=prob))
        masks = torch.zeros(num_dets, size, size, dtype=torch.bool)
        for j, (a, b, c, d) in enumerate(boxes.round().astype(int)):
            masks[j, b:d, a:c] = True
        inst.pred_masks = masks
        return {"instances": inst}

    evaluator.process([{"image_id": 1}], [output()])  # warm-up
    evaluator.reset()
    outputs = [output() for _ in range(4)]  # reused: generating masks is not what is measured
    base = rss_mb()
    start = time.perf_counter()
    for i in range(args.images):
        evaluator.process([{"image_id": 1}], [outputs[i % len(outputs)]])
    per_image = (time.perf_counter() - start) / args.images
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pools = evaluator._pools
    held = sum(pools.held().values()) if hasattr(pools, "held") else sum(len(p) for p in pools.values())
    largest = max(pools.held().values()) if hasattr(pools, "held") else max(len(p) for p in pools.values())
    blob = pickle.dumps(pools, protocol=pickle.HIGHEST_PROTOCOL)
    tracemalloc.start()
    clone = pickle.loads(blob)
    pool_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del clone
    print(json.dumps({"base_mb": base, "peak_mb": peak, "per_image_s": per_image, "held": held, "largest": largest,
                      "bytes_per_held": pool_bytes / max(held, 1), "pool_mb": pool_bytes / 2**20}))


def child(args):
    """One setting, in this process; prints one json line."""
    if args.code:
        sys.path.insert(0, args.code)
    else:
        sys.path.insert(0, ROOT)
    if args.pools_only:
        pools_child(args)
        return
    import pickle
    import resource
    import tempfile
    import tracemalloc
    import uuid

    import torch

    import eqlosses_d2
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model
    from eqlosses_d2 import add_eqlosses_config
    from eqlosses_d2.evaluation import LVISEvaluator

    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_R18_FPN_synthetic.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", args.device, "MODEL.ROI_HEADS.NUM_CLASSES", str(args.classes),
                         "TEST.EQLOSSES.PROTOCOL", "fixed", "INPUT.MIN_SIZE_TEST", str(args.size),
                         "INPUT.MAX_SIZE_TEST", str(args.size)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    heads = model.roi_heads
    (num_dets,) = args.dets
    heads._forward_box = _stub_box_inference(num_dets, args.classes, seed=1)
    if args.one_call:
        heads.mask_inference_chunk = 0
    elif hasattr(heads, "mask_inference_chunk"):
        heads.mask_inference_chunk = args.chunk

    gt = _make_gt(args.images, args.classes, args.size)
    tmp = tempfile.mkdtemp()
    json_file = os.path.join(tmp, "gt.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    name = f"bench_fixed_ap_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=json_file, thing_classes=[c["name"] for c in gt["categories"]])
    evaluator = LVISEvaluator(name, tasks=("bbox", "segm"), distributed=False, max_dets_per_image=-1,
                              max_dets_per_category=args.k)
    evaluator.score_floor_consumers.append(heads)
    evaluator.reset()
    images = [{"image": torch.randint(0, 255, (3, args.size, args.size), dtype=torch.uint8),
               "height": args.size, "width": args.size, "image_id": img["id"]} for img in gt["images"]]
    with torch.no_grad():  # warm up with a few detections (allocator, imports)
        warm = _stub_box_inference(10, args.classes, seed=2)
        heads._forward_box, stub = warm, heads._forward_box
        model([images[0]])
        heads._forward_box = stub
    base = rss_mb()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        for image in images:
            evaluator.process([image], model([image]))
    if cuda:
        torch.cuda.synchronize()
    per_image = (time.perf_counter() - start) / len(images)
    gpu_peak = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20 if cuda else None
    peak_inference = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pools = evaluator._pools
    if hasattr(pools, "held"):
        held = sum(pools.held().values())
    else:  # the dict pools before CategoryPools
        held = sum(len(p) for p in pools.values())
    # bytes of the pools: what a copy of them allocates (tracemalloc would slow the loop)
    blob = pickle.dumps(pools, protocol=pickle.HIGHEST_PROTOCOL)
    tracemalloc.start()
    clone = pickle.loads(blob)
    pool_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del clone, blob
    start = time.perf_counter()
    results = evaluator.evaluate()
    evaluate_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "base_mb": base, "peak_inference_mb": peak_inference, "peak_mb": peak, "per_image_s": per_image,
        "evaluate_s": evaluate_s, "held": held, "bytes_per_held": pool_bytes / max(held, 1),
        "ap": results["segm"]["AP"], "gpu_peak_mb": gpu_peak, "chunk": getattr(heads, "mask_inference_chunk", None),
        "torch_threads": torch.get_num_threads(), "eqlosses_d2": os.path.dirname(eqlosses_d2.__file__),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dets", type=int, nargs="+", default=[300, 1000, 3000, 10000], help="detections per image")
    parser.add_argument("--images", type=int, default=3, help="images per run (--pools-only: try 500)")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (the pasted masks' size)")
    parser.add_argument("--k", type=int, default=10000, help="TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS")
    parser.add_argument("--chunk", type=int, default=300, help="mask_inference_chunk")
    parser.add_argument("--one-call", action="store_true", help="mask head on all detections at once")
    parser.add_argument("--code", help="import eqlosses_d2 from this checkout")
    parser.add_argument("--budget-gb", type=float, default=6.0,
                        help="skip one-call runs whose mask logits alone would pass this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (cuda: also the peak GPU memory)")
    parser.add_argument("--pools-only", action="store_true",
                        help="LVISEvaluator.process alone (no model) on --images images, to measure the pools")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.pools_only:
        main_pools(args)
        return
    label = f"code {args.code}" if args.code else "this checkout"
    print(f"\n### Fixed-AP inference, {label}{', mask head in one call' if args.one_call else ''}: "
          f"{args.images} images of {args.size} px, {args.classes} classes, K={args.k}, "
          f"{args.threads} thread(s), {args.device}\n")
    gpu = args.device == "cuda"
    print("| detections / image | peak RSS MB | rise over loaded MB | s / image | evaluate s | results held | "
          "bytes / held result |" + (" peak GPU MB over loaded |" if gpu else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for dets in args.dets:
        logits_gb = dets * args.classes * 28 * 28 * 4 / 2**30
        if (args.one_call or args.code) and logits_gb > args.budget_gb:
            print(f"| {dets} | skipped: one call needs {logits_gb:.1f} GB of mask logits | | | | | |", flush=True)
            continue
        r = _run_child(args, dets)
        if isinstance(r, str):
            print(f"| {dets} | {r} | | | | | |")
            continue
        print(f"| {dets} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | {r['per_image_s']:.2f} | "
              f"{r['evaluate_s']:.2f} | {r['held']} | {r['bytes_per_held']:.0f} |"
              + (f" {r['gpu_peak_mb']:.0f} |" if gpu else ""), flush=True)


def _run_child(args, dets):
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--dets", str(dets)]
    for key in ("images", "classes", "size", "k", "chunk", "threads", "device"):
        argv += [f"--{key}", str(getattr(args, key))]
    for flag in ("one_call", "pools_only"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.code:
        argv += ["--code", args.code]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return f"failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_pools(args):
    label = f"code {args.code}" if args.code else "this checkout"
    print(f"\n### Fixed-AP pools ({label}): LVISEvaluator.process on {args.images} images, {args.classes} classes "
          f"(long-tailed), {args.size} px masks, K={args.k}\n")
    print("| detections / image | results seen | held | largest class pool | pool MB | bytes / held result | "
          "peak RSS rise MB | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    for dets in args.dets:
        r = _run_child(args, dets)
        if isinstance(r, str):
            print(f"| {dets} | {r} | | | | | | |")
            continue
        print(f"| {dets} | {dets * args.images} | {r['held']} | {r['largest']} | {r['pool_mb']:.1f} | "
              f"{r['bytes_per_held']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | {r['per_image_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
