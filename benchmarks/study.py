#!/usr/bin/env python
"""
The results file of the quickstart study and its statistics: mean ± sd over seeds and the
paired difference of each method to the softmax baseline with a 95% interval.

    python benchmarks/study.py [--results benchmarks/results/quickstart_study.json]
                               [--readme README.md | --check-readme README.md]

``benchmarks/train_methods.py --seeds 0 1 2`` merges every finished run into the results
file (one record per head, method and seed: box and mask AP, APr, APc, APf, timings, the
date, the machine); this script prints the tables, and ``--readme`` writes them into the
README between ``<!-- study:<head> -->`` and ``<!-- /study:<head> -->``, so the numbers in
the README always come from the committed file (``tests/test_study.py`` checks it).

The interval. Run k of every method uses ``SEED k``: the same initial weights, the same
images in the same order with the same augmentation. So the comparison is paired by seed:
``d_k = metric(method, k) - metric(softmax, k)``, and the interval is Student's t over the
seeds, ``mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n)``. We chose this over a bootstrap
because the variance that matters here is between trainings (a rerun of the softmax baseline
with another seed moved box AP by 4 points): a bootstrap over the images of one seed sees
only the sampling of the 100 val images and none of it, and a bootstrap over three seeds has
ten distinct resamples and gives intervals that are too narrow. The t interval assumes
the per-seed differences are roughly normal; with three seeds it is wide (t = 4.30), which
is what three seeds can say. A difference is "beyond the interval" when its interval
excludes 0.
"""
import argparse
import fcntl
import json
import math
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(ROOT, "benchmarks", "results", "quickstart_study.json")
BASELINE = "softmax"
#: the one-stage detectors' baselines: focal loss in the same detector
ONE_STAGE_BASELINES = {"_retinanet": "focal_retinanet", "_fcos": "focal_fcos"}
TASKS = ("bbox", "segm")
METRICS = ("AP", "APr", "APc", "APf")
#: metrics of the paired-difference table (the four of each task)
DIFF_METRICS = tuple((task, metric) for task in TASKS for metric in METRICS)
ABOUT = ("Quickstart study (benchmarks/train_methods.py --seeds): one record per head, method and seed, "
         "box and mask AP on the embedded synthetic val split; tables: python benchmarks/study.py")


# -- Student's t quantile ---------------------------------------------------------------------

def t_cdf(x, df):
    """P(T <= x) for Student's t with ``df`` degrees of freedom: 1/2 plus the integral of the
    density from 0 to |x| (composite Simpson, 2,000 panels; the density is smooth, so the error is
    below 1e-9 for the quantiles used here)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    n = 2000
    h = x / n
    total = density(0.0) + density(x)
    for i in range(1, n):
        total += (4 if i % 2 else 2) * density(i * h)
    return 0.5 + total * h / 3


def t_quantile(p, df):
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by
    bisection on :func:`t_cdf` to 1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: p {p} must be in (0.5, 1) and df {df} >= 1")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


# -- summaries ----------------------------------------------------------------------------------

def mean_sd(values):
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def paired_interval(method_values, baseline_values, level=0.95):
    """``{seed: value}`` of a method and of the baseline -> (mean difference, low, high, n) over
    the seeds both have; low and high are nan below two seeds."""
    seeds = sorted(set(method_values) & set(baseline_values))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    diffs = [method_values[s] - baseline_values[s] for s in seeds]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan"), len(diffs)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


# -- the results file ---------------------------------------------------------------------------

def machine():
    """What ran it, in words (CPU count and model; the GPU when one was used)."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    words = f"{os.cpu_count()} CPU cores ({model})"
    try:
        import torch

        if torch.cuda.is_available():
            words = f"{torch.cuda.get_device_name(0)}, " + words
    except ImportError:
        pass
    return words


def load(path):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path}: not a study results file (no 'runs' list)")
    return data


def merge_run(path, head, method, seed, result_json):
    """Add (or replace) the run (head, method, seed) from a ``train_methods.py`` result.json;
    the file is rewritten atomically."""
    with open(result_json) as f:
        record = json.load(f)
    run = {
        "head": head,
        "method": method,
        "seed": int(seed),
        "config": record["config"],
        "opts": record.get("opts", []),
        "finished": record.get("finished"),
        "machine": record.get("machine") or machine(),
        "threads": record.get("threads"),
        "s_per_iter": record["s_per_iter"],
        "wall_s": record["wall_s"],
    }
    for task in TASKS:
        values = record["results"].get(task)
        if values:
            run[task] = {m: round(float(values[m]), 4) for m in METRICS if m in values}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:  # several train_methods.py may merge into one file
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path) if os.path.isfile(path) else {"about": ABOUT, "runs": []}
        key = (head, method, int(seed))
        data["runs"] = [r for r in data["runs"] if (r["head"], r["method"], r["seed"]) != key] + [run]
        data["runs"].sort(key=lambda r: (r["head"], r["method"], r["seed"]))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)


def baseline_of(method):
    """The run a method is compared with: focal loss in the same one-stage detector, else
    softmax (None: the method is a baseline)."""
    base = next((b for suffix, b in ONE_STAGE_BASELINES.items() if method.endswith(suffix)), BASELINE)
    return None if method == base else base


def values_by_seed(data, head, method, task, metric):
    return {r["seed"]: r[task][metric] for r in data["runs"]
            if r["head"] == head and r["method"] == method and metric in r.get(task, {})}


def legacy_record(data, head, method):
    """The earlier single run of (head, method) kept in the file's ``legacy_runs`` (None: none)."""
    return next((r for r in data.get("legacy_runs", []) if r["head"] == head and r["method"] == method), None)


def _methods(data, head, methods=None):
    present = []
    for r in data["runs"] + data.get("legacy_runs", []):
        if r["head"] == head and r["method"] not in present:
            present.append(r["method"])
    order = list(methods) if methods else sorted(present, key=lambda m: (baseline_of(m) is not None, m))
    return [m for m in order if m in present]


def format_tables(data, heads=None, methods=None):
    """Markdown: per head, the mean ± sd table and the paired-difference table."""
    heads = heads or sorted({r["head"] for r in data["runs"] + data.get("legacy_runs", [])})
    out = []
    for head in heads:
        block = format_head(data, head, methods)
        if block:
            out.append(f"{head} head:\n\n{block}")
    return "\n\n".join(out)


def format_head(data, head, methods=None):
    names = _methods(data, head, methods)
    if not names:
        return ""
    lines = ["| method | seeds | box AP | APr | APc | APf | mask AP | APr | APc | APf |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    earlier = False
    for method in names:
        seeds = sorted({r["seed"] for r in data["runs"] if r["head"] == head and r["method"] == method})
        legacy = None if seeds else legacy_record(data, head, method)
        if legacy is not None:
            earlier = True
            cells = [f"{legacy[task][metric]:.2f}" if metric in legacy.get(task, {}) else "-"
                     for task, metric in DIFF_METRICS]
            lines.append(f"| {method} | 0* | " + " | ".join(cells) + " |")
            continue
        cells = []
        for task, metric in DIFF_METRICS:
            values = list(values_by_seed(data, head, method, task, metric).values())
            if not values:
                cells.append("-")
                continue
            mean, sd = mean_sd(values)
            cells.append(f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {method} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if earlier:
        lines += ["", "\\* an earlier single run (SEED 0, with the code of its day), kept in the file's "
                  "`legacy_runs` until the study runs the method; not paired with the study's runs."]
    studied = {r["method"] for r in data["runs"] if r["head"] == head}
    others = [m for m in names if m in studied and baseline_of(m) in studied]
    if not others:
        return "\n".join(lines)
    bases = sorted({baseline_of(m) for m in others})
    lines += ["", f"Paired difference to {' / '.join(bases)} (same seed), mean and 95% t interval over the "
              "seeds both have; **bold**: the interval excludes 0.", "",
              "| method | vs | seeds | Δ box AP | Δ APr | Δ APc | Δ APf | Δ mask AP | Δ APr | Δ APc | Δ APf |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in others:
        base = baseline_of(method)
        cells, n_seeds = [], 0
        for task, metric in DIFF_METRICS:
            mean, low, high, n = paired_interval(values_by_seed(data, head, method, task, metric),
                                                 values_by_seed(data, head, base, task, metric))
            n_seeds = max(n_seeds, n)
            if n == 0:
                cells.append("-")
            elif n < 2:
                cells.append(f"{mean:+.2f}")
            else:
                cell = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
                cells.append(f"**{cell}**" if low > 0 or high < 0 else cell)
        lines.append(f"| {method} | {base} | {n_seeds} | " + " | ".join(cells) + " |")
    verdicts = rare_class_verdicts(data, head, others)
    if verdicts:
        lines += ["", verdicts]
    return "\n".join(lines)


def rare_class_verdicts(data, head, methods):
    """One generated sentence: which methods' APr differences (box and mask) to their baseline
    lie beyond the 95% interval, above or below, over the methods with at least two paired seeds."""
    above, below, within = [], [], []
    measured = set()  # "box", "mask": what the within-list covers (one-stage detectors have no masks)
    for method in methods:
        base = baseline_of(method)
        found = []
        for task, word in (("bbox", "box"), ("segm", "mask")):
            mean, low, high, n = paired_interval(values_by_seed(data, head, method, task, "APr"),
                                                 values_by_seed(data, head, base, task, "APr"))
            if n >= 2:
                found.append((word, mean, low, high))
        if not found:
            continue
        measured.update(w for w, _, _, _ in found)
        up = [f"{w} {m:+.2f}" for w, m, lo, hi in found if lo > 0]
        down = [f"{w} {m:+.2f}" for w, m, lo, hi in found if hi < 0]
        if up:
            above.append(f"{method} ({', '.join(up)})")
        if down:
            below.append(f"{method} ({', '.join(down)})")
        if not up and not down:
            within.append(method)
    if not (above or below or within):
        return ""
    parts = [f"APr above its baseline beyond the interval: {', '.join(above) or 'none'}",
             f"below it: {', '.join(below) or 'none'}",
             f"within the interval on {'both box and mask' if len(measured) == 2 else ''.join(measured)} APr: "
             f"{', '.join(within) or 'none'}"]
    return "Generated from the file: " + "; ".join(parts) + "."


# -- README -------------------------------------------------------------------------------------

def readme_blocks(data):
    """{head: the Markdown between its README markers}."""
    return {head: format_head(data, head)
            for head in sorted({r["head"] for r in data["runs"] + data.get("legacy_runs", [])})}


def render_readme(text, data, readme_path="README.md"):
    """``text`` with every ``<!-- study:<head> -->`` block replaced by the tables of ``data``."""
    for head, block in readme_blocks(data).items():
        start, end = f"<!-- study:{head} -->", f"<!-- /study:{head} -->"
        if start not in text or end not in text:
            raise ValueError(f"{readme_path}: no '{start}' ... '{end}' markers for the {head} head's study tables")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{block}\n{end}{after}"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--results", default=DEFAULT_RESULTS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--readme", help="write the tables into this README's study markers")
    group.add_argument("--check-readme", help="exit 1 when this README's study tables differ from the file")
    args = parser.parse_args()
    data = load(args.results)
    if args.readme or args.check_readme:
        path = args.readme or args.check_readme
        with open(path) as f:
            text = f.read()
        new = render_readme(text, data, path)
        if args.check_readme:
            if new != text:
                print(f"{path}: the study tables differ from {args.results}; run "
                      f"python benchmarks/study.py --readme {path}")
                return 1
            return 0
        with open(path + ".tmp", "w") as f:
            f.write(new)
        os.replace(path + ".tmp", path)
        return 0
    print(format_tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
