"""`python -m eqlosses_d2.evaluation`: the metrics of the in-memory evaluation from json files,
the fast box path (msgspec, arrays) equal to the dicts, and one-line errors naming the file."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from detectron2.data import MetadataCatalog

from eqlosses_d2.evaluation import LVIS_FIXED_METRICS, LVIS_METRICS, POOLED_METRICS, ResultArrays, evaluate_lvis
from eqlosses_d2.evaluation.cli import main, read_results
from eqlosses_d2.evaluation.json_io import load_box_results, load_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results_for(gt, seed=0):
    """Jittered copies of the ground truth and random boxes, score ties, RLE masks of the boxes."""
    rng = np.random.RandomState(seed)
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    out = []
    for ann in gt["annotations"] * 3:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = (float(v) + rng.normal(0, 2) for v in ann["bbox"])
        cat = ann["category_id"] if rng.rand() < 0.8 else int(rng.choice(cat_ids))
        out.append((ann["image_id"], cat, [max(x, 0.0), max(y, 0.0), max(bw, 1.0), max(bh, 1.0)], h, w))
    for image_id, (h, w) in sizes.items():
        for _ in range(5):
            bw, bh = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
            out.append((image_id, int(rng.choice(cat_ids)), [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                        h, w))
    results = []
    for image_id, cat, box, h, w in out:
        x, y, bw, bh = box
        rle = mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
        results.append({"image_id": image_id, "category_id": cat, "bbox": box,
                        "score": float(np.round(rng.rand(), 1)),  # ties
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return results


@pytest.fixture(scope="module")
def files(tiny_dataset, tmp_path_factory):
    annotations = MetadataCatalog.get(tiny_dataset["val"]).json_file
    with open(annotations) as f:
        gt = json.load(f)
    results = _results_for(gt)
    path = tmp_path_factory.mktemp("cli") / "results.json"
    path.write_text(json.dumps(results))
    return annotations, str(path), results


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _same(expected, written):
    return all(
        (written[k] is None and math.isnan(v)) or (written[k] is not None and written[k] == v)
        for k, v in expected.items()
    ) and list(written) == list(expected)


@pytest.mark.parametrize(
    "iou_type, protocol, pooled",
    [("bbox", "standard", False), ("segm", "standard", False), ("bbox", "fixed", True), ("segm", "fixed", False),
     ("bbox", "standard", True)],
)
def test_cli_gives_the_in_memory_metrics(files, tmp_path, capsys, iou_type, protocol, pooled):
    annotations, results_path, results = files
    out = tmp_path / "metrics.json"
    argv = ["--annotations", annotations, "--results", results_path, "--iou-type", iou_type,
            "--protocol", protocol, "--output", out] + (["--pooled"] if pooled else [])
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 0, stderr
    if protocol == "fixed":
        expected = evaluate_lvis(annotations, results, iou_type, max_dets_per_image=-1,
                                 max_dets_per_category=10000, pooled=pooled)
        names = LVIS_FIXED_METRICS
    else:
        expected = evaluate_lvis(annotations, results, iou_type, pooled=pooled)
        names = LVIS_METRICS
    assert list(expected) == list(names + (POOLED_METRICS if pooled else ()))
    assert 0 < expected["AP"] < 100
    written = json.loads(out.read_text())
    assert written["iou_type"] == iou_type and _same(expected, written["metrics"])  # bit for bit
    assert len(written["per_category"]) == len(json.load(open(annotations))["categories"])
    # lvis-api's print_results lines, then the AP table
    max_dets = -1 if protocol == "fixed" else 300
    line = f" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets={max_dets:>3d} catIds=all] = "
    assert f"{line}{expected['AP'] / 100:0.3f}" in stdout.splitlines()
    assert f"| {os.path.basename(annotations)} | {iou_type} | {expected['AP']:.2f} |" in stdout


def test_box_results_are_read_into_arrays_equal_to_the_dicts(files):
    _, results_path, results = files
    arrays = read_results(results_path, "bbox")
    assert isinstance(arrays, ResultArrays) and not arrays.has_masks
    assert arrays.boxes.dtype == np.float64 and arrays.scores.dtype == np.float64
    assert np.array_equal(arrays.boxes, np.array([r["bbox"] for r in results], dtype=np.float64))
    assert np.array_equal(arrays.scores, np.array([r["score"] for r in results]))
    assert arrays.image_ids.tolist() == [r["image_id"] for r in results]
    assert arrays.category_ids.tolist() == [r["category_id"] for r in results]
    assert load_json(results_path) == results  # the same parse as json.load
    assert isinstance(read_results(results_path, "segm"), list)  # masks: the dicts


def test_results_of_another_form_take_the_dicts_path(files, tmp_path, capsys):
    """Mask-only results (box evaluation from the masks, as lvis-api) and a float image id
    (which lvis-api compares as is) are not the arrays' form: the dicts are evaluated."""
    annotations, _, results = files
    mask_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    path = tmp_path / "masks.json"
    path.write_text(json.dumps(mask_only))
    assert load_box_results(path) is None
    out = tmp_path / "m.json"
    assert _run(capsys, "--annotations", annotations, "--results", path, "--output", out)[0] == 0
    assert _same(evaluate_lvis(annotations, mask_only, "bbox"), json.loads(out.read_text())["metrics"])

    floats = [dict(r) for r in results]
    floats[3]["image_id"] = floats[3]["image_id"] + 0.5
    path.write_text(json.dumps(floats))
    assert load_box_results(path) is None
    code, stdout, stderr = _run(capsys, "--annotations", annotations, "--results", path)
    assert code == 1 and stdout == ""
    assert stderr.strip() == (f"python -m eqlosses_d2.evaluation: error: {path}: Results do not correspond to the "
                              f"LVIS ground truth: 1 image ids are not in it (e.g. [{floats[3]['image_id']}])")


def _error(capsys, annotations, results, *extra):
    code, stdout, stderr = _run(capsys, "--annotations", annotations, "--results", results, *extra)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("python -m eqlosses_d2.evaluation: error: ")
    return lines[0][len("python -m eqlosses_d2.evaluation: error: "):]


def test_bad_files_are_one_line_naming_the_file(files, tmp_path, capsys):
    annotations, results_path, results = files
    missing = tmp_path / "nope.json"
    assert _error(capsys, missing, results_path) == f"{missing}: No such file or directory"
    assert _error(capsys, annotations, missing) == f"{missing}: No such file or directory"

    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(results)[:1000])
    for iou_type in ("bbox", "segm"):
        message = _error(capsys, annotations, truncated, "--iou-type", iou_type)
        assert message.startswith(f"{truncated}: not valid JSON (") and "line 1 column" in message

    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps({"annotations": results}))
    assert _error(capsys, annotations, not_list) == (
        f"{not_list}: not an LVIS results file (a json dict, not a list of results)")

    no_score = tmp_path / "no_score.json"
    no_score.write_text(json.dumps(results[:5] + [{k: v for k, v in results[5].items() if k != "score"}]))
    assert _error(capsys, annotations, no_score) == f"{no_score}: result 5 has no 'score'"

    bad_box = tmp_path / "bad_box.json"
    bad_box.write_text(json.dumps(results[:2] + [dict(results[2], bbox=[1, 2, 3])]))
    assert _error(capsys, annotations, bad_box) == (
        f"{bad_box}: result 2 has a 'bbox' that is not a list of 4 numbers: [1, 2, 3]")

    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(results[:3] + [dict(results[3], score=float("nan"))]))  # json writes NaN
    message = _error(capsys, annotations, nan)
    assert message.startswith(f"{nan}: LVIS results: 1 result(s) have a NaN score, the first is result 3 ")

    gt = json.load(open(annotations))
    no_categories = tmp_path / "gt_no_categories.json"
    no_categories.write_text(json.dumps({k: v for k, v in gt.items() if k != "categories"}))
    assert _error(capsys, no_categories, results_path) == (
        f"{no_categories}: not an LVIS annotation file (no 'categories' list)")
    no_frequency = tmp_path / "gt_no_frequency.json"
    no_frequency.write_text(json.dumps(dict(gt, categories=[{k: v for k, v in c.items() if k != "frequency"}
                                                            for c in gt["categories"]])))
    assert _error(capsys, no_frequency, results_path) == f"{no_frequency}: categories[0] has no 'frequency'"

    out = tmp_path / "never.json"
    _error(capsys, annotations, no_score, "--output", out)
    assert not out.exists()  # no half-written output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("never")) == []


def test_python_m_entry(files, tmp_path):
    annotations, results_path, _ = files
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "eqlosses_d2.evaluation", "--annotations", annotations,
                           "--results", results_path], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 catIds=all] = ")
    done = subprocess.run([sys.executable, "-m", "eqlosses_d2.evaluation", "--annotations", annotations,
                           "--results", str(tmp_path / "missing.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"python -m eqlosses_d2.evaluation: error: {tmp_path / 'missing.json'}: No such file or directory")


def test_arrays_with_ids_outside_the_lookup_tables_evaluate_as_dicts(files):
    """The fast id counts and category lookups (bincount, tables) fall back to numpy's sorts
    for negative or huge ids: the same metrics as the dicts either way."""
    annotations, _, results = files
    odd = [dict(r) for r in results]
    odd[0]["category_id"] = -5  # unknown, negative
    odd[1]["category_id"] = 2**40  # unknown, beyond any table
    for predictions in (results, odd):
        boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in predictions]
        arrays = ResultArrays.from_dicts(boxes)
        arrays.boxes, arrays.scores = (np.array([r["bbox"] for r in boxes]),
                                       np.array([r["score"] for r in boxes]))  # float64, as read from json
        for max_dets in (300, 2):  # 2: the per-image cap cuts
            expected = evaluate_lvis(annotations, boxes, "bbox", max_dets_per_image=max_dets)
            got = evaluate_lvis(annotations, arrays, "bbox", max_dets_per_image=max_dets)
            assert all((math.isnan(v) and math.isnan(got[k])) or v == got[k] for k, v in expected.items())
