#!/usr/bin/env python
"""
Inference time with post-hoc calibration against without (target: ≤ 1.02x), on the
quickstart Mask R-CNN (embedded synthetic val images, CPU, one image per forward).

    python benchmarks/bench_calibration.py [--weights output/train_methods/standard/softmax/model_final.pth]
                                           [--images 40] [--repeats 5] [--alone-only]

Every setting runs the same images through ``model(...)`` (backbone, RPN, box head,
calibration, NMS, mask head); repeats are interleaved across settings so that machine
load affects all rows alike. The score threshold is set to 0 so that every setting
keeps 300 detections per image (the LVIS budget) and the mask head does the same work;
the table shows the counts. Two more tables time the calibration alone at LVIS size
(1,000 and 8,192 proposals × 1,204 scores) against the softmax alone and against the
NorCal authors' computation of the same scores (``--alone-only``: just these).
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eqlosses_d2  # noqa: E402,F401  # compat shims before any detectron2.data import

SETTINGS = {
    "none": [],
    "norcal (exps, γ 0.5)": ["METHOD", "norcal", "GAMMA", "0.5"],
    "norcal (logits, γ 0.5)": ["METHOD", "norcal", "GAMMA", "0.5", "VARIANT", "logits"],
    "iif (raw)": ["METHOD", "iif"],
    "tau_norm (τ 1)": ["METHOD", "tau_norm", "TAU", "1.0"],
}


def build(weights, setting):
    import train_net
    from detectron2.config import get_cfg
    from eqlosses_d2 import add_eqlosses_config
    from eqlosses_d2.checkpoint import AtomicCheckpointer

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_R18_FPN_synthetic.yaml"))
    # score threshold 0: every setting keeps its top 300 detections per image, so the mask
    # head does the same work whatever the calibration
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"] + sum(
        (["TEST.EQLOSSES.CALIBRATION." + k, v] for k, v in zip(setting[::2], setting[1::2])), []))
    torch.manual_seed(0)
    model = train_net.Trainer.build_model(cfg, with_class_stats=not weights)
    if weights:
        AtomicCheckpointer(model).load(weights, checkpointables=[])
    return cfg, model.eval()


def bench_models(weights, num_images, repeats):
    from detectron2.data import build_detection_test_loader
    from eqlosses_d2.data import prepare_dataset

    prepare_dataset("synthetic_lvis_v1_val")
    models = {name: build(weights, setting) for name, setting in SETTINGS.items()}
    cfg = next(iter(models.values()))[0]
    loader = build_detection_test_loader(cfg, "synthetic_lvis_v1_val")
    inputs = [batch for _, batch in zip(range(num_images), loader)]
    samples = {name: [] for name in models}
    detections = {}
    with torch.no_grad():
        for name, (_, model) in models.items():
            detections[name] = sum(len(model(batch)[0]["instances"]) for batch in inputs)  # warm up
        for _ in range(repeats):
            for name, (_, model) in models.items():
                start = time.perf_counter()
                for batch in inputs:
                    model(batch)
                samples[name].append((time.perf_counter() - start) / len(inputs))
    base = statistics.median(samples["none"])
    print(f"\n### Inference, quickstart Mask R-CNN R-18-FPN, {len(inputs)} synthetic val images, "
          f"{torch.get_num_threads()} CPU threads ({'trained' if weights else 'random'} weights)\n")
    print("| calibration | ms / image | vs none | detections |")
    print("|---|---|---|---|")
    for name, times in samples.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1000:.1f} | {t / base:.3f}x | {detections[name]} |")


def _authors_norcal(logits, factors):
    """Reference: the NorCal authors' computation of the default setting (exp of the
    logits, foreground columns times f_c in place, rows renormalized in place; no max
    shift), re-stated here as a formula to time against."""
    probs = torch.exp(logits)
    probs[:, :-1] *= factors
    probs /= probs.sum(dim=1, keepdim=True)
    return probs


def bench_alone(repeats, rows_list=(1000, 8192)):
    from types import SimpleNamespace

    from eqlosses_d2.calibration import ScoreCalibration, norcal_factors
    from eqlosses_d2.losses import build_loss

    num_classes = 1203
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 10000, (num_classes,), generator=g)
    stats = SimpleNamespace(image_count=counts, instance_count=counts * 3, num_images=torch.tensor(100170),
                            num_images_with_annotations=torch.tensor(99388), is_set=torch.tensor(True))
    loss = build_loss("softmax", num_classes, class_stats=stats)
    layer = torch.nn.Linear(1024, num_classes + 1)
    authors_factors = norcal_factors(counts, 0.5).float()
    for rows in rows_list:
        logits = torch.randn(rows, num_classes + 1, generator=g)
        functions = {"softmax alone": lambda: loss.predict_probs(logits),
                     "authors' NorCal (exps, γ 0.5)": lambda: _authors_norcal(logits, authors_factors)}
        for name, setting in SETTINGS.items():
            if name == "none":
                continue
            kwargs = {k.lower(): (float(v) if k in ("GAMMA", "TAU") else v)
                      for k, v in zip(setting[::2], setting[1::2])}
            calibration = ScoreCalibration(**kwargs)
            functions[name] = (lambda c: lambda: c.probs_from_logits(logits, loss, classifier=layer))(calibration)
        times = {name: [] for name in functions}
        for _ in range(repeats * 4):  # interleaved, so that machine load affects all rows alike
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
        print(f"\n### Calibration alone, {rows} proposals x {num_classes + 1} scores "
              f"(CPU, {torch.get_num_threads()} threads, median of {repeats * 4})\n")
        print("| calibration | ms | vs softmax alone | vs authors' NorCal |")
        print("|---|---|---|---|")
        base = statistics.median(times["softmax alone"])
        authors = statistics.median(times["authors' NorCal (exps, γ 0.5)"])
        for name, samples in times.items():
            t = statistics.median(samples)
            print(f"| {name} | {t * 1000:.2f} | {t / base:.2f}x | {t / authors:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    default = os.path.join(ROOT, "output", "train_methods", "standard", "softmax", "model_final.pth")
    parser.add_argument("--weights", default=default if os.path.isfile(default) else "")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alone-only", action="store_true", help="only the calibration-alone tables")
    args = parser.parse_args()
    if not args.alone_only:
        bench_models(args.weights, args.images, args.repeats)
    bench_alone(args.repeats)


if __name__ == "__main__":
    main()
