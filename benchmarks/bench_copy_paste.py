#!/usr/bin/env python
"""
Throughput of the training data pipeline with and without copy-paste, on the embedded
synthetic training split (900 images of 128 px): the train loader exactly as training
builds it (``build_resumable_train_loader``: sampler, mapper, aspect-ratio batching), with
``--workers`` DataLoader workers (default 2), in samples per second after a warm-up.

    python benchmarks/bench_copy_paste.py [--batches 60] [--workers 2] [--canvas 128 1024]

Rows: Detectron2's ``DatasetMapper`` (the quickstart augmentation: resize + flip,
polygon masks), the copy-paste mapper with jitter only, and with copy-paste (uniform and
class-balanced sources). ``--canvas 1024`` adds the same rows on an LVIS-sized canvas
(the 128 px images jittered onto 1024 x 1024 with the paper's 0.1..2.0 range; the
Detectron2 row resizes to 1024 and uses bitmasks), where masks cost what they cost on LVIS.
For scale: the quickstart model trains at about 0.85 s per iteration of 4 images on 2 CPU
cores (docs: FACTS.md), i.e. it consumes about 5 samples/s.
"""
import argparse
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eqlosses_d2  # noqa: E402,F401  # compat shims and registration
from detectron2.config import get_cfg  # noqa: E402
from eqlosses_d2 import add_eqlosses_config, prepare_dataset  # noqa: E402
from eqlosses_d2.config import merge_config_file, merge_config_list, validate_copy_paste  # noqa: E402
from eqlosses_d2.resume import build_resumable_train_loader  # noqa: E402

BASE = os.path.join(ROOT, "configs", "quickstart", "Base-Synthetic-R18-FPN.yaml")


def rows(canvas):
    lsj = ["INPUT.EQLOSSES.LSJ.ENABLED", "True", "INPUT.EQLOSSES.LSJ.IMAGE_SIZE", str(canvas)]
    if canvas == 128:
        lsj += ["INPUT.EQLOSSES.LSJ.MIN_SCALE", "0.5", "INPUT.EQLOSSES.LSJ.MAX_SCALE", "1.5"]
        detectron2 = []
    else:
        detectron2 = ["INPUT.MIN_SIZE_TRAIN", f"({canvas},)", "INPUT.MAX_SIZE_TRAIN", str(canvas),
                      "INPUT.MASK_FORMAT", "bitmask"]
    paste = lsj + ["INPUT.EQLOSSES.COPY_PASTE.ENABLED", "True"]
    return [
        ("Detectron2 DatasetMapper", detectron2),
        ("jitter only (copy-paste mapper)", lsj),
        ("jitter + copy-paste, uniform sources", paste),
        ("jitter + copy-paste, class-balanced sources", paste + ["INPUT.EQLOSSES.COPY_PASTE.SOURCE_SAMPLING", "class_balanced"]),
    ]


def measure(opts, args):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, BASE)
    merge_config_list(cfg, opts + ["DATALOADER.NUM_WORKERS", str(args.workers), "SOLVER.IMS_PER_BATCH", str(args.batch),
                                   "SEED", "0"])
    validate_copy_paste(cfg)
    prepare_dataset(cfg.DATASETS.TRAIN[0])
    loader = build_resumable_train_loader(cfg)
    batches = iter(loader)
    for _ in range(args.warmup):  # worker start-up
        next(batches)
    start = time.perf_counter()
    count = sum(len(b) for b in itertools.islice(batches, args.batches))
    elapsed = time.perf_counter() - start
    del batches, loader
    return count / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--canvas", type=int, nargs="+", default=[128, 1024], choices=[128, 1024])
    args = parser.parse_args(argv)

    print(f"| canvas | pipeline | samples/s ({args.workers} workers, batch {args.batch}) |")
    print("|---|---|---:|")
    for canvas in args.canvas:
        for name, opts in rows(canvas):
            print(f"| {canvas} | {name} | {measure(opts, args):.1f} |", flush=True)


if __name__ == "__main__":
    main()
