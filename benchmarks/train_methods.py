#!/usr/bin/env python
"""
Train every classification loss on the quickstart schedule (embedded synthetic data) with
the standard and the cascade RoI heads, evaluate each on the synthetic val split and print
the LVIS AP table.

    python benchmarks/train_methods.py [--heads standard cascade] [--losses eqlv2 seesaw ...]
                                       [--output-dir output/train_methods] [opts ...]

Each run is a separate ``train_net.py`` process writing into
``<output-dir>/<head>/<loss>/``; its AP and timings go to ``result.json`` there when it has
evaluated. Runs with a ``result.json`` are not repeated, so the script can be stopped and
started again; the table covers every run that has one. Every run uses ``SEED 0`` (the
same initial weights and sample order for every loss); trailing ``opts`` (KEY VALUE
pairs) go to every run after it, e.g. ``SEED 1`` or ``SOLVER.MAX_ITER 100``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart")
HEADS = {
    "standard": [],
    "cascade": ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
}
METRICS = ("AP", "APr", "APc", "APf")


#: methods that fine-tune the standard head's softmax run (their quickstart config's protocol)
FINE_TUNED = {"loce"}


def loss_configs():
    """{method: quickstart config} from the per-loss quickstart files (softmax: the
    baseline), plus the fine-tuned methods (LOCE)."""
    sys.path.insert(0, ROOT)
    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.losses import LOSS_REGISTRY

    configs = {"softmax": os.path.join(QUICKSTART, "mask_rcnn_R18_FPN_synthetic.yaml")}
    suffix = "_mask_rcnn_R18_FPN_synthetic.yaml"
    for name in sorted(os.listdir(QUICKSTART)):
        method = name[: -len(suffix)]
        if name.endswith(suffix) and (method in LOSS_REGISTRY or method in FINE_TUNED):
            configs[method] = os.path.join(QUICKSTART, name)
    return configs


def extra_opts(method, head, output_dir):
    """A fine-tuned method starts from the same head's softmax run (None: not applicable)."""
    if method not in FINE_TUNED:
        return []
    if head != "standard":
        return None
    return ["MODEL.WEIGHTS", os.path.join(output_dir, "standard", "softmax", "model_final.pth")]


def median_iteration_time(metrics_path):
    """Median of Detectron2's per-iteration ``time`` over the run (metrics.json lines)."""
    times = []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "time" in record:
                times.append(record["time"])
    times.sort()
    return times[len(times) // 2] if times else float("nan")


def run_one(config, out_dir, opts):
    """Train and evaluate one configuration in this process; write result.json atomically."""
    sys.path.insert(0, ROOT)
    import train_net
    from detectron2.engine import default_argument_parser

    argv = ["--config-file", config, "OUTPUT_DIR", out_dir] + opts
    args = default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    start = time.time()
    results = train_net.main(args)
    if not results:
        raise SystemExit(f"{config}: the run ended without evaluation results")
    record = {
        "config": os.path.relpath(config, ROOT),
        "opts": opts,
        "wall_s": round(time.time() - start, 1),
        "s_per_iter": median_iteration_time(os.path.join(out_dir, "metrics.json")),
        "results": {task: dict(values) for task, values in results.items()},
    }
    tmp = os.path.join(out_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "result.json"))


def print_table(output_dir, heads, losses):
    print("\n| head | loss | box AP | APr | APc | APf | mask AP | APr | APc | APf | s/iter | wall min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for head in heads:
        for loss in losses:
            path = os.path.join(output_dir, head, loss, "result.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                record = json.load(f)
            cells = []
            for task in ("bbox", "segm"):
                values = record["results"].get(task, {})
                cells += [f"{values[m]:.2f}" if m in values else "-" for m in METRICS]
            print(f"| {head} | {loss} | " + " | ".join(cells) +
                  f" | {record['s_per_iter']:.3f} | {record['wall_s'] / 60:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--losses", nargs="+", default=None, help="default: every quickstart loss config")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "train_methods"))
    parser.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    parser.add_argument("--run", nargs=2, metavar=("CONFIG", "OUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.run:
        run_one(args.run[0], args.run[1], args.opts)
        return 0
    configs = loss_configs()
    losses = args.losses or list(configs)
    unknown = [name for name in losses if name not in configs]
    if unknown:
        parser.error(f"--losses: no quickstart config for {unknown}; known: {sorted(configs)}")
    failed = []
    if not args.table_only:
        for head in args.heads:
            for loss in losses:
                out_dir = os.path.join(args.output_dir, head, loss)
                extra = extra_opts(loss, head, args.output_dir)
                if extra is None or os.path.isfile(os.path.join(out_dir, "result.json")):
                    continue
                os.makedirs(out_dir, exist_ok=True)
                cmd = [sys.executable, os.path.abspath(__file__), "--run", configs[loss], out_dir]
                cmd += ["SEED", "0"] + HEADS[head] + extra + args.opts
                print(f"[train_methods] {head} / {loss}", flush=True)
                with open(os.path.join(out_dir, "stdout.log"), "w") as log:
                    if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
                        failed.append(f"{head}/{loss}")
                        print(f"[train_methods] FAILED: see {out_dir}/stdout.log", flush=True)
    print_table(args.output_dir, args.heads, losses)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
