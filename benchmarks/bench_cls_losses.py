#!/usr/bin/env python
"""
Speed of the image-classification losses (``MODEL.EQLOSSES.CLASSIFICATION.LOSS``):
forward+backward at a batch of N images x C classes (default 512 x 1000, ImageNet-LT's
size) against plain ``F.cross_entropy`` on the same logits, with labels drawn from a
long-tailed (exponential, imbalance 100) class distribution and the matching per-class
counts in the loss's class statistics. Each loss is in training mode, so stateful losses
(Softmax-EQL's gradient statistics) run their update too. Target: <= 1.5x plain CE.

    python benchmarks/bench_cls_losses.py [--batch 512] [--classes 1000] [--repeats 301] [--losses a,b] [--system-malloc]

Times are medians over interleaved repeats, each loss in turns with plain CE (machine load
affects both alike; one loss's working set does not cool the caches of the next), one
process, torch's default threads unless ``OMP_NUM_THREADS`` says otherwise, with glibc told
to reuse freed memory as in ``bench_losses.py`` (page faults on the 2 MB temporaries otherwise
dominate sub-millisecond calls and make them bimodal). Prints a Markdown table.
"""
import argparse
import os
import statistics
import sys

from reuse_memory import reexec_reusing_freed_memory  # noqa: E402  # (this script's directory)
from timing import add_clock_argument, interleaved_samples  # noqa: E402

if __name__ == "__main__":
    reexec_reusing_freed_memory()  # before torch allocates anything (as bench_losses.py)

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eqlosses_d2  # noqa: E402,F401  # registration
from eqlosses_d2.classification.losses import IMAGE_CLS_LOSS_REGISTRY  # noqa: E402
from eqlosses_d2.registry import names  # noqa: E402


class _Counts:
    """The class statistics a classification loss reads (per-class training image counts)."""

    def __init__(self, image_count):
        self.image_count = image_count
        self.instance_count = image_count


def long_tailed(num_classes, imbalance=100.0, head=1000):
    counts = head * imbalance ** (-torch.arange(num_classes, dtype=torch.float64) / max(1, num_classes - 1))
    return counts.round().clamp(min=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=301)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default memory handling")
    parser.add_argument("--losses", default="",
                        help="comma-separated registry names, plain_bce for PyTorch's BCE (default: all and plain_bce)")
    add_clock_argument(parser)
    args = parser.parse_args()
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error(f"--clock thread needs one intra-op thread (OMP_NUM_THREADS=1); this process has "
                     f"{torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    counts = long_tailed(args.classes)
    labels = torch.multinomial(counts.float(), args.batch, replacement=True, generator=g)
    logits = torch.randn(args.batch, args.classes, generator=g)
    stats = _Counts(counts.float())

    def plain():
        x = logits.clone().requires_grad_()
        F.cross_entropy(x, labels).backward()

    # Each loss is timed in turns with plain CE only (its own interleaved rounds): a loss with a
    # large working set (Difficulty-Net's MLP and Adam state, ~50 MB) would otherwise evict the
    # caches before whichever loss runs after it in a round, and slow that one by ~20%.
    table = []
    for name in (args.losses.split(",") if args.losses else names(IMAGE_CLS_LOSS_REGISTRY)):
        if name == "plain_bce":
            continue
        cls = IMAGE_CLS_LOSS_REGISTRY.get(name)
        loss = cls(args.classes, class_stats=stats).train()

        def run(loss=loss):
            x = logits.clone().requires_grad_()
            sum(loss(x, labels).values()).backward()
        samples = interleaved_samples([("ce", plain), (name, run)], args.repeats, args.clock)
        ce, ms = (statistics.median(samples[k]) * 1000 for k in ("ce", name))
        table.append((name, ms, ce))
    if not args.losses or "plain_bce" in args.losses.split(","):
        # the reference of the sigmoid losses: PyTorch's own BCE with logits on one-hot targets
        targets = F.one_hot(labels, args.classes).float()

        def plain_bce():
            x = logits.clone().requires_grad_()
            F.binary_cross_entropy_with_logits(x, targets, reduction="sum").div(args.batch).backward()

        samples = interleaved_samples([("ce", plain), ("bce", plain_bce)], args.repeats, args.clock)
        ce, ms = (statistics.median(samples[k]) * 1000 for k in ("ce", "bce"))
        table.append(("(reference) F.binary_cross_entropy_with_logits", ms, ce))
    print(f"\n### Image-classification losses, forward+backward, {args.batch} x {args.classes} "
          f"(CPU, {torch.get_num_threads()} thread(s), median of {args.repeats}, each loss in turns with plain CE"
          f"{', thread CPU time' if args.clock == 'thread' else ''})\n")
    print("| loss | ms | plain CE ms (same rounds) | vs plain CE |")
    print("|---|---|---|---|")
    for name, ms, ce in table:
        print(f"| {name} | {ms:.3f} | {ce:.3f} | {ms / ce:.2f}x |")

if __name__ == "__main__":
    main()
