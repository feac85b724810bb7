#!/usr/bin/env python
"""
Speed of the one-stage classification losses: forward+backward at N anchors x C classes
(default a LVIS-sized problem, 100k anchors x 1203 classes, 1% positives) against plain
focal loss, ``fvcore.nn.sigmoid_focal_loss`` summed through autograd, on the same input.
Rows: fvcore's focal loss, ours ("focal", the fused analytic computation) and EFL (the
same computation with per-class focusing factors and weights, plus the gradient
statistics and their update). Target: EFL <= 1.5x the plain focal loss.

    python benchmarks/bench_one_stage.py [--anchors 100000] [--classes 1203] [--repeats 5]
        [--memory-only] [--no-memory]

Prints a Markdown table; times are medians over repeats, interleaved so that machine load
affects all rows alike. As benchmarks/bench_losses.py, it re-runs itself with glibc told to
keep and reuse freed memory (``--system-malloc``: glibc's defaults).

Peak memory: each row's forward+backward runs once more in a fresh process whose every
allocation above 64 KB is its own mapping, returned on free (``MALLOC_MMAP_THRESHOLD_``), so
the resident set follows the live tensors; the peak extra memory is the resident high-water
mark during the call (reset through ``/proc/self/clear_refs``) minus the resident size
before it, the inputs (logits, labels, the leaf copy) already allocated; it includes the
gradient the call leaves in the leaf. It is printed next to the size of one float32 copy of
the logits, under the CPU policy and under the GPU policy forced on the CPU
(``EQLOSSES_DEVICE_POLICY=gpu``: the chunks a GPU run uses). Linux only.
"""
import argparse
import os
import subprocess
import sys

from reuse_memory import reexec_reusing_freed_memory  # noqa: E402  # (this script's directory)
from proc_memory import status_kb  # noqa: E402
from timing import interleaved_medians  # noqa: E402

if __name__ == "__main__":
    reexec_reusing_freed_memory()  # before torch allocates anything

import torch
from fvcore.nn import sigmoid_focal_loss

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eqlosses_d2.losses.efl import EqualizedFocalLoss  # noqa: E402
from eqlosses_d2.losses.focal import SigmoidFocalLoss  # noqa: E402


def make_problem(num_anchors, num_classes, positive_fraction, generator):
    logits = torch.randn(num_anchors, num_classes, generator=generator) * 2.0 - 4.0
    labels = torch.full((num_anchors,), num_classes, dtype=torch.long)
    positive = torch.rand(num_anchors, generator=generator) < positive_fraction
    labels[positive] = torch.randint(0, num_classes, (int(positive.sum()),), generator=generator)
    return logits, labels


PEAK_ROWS = {
    "fvcore": "focal loss (fvcore.nn.sigmoid_focal_loss, autograd)",
    "focal": "focal loss (ours, fused analytic)",
    "efl": "EFL (ours, fused analytic + gradient statistics)",
}


def measure_peak(args):
    """(Child process) one forward+backward of a row; prints the peak extra resident bytes."""
    generator = torch.Generator().manual_seed(0)
    logits, labels = make_problem(args.anchors, args.classes, args.positives, generator)
    normalizer = max(1.0, float((labels < args.classes).sum()))
    row = args.measure_peak
    if row == "fvcore":
        target = torch.zeros(args.anchors, args.classes)
        positive = labels < args.classes
        target[positive.nonzero().squeeze(1), labels[positive]] = 1.0
    else:
        module = EqualizedFocalLoss(args.classes) if row == "efl" else SigmoidFocalLoss(args.classes)
        if row == "efl":  # statistics, so that the factors differ per class
            module.gradient_stats.pos_grad.uniform_(0.0, 1.0, generator=generator)
            module.gradient_stats.neg_grad.uniform_(0.5, 1.5, generator=generator)
    leaf = logits.clone().requires_grad_(True)
    del logits
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark to the current resident size
    before = status_kb("VmRSS")
    if row == "fvcore":
        (sigmoid_focal_loss(leaf, target, alpha=0.25, gamma=2.0, reduction="sum") / normalizer).backward()
    else:
        module(leaf, labels, normalizer=normalizer)["loss_cls"].backward()
    peak = status_kb("VmHWM")
    assert leaf.grad is not None
    print((peak - before) * 1024)


def print_peak_memory_table(args):
    copy = args.anchors * args.classes * 4
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10), "MALLOC_TRIM_THRESHOLD_": "0",
           "MALLOC_TOP_PAD_": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    print(f"\nPeak extra memory of one forward+backward, {args.anchors} anchors x {args.classes} classes "
          f"(one float32 copy of the logits: {copy / 2**20:.0f} MB); resident high-water mark, CPU\n")
    print("| loss | policy | peak extra (MB) | copies of the logits |")
    print("|---|---|---:|---:|")
    for row, name in PEAK_ROWS.items():
        for policy in ("auto", "gpu"):
            if row == "fvcore" and policy == "gpu":
                continue  # no policy: plain autograd
            command = [sys.executable, os.path.abspath(__file__), "--system-malloc", "--measure-peak", row,
                       "--anchors", str(args.anchors), "--classes", str(args.classes),
                       "--positives", str(args.positives)]
            result = subprocess.run(command, env={**env, "EQLOSSES_DEVICE_POLICY": policy}, capture_output=True,
                                    text=True)
            if result.returncode:
                raise RuntimeError(f"peak-memory child for '{row}' failed:\n{result.stderr[-2000:]}")
            extra = int(result.stdout.strip().splitlines()[-1])
            label = "CPU (cache-sized chunks)" if policy == "auto" else "GPU, forced (bounded chunks)"
            print(f"| {name} | {'-' if row == 'fvcore' else label} | {extra / 2**20:.0f} | {extra / copy:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--anchors", type=int, default=100000)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--positives", type=float, default=0.01, help="fraction of positive anchors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default memory handling")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    parser.add_argument("--no-memory", action="store_true", help="only the timing table")
    parser.add_argument("--measure-peak", default="", help=argparse.SUPPRESS)  # (the child process)
    args = parser.parse_args()
    if args.measure_peak:
        return measure_peak(args)
    if not args.no_memory:
        print_peak_memory_table(args)
    if args.memory_only:
        return

    generator = torch.Generator().manual_seed(0)
    logits, labels = make_problem(args.anchors, args.classes, args.positives, generator)
    normalizer = max(1.0, float((labels < args.classes).sum()))
    target = torch.zeros(args.anchors, args.classes)
    positive = labels < args.classes
    target[positive.nonzero().squeeze(1), labels[positive]] = 1.0

    efl = EqualizedFocalLoss(args.classes)
    efl(logits, labels, normalizer=normalizer)  # statistics, so that the factors differ per class
    focal = SigmoidFocalLoss(args.classes)

    def fvcore_row():
        leaf = logits.clone().requires_grad_(True)
        (sigmoid_focal_loss(leaf, target, alpha=0.25, gamma=2.0, reduction="sum") / normalizer).backward()

    def module_row(module):
        def run():
            leaf = logits.clone().requires_grad_(True)
            module(leaf, labels, normalizer=normalizer)["loss_cls"].backward()
        return run

    rows = [
        ("focal loss (fvcore.nn.sigmoid_focal_loss, autograd)", fvcore_row),
        ("focal loss (ours, fused analytic)", module_row(focal)),
        ("EFL (ours, fused analytic + gradient statistics)", module_row(efl)),
    ]
    medians = interleaved_medians(rows, args.repeats)
    base = medians[rows[0][0]]
    print(f"\nOne-stage classification loss, forward+backward, {args.anchors} anchors x {args.classes} classes, "
          f"{args.positives:.0%} positives, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| loss | time (ms) | vs fvcore focal |")
    print("|---|---:|---:|")
    for name, _ in rows:
        print(f"| {name} | {medians[name] * 1000:.0f} | {medians[name] / base:.2f}x |")
    efl_vs_ours = medians[rows[2][0]] / medians[rows[1][0]]
    print(f"\nEFL vs our focal loss: {efl_vs_ours:.2f}x")


if __name__ == "__main__":
    main()
