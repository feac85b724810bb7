#!/usr/bin/env python
"""
Train every classification loss on the quickstart schedule (embedded synthetic data) with
the standard and the cascade RoI heads, evaluate each on the synthetic val split and print
the LVIS AP table.

    python benchmarks/train_methods.py [--heads standard cascade] [--losses eqlv2 seesaw ...]
                                       [--seeds 0 1 2] [--jobs 2 --threads 1]
                                       [--output-dir output/train_methods]
                                       [--results benchmarks/results/quickstart_study.json]
                                       [opts ...]

Each run is a separate ``train_net.py`` process writing into
``<output-dir>/<head>/<loss>/seed<k>/``; its AP and timings go to ``result.json`` there when
it has evaluated. Runs with a ``result.json`` are not repeated, so the script can be stopped
and started again. ``SEED k`` fixes the initial weights and the data order and augmentation
of a run (Detectron2 seeds its sampler and loader workers from it), so seed k means the same
start and the same images in the same order for every loss: the paired comparison with the
softmax run of the same seed. Runs are ordered seed by seed, so a stopped study has whole
seeds. ``--jobs N`` runs N at a time, each with ``--threads`` intra-op threads (LOCE waits for
the softmax run of its seed, which it fine-tunes). Trailing ``opts`` (KEY VALUE pairs) go to
every run after the seed, e.g. ``SOLVER.MAX_ITER 100``.

Every finished run is merged into the ``--results`` json (the committed results file, see
``benchmarks/study.py``), and the script prints, per head and method, the mean ± sd over
seeds and the paired difference to softmax with its 95% interval.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402  (benchmarks/study.py: the results file and its statistics)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart")
HEADS = {
    "standard": [],
    "cascade": ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
    # the one-stage detectors (RetinaNet, FCOS): their own quickstart configs, no RoI head
    "one_stage": [],
}
METRICS = ("AP", "APr", "APc", "APf")


#: methods that fine-tune the standard head's softmax run (their quickstart config's protocol)
FINE_TUNED = {"loce", "crt", "lws"}
#: post-hoc calibrations: the standard head's softmax run of the same seed, evaluated with these opts
#: (NorCal's γ 0.3: the best of the README's sweep on an earlier softmax run, chosen on the same val
#: split, so the NorCal row is optimistic; its default γ 0 would return the softmax scores)
EVAL_ONLY = {"norcal": ["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal", "TEST.EQLOSSES.CALIBRATION.GAMMA", "0.3"]}
#: training-data methods with their own quickstart config (softmax loss; standard head)
DATA_METHODS = {"copy_paste"}
#: box classifiers (MODEL.EQLOSSES.DECOUPLING.CLASSIFIER) with their own quickstart config (both heads)
CLASSIFIERS = {"tde", "vmf"}
#: the one-stage methods: quickstart config name (configs/quickstart/<name>_R18_FPN_synthetic.yaml)
ONE_STAGE = ("focal_retinanet", "efl_retinanet", "focal_fcos", "efl_fcos")


def loss_configs():
    """{method: quickstart config}: the per-loss Mask R-CNN quickstart files (softmax: the
    baseline), the fine-tuned methods (LOCE), copy-paste, NorCal (the softmax config,
    evaluated) and the one-stage detectors."""
    sys.path.insert(0, ROOT)
    import eqlosses_d2  # noqa: F401
    from eqlosses_d2.losses import LOSS_REGISTRY

    configs = {"softmax": os.path.join(QUICKSTART, "mask_rcnn_R18_FPN_synthetic.yaml")}
    suffix = "_mask_rcnn_R18_FPN_synthetic.yaml"
    for name in sorted(os.listdir(QUICKSTART)):
        method = name[: -len(suffix)]
        if name.endswith(suffix) and (method in LOSS_REGISTRY or method in FINE_TUNED or method in DATA_METHODS
                                       or method in CLASSIFIERS):
            configs[method] = os.path.join(QUICKSTART, name)
    for method in EVAL_ONLY:
        configs[method] = configs["softmax"]
    for method in ONE_STAGE:
        path = os.path.join(QUICKSTART, f"{method}_R18_FPN_synthetic.yaml")
        if os.path.isfile(path):
            configs[method] = path
    return configs


def applies(method, head):
    """One-stage methods only in the one_stage 'head'; RoI-head methods never there; the
    fine-tuned and post-hoc methods (from the softmax run) and copy-paste only in the standard head."""
    if head == "one_stage":
        return method in ONE_STAGE
    if method in ONE_STAGE:
        return False
    return head == "standard" or not (method in FINE_TUNED or method in EVAL_ONLY or method in DATA_METHODS)


def run_dir(output_dir, head, method, seed):
    return os.path.join(output_dir, head, method, f"seed{seed}")


def extra_opts(method, head, output_dir, seed):
    """The opts a method adds to its config: a fine-tuned or post-hoc method starts from the
    standard head's softmax run of the same seed (None: the method does not apply to the head)."""
    if not applies(method, head):
        return None
    if method not in FINE_TUNED and method not in EVAL_ONLY:
        return []
    weights = ["MODEL.WEIGHTS", os.path.join(run_dir(output_dir, "standard", "softmax", seed), "model_final.pth")]
    return weights + EVAL_ONLY.get(method, [])


def median_iteration_time(metrics_path):
    """Median of Detectron2's per-iteration ``time`` over the run (metrics.json lines; None
    without one: an evaluation-only run)."""
    times = []
    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "time" in record:
                times.append(record["time"])
    times.sort()
    return times[len(times) // 2] if times else None


def run_one(config, out_dir, opts, eval_only=False):
    """Train and evaluate one configuration in this process (only evaluate with
    ``eval_only``); write result.json atomically."""
    sys.path.insert(0, ROOT)
    import train_net
    from detectron2.engine import default_argument_parser

    argv = ["--config-file", config] + (["--eval-only"] if eval_only else []) + ["OUTPUT_DIR", out_dir] + opts
    args = default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    start = time.time()
    results = train_net.main(args)
    if not results:
        raise SystemExit(f"{config}: the run ended without evaluation results")
    record = {
        "config": os.path.relpath(config, ROOT),
        "opts": opts,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "wall_s": round(time.time() - start, 1),
        "s_per_iter": median_iteration_time(os.path.join(out_dir, "metrics.json")),
        "results": {task: dict(values) for task, values in results.items()},
    }
    tmp = os.path.join(out_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "result.json"))


def schedule(heads, methods, seeds, output_dir):
    """Runs still to do, seed by seed: [(head, method, seed, out_dir, extra opts)]."""
    tasks = []
    for seed in seeds:
        for head in heads:
            for method in methods:
                out_dir = run_dir(output_dir, head, method, seed)
                extra = extra_opts(method, head, output_dir, seed)
                if extra is None or os.path.isfile(os.path.join(out_dir, "result.json")):
                    continue
                tasks.append((head, method, seed, out_dir, extra))
    return tasks


def ready(task, output_dir):
    """A fine-tuned run can start once the checkpoint it starts from exists."""
    head, method, seed, out_dir, extra = task
    if method not in FINE_TUNED and method not in EVAL_ONLY:
        return True
    return os.path.isfile(os.path.join(run_dir(output_dir, "standard", "softmax", seed), "result.json"))


def run_all(tasks, configs, args):
    """Run ``tasks`` ``args.jobs`` at a time; merge each finished run into the results file.
    Returns the runs that failed."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    pending, running, failed = list(tasks), [], []
    deadline = time.time() + args.time_limit if args.time_limit else None
    while pending or running:
        if deadline and time.time() > deadline:  # stop: unfinished runs leave no result
            for (head, method, seed, out_dir, _), proc, log in running:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its data-loader workers
                proc.wait()
                log.close()
                print(f"[train_methods] stopped at --time-limit: {head} / {method} / seed {seed}", flush=True)
            print(f"[train_methods] --time-limit {args.time_limit} s: {len(pending)} runs not started", flush=True)
            break
        for task in [t for t in pending if ready(t, args.output_dir)]:
            if len(running) >= args.jobs:
                break
            head, method, seed, out_dir, extra = task
            pending.remove(task)
            os.makedirs(out_dir, exist_ok=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--run", configs[method], out_dir]
            cmd += ["--eval-only"] if method in EVAL_ONLY else []
            cmd += ["SEED", str(seed)] + HEADS[head] + extra + args.opts
            print(f"[train_methods] start {head} / {method} / seed {seed}", flush=True)
            log = open(os.path.join(out_dir, "stdout.log"), "w")
            running.append((task, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                  start_new_session=True), log))
        if not running:  # only runs whose dependency failed are left
            failed += [f"{t[0]}/{t[1]}/seed{t[2]} (its softmax run did not finish)" for t in pending]
            break
        time.sleep(5)
        for entry in [e for e in running if e[1].poll() is not None]:
            running.remove(entry)
            (head, method, seed, out_dir, _), proc, log = entry
            log.close()
            if proc.returncode != 0:
                failed.append(f"{head}/{method}/seed{seed}")
                print(f"[train_methods] FAILED: see {out_dir}/stdout.log", flush=True)
                continue
            print(f"[train_methods] done {head} / {method} / seed {seed}", flush=True)
            if args.results:
                study.merge_run(args.results, head, method, seed, os.path.join(out_dir, "result.json"))
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--heads", nargs="+", default=["standard", "cascade"], choices=list(HEADS))
    parser.add_argument("--losses", nargs="+", default=None, help="default: every quickstart loss config")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: unchanged)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds: then stop the running runs and start no more (0: none)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "train_methods"))
    parser.add_argument("--results", default=study.DEFAULT_RESULTS,
                        help="results json every finished run is merged into ('' : none)")
    parser.add_argument("--table-only", action="store_true", help="print the tables of the results file")
    parser.add_argument("--run", nargs=2, metavar=("CONFIG", "OUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--eval-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.run:
        run_one(args.run[0], args.run[1], args.opts, eval_only=args.eval_only)
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs: {args.jobs} is not a positive number of runs")
    configs = loss_configs()
    losses = args.losses or list(configs)
    unknown = [name for name in losses if name not in configs]
    if unknown:
        parser.error(f"--losses: no quickstart config for {unknown}; known: {sorted(configs)}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: {args.seeds} repeats a seed")
    failed = []
    if not args.table_only:
        for seed in args.seeds:  # runs finished earlier (another invocation): make sure they are merged
            for head in args.heads:
                for method in losses:
                    done = os.path.join(run_dir(args.output_dir, head, method, seed), "result.json")
                    if args.results and os.path.isfile(done):
                        study.merge_run(args.results, head, method, seed, done)
        failed = run_all(schedule(args.heads, losses, args.seeds, args.output_dir), configs, args)
    if args.results and os.path.isfile(args.results):
        print(study.format_tables(study.load(args.results), heads=args.heads, methods=losses))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
