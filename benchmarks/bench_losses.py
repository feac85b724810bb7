#!/usr/bin/env python
"""
Speed of the classification losses and of a training iteration with each of them.

1. Loss forward+backward at N RoIs x C classes (default the LVIS scale, 8192 x 1203) against
   the plain counterpart on the same input: softmax CE (F.cross_entropy) for losses with a
   background logit, sigmoid BCE (F.binary_cross_entropy_with_logits) for the others.
   Target: <= 1.5x. Two label sets: an LVIS-like batch (16 images of 512 RoIs, each image
   holding a few classes drawn from the image counts; what the target is about) and
   labels uniform over all classes (about a thousand distinct classes in one batch, the
   worst case for methods with per-class work such as PCB's confusion matrix).
2. One training iteration of the quickstart Mask R-CNN with each loss against the softmax
   baseline (same data, same seed), in a process reusing freed memory, at the first of
   ``--threads``. Target: <= 1.05x.

    python benchmarks/bench_losses.py [--rois 8192] [--classes 1203] [--repeats 7] [--labels both]
        [--losses eql,iif] [--iters 0] [--threads 1,2] [--allocators both] [--load 0]

Prints Markdown tables; times are medians over repeats, interleaved so that machine
load affects all rows alike, with the spread (slowest / fastest repeat) of each row.

Settings: the loss table is measured in one fresh process per combination of

- memory allocator (``--allocators``): glibc's defaults, which hand every freed block above
  the mmap threshold back to the system, so each large temporary (an 8192 x 1203 float32
  matrix is 39 MB) costs page faults that can outweigh the arithmetic; and glibc told to
  keep and reuse freed memory (:mod:`reuse_memory`, as GPU caching allocators do). Users
  run the first; the second compares computation. Both are reported;
- intra-op threads (``--threads``, default 1 and 2).

``--load K`` runs K busy processes (one core each) beside the measurement, to reproduce a
loaded machine. What makes 2-thread numbers unstable: with as many threads as cores, every
parallel region of an op ends on a barrier that waits for its slowest thread, and a thread
that the scheduler preempts for another process (for a time slice of milliseconds) stalls
the region; a loss made of many short regions (the fused kernels walk 2 MB chunks: a few
hundred regions of well under a millisecond) loses a time slice many times per call, a
plain loss made of a few long ops only a few times. With 1 thread there is no barrier.
``--load 1 --threads 2`` shows it; the README's numbers are 1-thread.
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

from reuse_memory import REUSE_MEMORY  # noqa: E402  # (this script's directory)
from timing import CLOCKS, add_clock_argument, interleaved_samples  # noqa: E402

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eqlosses_d2  # noqa: E402,F401
from eqlosses_d2.data.class_stats import ClassStatistics  # noqa: E402
from eqlosses_d2.losses.equilibrium import instance_mean_scores  # noqa: E402
from eqlosses_d2.losses import LOSS_REGISTRY, build_loss, required_opts  # noqa: E402
from eqlosses_d2.modeling.class_stats import ClassStatsBuffers  # noqa: E402


def lvis_like_stats(num_classes, generator):
    """Image counts with LVIS v1's shape (a long tail from 1 to ~50k images)."""
    ranks = torch.arange(1, num_classes + 1, dtype=torch.float64)
    counts = (50000.0 / ranks**1.3).clamp(min=1).round().long()
    counts = counts[torch.randperm(num_classes, generator=generator)]
    frequency = ["r" if n <= 10 else "c" if n <= 100 else "f" for n in counts.tolist()]
    stats = ClassStatistics(
        category_ids=list(range(1, num_classes + 1)),
        class_names=[str(i) for i in range(num_classes)],
        image_count=counts.numpy(),
        instance_count=(counts * 3).numpy(),
        frequency=frequency,
        num_images=100170,
        num_images_with_annotations=99388,
    )
    return ClassStatsBuffers(num_classes).set_from(stats)


def image_batch_labels(num_rois, num_classes, stats, generator, images=16, fg_fraction=0.25, rois_per_instance=8):
    """
    Labels and matched-instance ids of the RoIs of a Detectron2 LVIS batch (16 images of
    512 RoIs at N = 8192): every image holds each class c independently with probability
    image_count_c / images (at least one class; a class's image frequency is then what
    the statistics say), a quarter of its RoIs are foreground, spread uniformly over its
    classes and matched ``rois_per_instance`` at a time to one instance; the rest are
    background (label C). Rows are in Detectron2's order: an image's foreground, then its
    background.
    """
    presence = (stats.image_count.double() / float(stats.num_images)).clamp(max=1.0)
    labels, instance_ids, next_id = [], [], 0
    for image in range(images):
        rois = num_rois // images + (num_rois % images if image == images - 1 else 0)
        present = torch.zeros(0, dtype=torch.long)
        while not present.numel():
            present = torch.nonzero(torch.rand(num_classes, generator=generator, dtype=torch.float64) < presence)[:, 0]
        num_fg = round(rois * fg_fraction)
        classes = present[torch.randint(0, present.numel(), (num_fg,), generator=generator)].sort().values
        ids = torch.empty(num_fg, dtype=torch.long)
        for c in present.tolist():
            rows = torch.nonzero(classes == c)[:, 0]
            ids[rows] = next_id + torch.arange(rows.numel()) // rois_per_instance
            next_id += -(-rows.numel() // rois_per_instance)
        labels += [classes, torch.full((rois - num_fg,), num_classes)]
        instance_ids += [ids, torch.full((rois - num_fg,), -1)]
    return torch.cat(labels), torch.cat(instance_ids)


def uniform_labels(num_rois, num_classes, generator, rois_per_instance=8):
    """The worst case for per-class work: a quarter of the RoIs foreground with labels
    uniform over all classes (about a thousand distinct classes in one batch, which no
    LVIS batch has), consecutive foreground RoIs matched ``rois_per_instance`` at a time."""
    labels = torch.randint(0, num_classes, (num_rois,), generator=generator)
    labels[torch.rand(num_rois, generator=generator) < 0.75] = num_classes
    fg_rows = torch.nonzero(labels < num_classes, as_tuple=True)[0]
    instance_ids = torch.full_like(labels, -1)
    instance_ids[fg_rows] = torch.arange(fg_rows.numel()) // rois_per_instance
    return labels, instance_ids


#: extra rows, each a loss with settings other than its defaults (measured whenever that loss is)
VARIANTS = {"balanced_softmax (FORM softmax)": ("balanced_softmax", {"form": "softmax"})}


def bench_losses(num_rois, num_classes, repeats, label_kind, losses, clock="wall"):
    g = torch.Generator().manual_seed(0)
    stats = lvis_like_stats(num_classes, g)
    if label_kind == "images":
        labels, instance_ids = image_batch_labels(num_rois, num_classes, stats, g)
    else:
        labels, instance_ids = uniform_labels(num_rois, num_classes, g)
    rows = []
    plain = {}
    for extra in (0, 1):
        logits = torch.randn(num_rois, num_classes + extra, generator=g)
        if extra:
            def run(logits=logits):
                x = logits.clone().requires_grad_()
                F.cross_entropy(x, labels).backward()
            plain["softmax CE"] = run
        else:
            target = torch.zeros(num_rois, num_classes + 1)
            target[torch.arange(num_rois), labels] = 1
            target = target[:, :num_classes]

            def run(logits=logits, target=target):
                x = logits.clone().requires_grad_()
                (F.binary_cross_entropy_with_logits(x, target, reduction="sum") / num_rois).backward()
            plain["sigmoid BCE"] = run
    for name in losses + [row for row, (base, _) in VARIANTS.items() if base in losses]:
        base, hparams = VARIANTS.get(name, (name, {}))
        loss = build_loss(base, num_classes, class_stats=stats, **hparams)
        logits = torch.randn(num_rois, loss.num_logits, generator=g)
        if name == "pcb":  # its active phase: past START and every class seen
            loss.instance_count.fill_(1.0)
            loss.confusion.copy_(torch.softmax(torch.randn(num_classes, num_classes, generator=g), dim=1))

        def run(loss=loss, logits=logits):
            x = logits.clone().requires_grad_()
            context = {"progress": 1.0}
            if getattr(loss, "needs_instance_scores", False):
                context["instance_labels"], context["instance_means"] = instance_mean_scores(
                    x, labels, instance_ids, num_classes)
            sum(loss(x, labels, **context).values()).backward()
        baseline = "softmax CE" if loss.family == "softmax" else "sigmoid BCE"
        rows.append((name, baseline, run))
    timed = list(plain.items()) + [(r[0], r[2]) for r in rows]
    samples = interleaved_samples(timed, repeats, clock)
    med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    spread = {k: max(v) / min(v) for k, v in samples.items()}
    memory = "freed memory reused" if os.environ.get("MALLOC_MMAP_THRESHOLD_") == REUSE_MEMORY[
        "MALLOC_MMAP_THRESHOLD_"] else "glibc defaults"
    fg = labels < num_classes
    batch = {"images": "LVIS-like batch of 16 images", "uniform": "uniform labels"}[label_kind]
    load = os.environ.get("EQLOSSES_BENCH_LOAD", "0")
    print(f"\n### Loss forward+backward, N={num_rois} RoIs x C={num_classes} classes, {batch} "
          f"({int(fg.sum())} foreground RoIs of {torch.unique(labels[fg]).numel()} classes; "
          f"CPU, {torch.get_num_threads()} threads, {memory}"
          f"{f', {load} busy processes beside' if load != '0' else ''}"
          f"{', thread CPU time' if clock == 'thread' else ''})\n")
    print("| loss | ms | spread | plain counterpart | ms | spread | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, baseline, _ in rows:
        print(f"| {name} | {med[name]:.1f} | {spread[name]:.2f} | {baseline} | {med[baseline]:.1f} | "
              f"{spread[baseline]:.2f} | {med[name] / med[baseline]:.2f}x |")


#: iteration-only rows named in ``--losses``: a method with its own quickstart config
#: (``configs/quickstart/<name>_mask_rcnn_R18_FPN_synthetic.yaml``, MODEL.WEIGHTS cleared: the
#: time of an iteration does not depend on the weights) and its row label. cRT and LWS train
#: only the classifier (their fine-tune); they are compared, as every row, with the softmax
#: iteration on the same batches: the full training they replace for their stage 2.
METHOD_ROWS = {
    "tde": "tde classifier (softmax)",
    "vmf": "vmf classifier (balanced softmax)",
    "crt": "crt fine-tune (cls_score only)",
    "lws": "lws fine-tune (scales only)",
}


def bench_iterations(iters, repeats, losses, clock="wall"):
    import train_net  # noqa: F401  (registration, Trainer)
    from detectron2.config import get_cfg
    from detectron2.engine import SimpleTrainer
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage
    from eqlosses_d2 import add_eqlosses_config
    from eqlosses_d2.data import prepare_dataset

    prepare_dataset("synthetic_lvis_v1_train")
    quickstart = os.path.join(os.path.dirname(train_net.__file__), "configs", "quickstart")
    baseline = os.path.join(quickstart, "mask_rcnn_R18_FPN_synthetic.yaml")
    # (row, config, opts): every loss in the standard head (with what it needs, e.g. CDB-S's sampler
    # name: the batches are the baseline's either way), plus the methods with a head of their own
    rows = [("softmax", baseline, [])] + [(n, baseline, ["MODEL.EQLOSSES.LOSS", n] + required_opts(n))
                                          for n in losses if n != "softmax" and n in LOSS_REGISTRY]
    own_heads = {"pcb": ("pcb + iterative head", "LongTailIterativeROIHeads"),
                 "equilibrium": ("loce (equilibrium + MFS)", "LongTailLOCEROIHeads")}
    for name, (label, head) in own_heads.items():
        if name in losses:
            rows.append((label, baseline, ["MODEL.EQLOSSES.LOSS", name, "MODEL.ROI_HEADS.NAME", head]))
    for name, label in METHOD_ROWS.items():
        if name in losses:
            rows.append((label, os.path.join(quickstart, f"{name}_mask_rcnn_R18_FPN_synthetic.yaml"),
                         ["MODEL.WEIGHTS", ""]))
    names = [row[0] for row in rows]
    trainers = {}
    batches = None
    for name, config_file, opts in rows:
        cfg = get_cfg()
        add_eqlosses_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
        cfg.MODEL.DEVICE = "cpu"
        cfg.DATALOADER.NUM_WORKERS = 0
        torch.manual_seed(0)
        model = train_net.Trainer.build_model(cfg)
        if batches is None:
            loader = iter(train_net.Trainer.build_train_loader(cfg))
            batches = [next(loader) for _ in range(iters)]
        optimizer = build_optimizer(cfg, model)
        trainer = SimpleTrainer(model, iter(batches * (repeats + 2)), optimizer)
        start_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
        trainers[name] = (trainer, start_state)
    # Every repeat restarts each row from its initial weights, optimizer and method state, with
    # the same random seed, so every loss runs the same iterations on the same data and the
    # same proposals (a model that had trained on would sample different foreground RoIs,
    # which changes the mask head's work, not the loss's). Repeats are interleaved across
    # losses so that machine load affects all rows alike.
    samples = {name: [] for name in names}
    with EventStorage(0):
        for repeat in range(repeats + 1):  # the first round warms up
            for name, (trainer, (model_state, optimizer_state)) in trainers.items():
                trainer.model.load_state_dict(model_state)
                trainer.optimizer.load_state_dict(optimizer_state)
                trainer.iter = 0
                torch.manual_seed(repeat)
                start = CLOCKS[clock]()
                for _ in range(iters):
                    trainer.run_step()
                if repeat:
                    samples[name].append((CLOCKS[clock]() - start) / iters)
    results = {name: statistics.median(times) for name, times in samples.items()}
    base = results["softmax"]
    print(f"\n### One training iteration, quickstart Mask R-CNN R-18-FPN, batch {cfg.SOLVER.IMS_PER_BATCH}, 128 px (CPU"
          f"{', thread CPU time' if clock == 'thread' else ''})\n")
    print("| loss | s / iteration | vs softmax |")
    print("|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t:.3f} | {t / base:.3f}x |")


def print_memory_table():
    """LOCE's feature queues at LVIS v1 size (exact: slots × 256×7×7 × element size)."""
    from eqlosses_d2.modeling.memory import FeatureMemory

    print("\n### LOCE feature memory (per process), LVIS v1: 1203 classes x 80 slots x 256x7x7\n")
    print("| storage | bytes | GiB |")
    print("|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        size = FeatureMemory(1203, 80, storage_dtype=dtype).nbytes()
        print(f"| {str(dtype).replace('torch.', '')} | {size} | {size / 2**30:.2f} |")


def _busy():
    while True:
        pass


def run_settings(args):
    """The loss tables in one fresh process per (allocator, threads) setting."""
    import multiprocessing

    busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for process in busy:
        process.start()
    try:
        allocators = ("default", "reuse") if args.allocators == "both" else (args.allocators,)
        for allocator in allocators:
            for threads in [int(t) for t in args.threads.split(",")]:
                env = {k: v for k, v in os.environ.items() if k not in REUSE_MEMORY}
                if allocator == "reuse":
                    env.update(REUSE_MEMORY)
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           EQLOSSES_BENCH_LOAD=str(args.load))
                subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "losses"] + sys.argv[1:],
                               env=env, check=True)
        if args.iters:
            threads = args.threads.split(",")[0]
            env = {**os.environ, **REUSE_MEMORY, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "iterations"] + sys.argv[1:],
                           env=env, check=True)
    finally:
        for process in busy:
            process.terminate()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rois", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--labels", choices=("images", "uniform", "both"), default="both",
                        help="RoI labels: an LVIS-like batch of 16 images, uniform over all classes, or both")
    parser.add_argument("--losses", default="", help="comma-separated loss names (default: every registered loss)")
    parser.add_argument("--iters", type=int, default=0, help="training iterations per repeat (0: skip)")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts, one process each")
    parser.add_argument("--allocators", choices=("both", "default", "reuse"), default="both",
                        help="glibc's defaults, glibc reusing freed memory, or both (one process each)")
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside the measurement")
    parser.add_argument("--system-malloc", action="store_true", help="the same as --allocators default")
    add_clock_argument(parser)
    parser.add_argument("--child", choices=("losses", "iterations"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "thread" and set(args.threads.split(",")) != {"1"}:
        parser.error(f"--clock thread: --threads must be 1 (got {args.threads}): other threads' work is not counted")
    if args.system_malloc:
        args.allocators = "default"
    losses = sorted(dict(LOSS_REGISTRY))
    if args.losses:
        losses = [name.strip() for name in args.losses.split(",") if name.strip()]
        known = sorted(dict(LOSS_REGISTRY)) + list(METHOD_ROWS)
        unknown = [name for name in losses if name not in known]
        if unknown:
            parser.error(f"--losses: unknown loss {', '.join(unknown)} (known: {', '.join(known)})")
    if args.child is None:
        run_settings(args)
        print_memory_table()
        return
    if args.child == "iterations":
        bench_iterations(args.iters, args.repeats, losses, args.clock)
        return
    losses = [name for name in losses if name in LOSS_REGISTRY]  # the classifiers and fine-tunes: iterations only
    for label_kind in ("images", "uniform") if args.labels == "both" else (args.labels,):
        bench_losses(args.rois, args.classes, args.repeats, label_kind, losses, args.clock)


if __name__ == "__main__":
    main()
