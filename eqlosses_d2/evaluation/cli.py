"""
Evaluate an LVIS results json against an LVIS annotation file, as lvis-api's ``LVISEval``
would, and print its summary and the AP table::

    python -m eqlosses_d2.evaluation --annotations lvis_v1_val.json --results results.json \\
        [--iou-type bbox|segm] [--protocol standard|fixed|boundary] [--pooled] \\
        [--max-dets 300] [--max-dets-per-category 10000] [--output metrics.json]

``--protocol standard`` is lvis-api's (``--max-dets`` per image across categories, 300 by
default; -1: no cap); ``fixed`` is Fixed AP (``--max-dets-per-category`` per category,
10,000 by default, no per-image cap); ``boundary`` is Boundary AP of mask results
(lvis-api's matching with Boundary IoU: slow). ``--pooled`` adds Pooled AP (standard and
fixed). The results file is lvis-api's and Detectron2's format (``lvis_instances_results.json``):
a json list of ``{"image_id", "category_id", "bbox" (xywh), "score"[, "segmentation" (RLE)]}``.
As in Detectron2 (and :func:`~.evaluate.evaluate_lvis`, rule 6), ``segm`` ignores the
results' ``bbox``, so its small/medium/large split uses the mask area; lvis-api given a
file whose results have a ``bbox`` would use the box area there.

The files are parsed with msgspec, box results straight into arrays
(:func:`~.json_io.load_box_results`), so that parsing no longer dominates the run;
the numbers are those of :func:`~.evaluate.evaluate_lvis` on the parsed lists, bit for bit.
A missing, unreadable or malformed file, or one that is not in the LVIS format, is one
line on stderr naming the file (exit status 1); ``--output`` is written atomically.
"""
import argparse
import json
import math
import os
import sys

from ..atomic import atomic_write
from .boundary import evaluate_lvis_boundary
from .evaluate import evaluate_lvis_detailed, per_category_records
from .fixed_ap import FIXED_AP_MAX_DETS_PER_CATEGORY
from .ground_truth import LVISGroundTruth
from .json_io import load_box_results, load_json
from .params import DEFAULT_MAX_DETS
from .table import format_ap_table

__all__ = ["InputError", "main", "read_ground_truth", "read_results"]

#: lvis-api's ``LVISEval.print_results`` line
_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} catIds={:>3s}] = {:0.3f}"


class InputError(ValueError):
    """An input file that cannot be evaluated; the message is one line naming it."""


def read_ground_truth(path, iou_type) -> LVISGroundTruth:
    """The LVIS annotation file ``path`` prepared for evaluation; :class:`InputError`
    naming the file and what is missing when it is not an LVIS annotation file."""
    dataset = _load(path)
    if not isinstance(dataset, dict):
        raise InputError(f"{path}: not an LVIS annotation file (a json {type(dataset).__name__}, not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise InputError(f"{path}: not an LVIS annotation file (no '{key}' list)")
    _require(path, "categories", dataset["categories"], ("id", "frequency"))
    _require(path, "images", dataset["images"], ("id",))
    needed = ("id", "image_id", "category_id", "area") + (("bbox",) if iou_type == "bbox" else ("segmentation",))
    _require(path, "annotations", dataset["annotations"], needed)
    return LVISGroundTruth(dataset)


def _require(path, key, entries, fields):
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {key}[{index}] is a {type(entry).__name__}, not an object")
        missing = [f for f in fields if f not in entry]
        if missing:
            raise InputError(f"{path}: {key}[{index}] has no '{missing[0]}'")


def read_results(path, iou_type):
    """
    The results file ``path``: :class:`~.results.ResultArrays` for box results in the
    usual form (no dict kept per result), else the list of result dicts.
    :class:`InputError` naming the file and the first result at fault when it is not a
    list of results with ``image_id``, ``category_id`` and ``score`` (and ``bbox`` for box
    evaluation when the first result has one, as lvis-api reads it).
    """
    if iou_type == "bbox":
        try:
            arrays = load_box_results(path)
        except OSError as e:
            raise InputError(f"{path}: {e.strerror or e}") from None
        if arrays is not None:
            return arrays
    results = _load(path)
    if not isinstance(results, list):
        raise InputError(f"{path}: not an LVIS results file (a json {type(results).__name__}, not a list of results)")
    needed = ("image_id", "category_id", "score")
    if iou_type == "bbox" and results and isinstance(results[0], dict) and "bbox" in results[0]:
        needed += ("bbox",)  # lvis-api reads the boxes when the first result has one
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise InputError(f"{path}: result {index} is a {type(result).__name__}, not an object")
        missing = [f for f in needed if f not in result]
        if missing:
            raise InputError(f"{path}: result {index} has no '{missing[0]}'")
        box = result.get("bbox") if "bbox" in needed else None
        if box is not None and not (isinstance(box, list) and len(box) == 4):
            raise InputError(f"{path}: result {index} has a 'bbox' that is not a list of 4 numbers: {box!r}")
    return results


def _load(path):
    try:
        return load_json(path)
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONFileError names the file
        raise InputError(str(e)) from None


def _print_lvis_api_summary(metrics, max_dets):
    """Print ``metrics`` (x 100) as lvis-api's ``print_results`` does (-1 where NaN);
    other keys (Pooled AP) as ``key = value``."""
    for key, value in metrics.items():
        value = -1.0 if value is None or math.isnan(value) else value / 100
        if key.startswith("AP-pooled"):
            print(f" {'Pooled AP':<18} {'(AP)'} @[ IoU=0.50:0.95 | area=   all | maxDets={max_dets:>3d} "
                  f"catIds={key.rsplit('-', 1)[1]:>3s}] = {value:0.3f}")
            continue
        title, kind = ("Average Precision", "(AP)") if "AP" in key else ("Average Recall", "(AR)")
        iou = f"{float(key[2:]) / 100:0.2f}" if len(key) > 2 and key[2].isdigit() else "0.50:0.95"
        cats = key[2] if len(key) > 2 and key[2] in "rcf" else "all"
        area = key[2] if len(key) > 2 and key[2] in "sml" else "all"
        print(_LINE.format(title, kind, iou, area, max_dets, cats, value))


def evaluate_files(args):
    """Evaluate as the parsed command line says; returns (metrics, per-category records or None)."""
    iou_type = "segm" if args.protocol == "boundary" else args.iou_type
    gt = read_ground_truth(args.annotations, iou_type)
    results = read_results(args.results, iou_type)
    try:
        if args.protocol == "boundary":
            if not isinstance(results, list):
                results = results.to_dicts()
            return evaluate_lvis_boundary(gt, results, args.max_dets), None
        if args.protocol == "fixed":
            per_image, per_category = -1, args.max_dets_per_category
        else:
            per_image, per_category = args.max_dets, None
        result = evaluate_lvis_detailed(gt, results, iou_type, per_image, per_category, args.pooled)
    except (KeyError, TypeError, ValueError) as e:  # what the results hold (ids, scores, masks)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{args.results}: {message}") from None
    return result.metrics, per_category_records(result)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m eqlosses_d2.evaluation",
        description="Evaluate an LVIS results json against an LVIS annotation file (lvis-api's metrics).",
    )
    parser.add_argument("--annotations", required=True, help="LVIS annotation json (e.g. lvis_v1_val.json)")
    parser.add_argument("--results", required=True, help="results json: a list of LVIS result dicts")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox", help="default: bbox")
    parser.add_argument("--protocol", choices=("standard", "fixed", "boundary"), default="standard",
                        help="standard: lvis-api's; fixed: Fixed AP; boundary: Boundary AP of the masks (slow)")
    parser.add_argument("--pooled", action="store_true", help="also Pooled AP (standard and fixed protocols)")
    parser.add_argument("--max-dets", type=int, default=DEFAULT_MAX_DETS,
                        help="results kept per image, across categories (-1: all); default 300")
    parser.add_argument("--max-dets-per-category", type=int, default=FIXED_AP_MAX_DETS_PER_CATEGORY,
                        help="Fixed AP's results kept per category; default 10000")
    parser.add_argument("--output", help="also write the metrics and per-category AP to this json")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pooled and args.protocol == "boundary":
        parser.error("--pooled is computed for the standard and fixed protocols, not boundary")
    if args.max_dets_per_category <= 0:
        parser.error(f"--max-dets-per-category must be > 0, got {args.max_dets_per_category}")
    try:
        metrics, records = evaluate_files(args)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    task = "segm" if args.protocol == "boundary" else args.iou_type
    _print_lvis_api_summary(metrics, -1 if args.protocol == "fixed" else args.max_dets)
    if args.protocol != "boundary":
        print()
        print(format_ap_table({task: metrics}, dataset_name=os.path.basename(args.annotations)))
    if args.output:
        out = {"annotations": args.annotations, "results": args.results, "iou_type": task,
               "protocol": args.protocol, "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()}}
        if records is not None:
            out["per_category"] = records
        atomic_write(args.output, lambda f: json.dump(out, f, indent=1, allow_nan=False), binary=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
