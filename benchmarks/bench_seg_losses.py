#!/usr/bin/env python
"""
Speed and memory of the per-pixel losses (``MODEL.EQLOSSES.SEM_SEG.LOSS``): forward+backward on
(N, C, H, W) logits at full label resolution (default 2 x 150 x 128 x 128, a CPU-sized ADE20K
batch) with 10% of the pixels ignored (label 255), against plain
``F.cross_entropy(logits, targets, ignore_index=255)`` on the same logits (Detectron2's
``SemSegFPNHead`` loss). Labels are drawn per pixel from a long-tailed (exponential, imbalance
100) class distribution, and the losses' class statistics (pixel and image counts) follow it.
Each loss is in training mode, so stateful losses (Softmax-EQL's gradient statistics, Seesaw's
pixel counts) run their updates too. Target: <= 1.5x plain CE.

    python benchmarks/bench_seg_losses.py [--shape 2,150,128,128] [--repeats 51] [--losses a,b]
        [--memory-shape 4,150,256,256 | --memory-shape none] [--system-malloc]

Time: medians over interleaved repeats, each loss in turns with plain CE (machine load affects
both alike), one process, torch's default threads unless ``OMP_NUM_THREADS`` says otherwise, with
glibc told to reuse freed memory (as ``bench_cls_losses.py``; page faults on large temporaries
otherwise dominate and vary from run to run).

Memory (``--memory-shape``): each loss's first forward+backward in a fresh process with glibc's
default allocator (large blocks mapped and unmapped, so the resident set follows what is in use):
the peak resident memory during the call above the resident memory before it (the logits, the
labels and the loss already there), from ``/proc/self/status`` (VmHWM, reset through
``/proc/self/clear_refs``), in MB and in copies of the logits. The gradient the loss hands to
autograd (one copy, ``logits.grad``) is part of it for every row.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from reuse_memory import REUSE_MEMORY, reexec_reusing_freed_memory  # noqa: E402  # (this script's directory)
from timing import interleaved_samples  # noqa: E402

if __name__ == "__main__" and "--measure-memory" not in sys.argv:
    reexec_reusing_freed_memory()  # before torch allocates anything (as bench_cls_losses.py)

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eqlosses_d2  # noqa: E402,F401  # registration
from eqlosses_d2.registry import names  # noqa: E402
from eqlosses_d2.segmentation.losses import PIXEL_LOSS_REGISTRY  # noqa: E402

from proc_memory import status_kb  # noqa: E402

IGNORE = 255
PLAIN = "F.cross_entropy"


class _Stats:
    """The class statistics a pixel loss reads (the model's SemSegClassStatsBuffers)."""

    def __init__(self, frequency, num_images=20210):
        self.pixel_count = (frequency * 1e9).round().long().clamp(min=1)
        self.image_count = (frequency / frequency.max() * num_images).round().long().clamp(min=1)
        self.instance_count = self.pixel_count
        self.num_images = torch.tensor(num_images)
        self.num_images_with_annotations = self.num_images
        self.is_set = torch.tensor(True)


def make_batch(shape, seed=0, ignored=0.1, imbalance=100.0):
    """Logits (N, C, H, W) ~ N(0, 1), long-tailed labels (N, H, W) with a fraction ``ignored`` at 255,
    and class statistics of the same distribution."""
    num_images, num_classes, height, width = shape
    g = torch.Generator().manual_seed(seed)
    frequency = imbalance ** (-torch.arange(num_classes, dtype=torch.float64) / max(1, num_classes - 1))
    frequency /= frequency.sum()
    targets = torch.multinomial(frequency.float(), num_images * height * width, replacement=True, generator=g)
    targets = targets.view(num_images, height, width)
    targets[torch.rand(num_images, height, width, generator=g) < ignored] = IGNORE
    logits = torch.randn(num_images, num_classes, height, width, generator=g)
    return logits, targets, _Stats(frequency)


def build(name, num_classes, stats):
    return PIXEL_LOSS_REGISTRY.get(name)(num_classes, class_stats=stats).train()


def step(name, loss, logits, targets):
    x = logits.clone().requires_grad_()
    if name == PLAIN:
        F.cross_entropy(x, targets, ignore_index=IGNORE).backward()
    else:
        loss(x, targets)["loss_sem_seg"].backward()
    return x


def measure_memory(names_, shape):
    """In this (fresh) process: for each name in turn, the peak resident memory of its first
    forward+backward above what was resident before it, in bytes ({name: bytes}). The logits-sized
    blocks are mapped and unmapped by glibc's default allocator (above its mmap threshold), so one
    loss's freed buffers do not hide the next one's."""
    logits, targets, stats = make_batch(shape)
    out = {}
    for name in names_:
        loss = None if name == PLAIN else build(name, shape[1], stats)
        x = logits.clone().requires_grad_()
        before = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
            f.write("5")
        if name == PLAIN:
            F.cross_entropy(x, targets, ignore_index=IGNORE).backward()
        else:
            loss(x, targets)["loss_sem_seg"].backward()
        out[name] = (status_kb("VmHWM") - before) * 1024
        del x, loss
    return out


def memory_in_subprocess(names_, shape):
    """:func:`measure_memory` in a fresh process with glibc's default allocator."""
    env = {k: v for k, v in os.environ.items() if k not in REUSE_MEMORY}
    command = [sys.executable, os.path.abspath(__file__), "--measure-memory", ",".join(names_),
               "--memory-shape", ",".join(map(str, shape))]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _shape(text):
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) != 4:
        raise SystemExit(f"--shape / --memory-shape: N,C,H,W expected, got '{text}'")
    return shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--shape", default="2,150,128,128", help="N,C,H,W of the timed batch")
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--losses", default="", help="comma-separated registry names (default: all)")
    parser.add_argument("--memory-shape", default="4,150,256,256", help="N,C,H,W of the memory column, or 'none'")
    parser.add_argument("--measure-memory", default="", help=argparse.SUPPRESS)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default memory handling")
    args = parser.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory.split(","), _shape(args.memory_shape))))
        return
    shape = _shape(args.shape)
    logits, targets, stats = make_batch(shape)
    losses = args.losses.split(",") if args.losses else names(PIXEL_LOSS_REGISTRY)

    def plain():
        step(PLAIN, None, logits, targets)

    table = []
    for name in losses:
        loss = build(name, shape[1], stats)
        def run(loss=loss, name=name):
            step(name, loss, logits, targets)

        samples = interleaved_samples([("ce", plain), (name, run)], args.repeats)
        ce, ms = (statistics.median(samples[k]) * 1000 for k in ("ce", name))
        table.append((name, ms, ce))

    memory = {}
    if args.memory_shape != "none":
        memory_shape = _shape(args.memory_shape)
        copy_bytes = 4 * memory_shape[0] * memory_shape[1] * memory_shape[2] * memory_shape[3]
        for name in [PLAIN] + losses:  # one process each: every row measures a first call
            extra = memory_in_subprocess([name], memory_shape)[name]
            memory[name] = (extra / 2 ** 20, extra / copy_bytes)

    n, c, h, w = shape
    print(f"\n### Per-pixel losses, forward+backward, {n} x {c} x {h} x {w} logits, 10% of the pixels ignored "
          f"(CPU, {torch.get_num_threads()} thread(s), median of {args.repeats}, each loss in turns with plain CE)\n")
    if memory:
        mn, mc, mh, mw = memory_shape
        print(f"Peak memory above the inputs during the first forward+backward at {mn} x {mc} x {mh} x {mw} "
              f"({copy_bytes / 2 ** 20:.0f} MB per float32 copy of the logits; the gradient is one copy), "
              f"each in a fresh process with glibc's default allocator.\n")
        print("| loss | ms | plain CE ms (same rounds) | vs plain CE | peak extra MB | in logit copies |")
        print("|---|---|---|---|---|---|")
        mb, copies = memory[PLAIN]
        print(f"| {PLAIN}(ignore_index=255) | | | 1.00x | {mb:.0f} | {copies:.2f} |")
    else:
        print("| loss | ms | plain CE ms (same rounds) | vs plain CE |")
        print("|---|---|---|---|")
    for name, ms, ce in table:
        row = f"| {name} | {ms:.2f} | {ce:.2f} | {ms / ce:.2f}x |"
        if memory:
            mb, copies = memory[name]
            row += f" {mb:.0f} | {copies:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
