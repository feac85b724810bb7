#!/usr/bin/env python
"""
Speed of the one-stage classification losses: forward+backward at N anchors x C classes
(default a LVIS-sized problem, 100k anchors x 1203 classes, 1% positives) against plain
focal loss, ``fvcore.nn.sigmoid_focal_loss`` summed through autograd, on the same input.
Rows: fvcore's focal loss, ours ("focal", the fused analytic computation) and EFL (the
same computation with per-class focusing factors and weights, plus the gradient
statistics and their update). Target: EFL <= 1.5x the plain focal loss.

    python benchmarks/bench_one_stage.py [--anchors 100000] [--classes 1203] [--repeats 5]

Prints a Markdown table; times are medians over repeats, interleaved so that machine load
affects all rows alike. As benchmarks/bench_losses.py, it re-runs itself with glibc told to
keep and reuse freed memory (``--system-malloc``: glibc's defaults).
"""
import argparse
import os
import sys

from reuse_memory import reexec_reusing_freed_memory  # noqa: E402  # (this script's directory)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--anchors", type=int, default=100000)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--positives", type=float, default=0.01, help="fraction of positive anchors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default memory handling")
    args = parser.parse_args()

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
