"""Faults and bad input with the real train_net.py on the tiny data (issue 23): each is one
line naming the file (and the annotation) at fault, found before OUTPUT_DIR is written, and
no run trains or scores the wrong thing; a kill while model_final.pth is written still
leaves a run that ends with it; killed writes leave no temporaries behind and a renamed
checkpoint is flushed with its directory."""
import contextlib
import json
import logging
import os
import shutil
import stat

import pytest
import torch

import train_net

from test_training import QUICKSTART, _assert_same, _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs", "quickstart", "efl_retinanet_R18_FPN_synthetic.yaml")
MAX_ITER, PERIOD = 4, 2  # checkpoints after iterations 1 and 3; model_final after 3


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_opts(tiny_dataset, out, max_iter=MAX_ITER):
    return _opts(tiny_dataset, out, max_iter=max_iter) + [
        "SOLVER.CHECKPOINT_PERIOD", str(PERIOD), "DATASETS.TEST", "()", "SOLVER.WARMUP_ITERS", "2",
    ]


@pytest.fixture(scope="module")
def full_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted run: MAX_ITER 4, a checkpoint every 2 iterations."""
    out = tmp_path_factory.mktemp("full")
    _run(["--config-file", QUICKSTART] + _train_opts(tiny_dataset, out))
    yield out
    shutil.rmtree(out, ignore_errors=True)  # ~300 MB of checkpoints


def _cli(argv, capsys):
    """train_net.py's exit status and its stderr, which must be one line on an error."""
    capsys.readouterr()
    status = train_net.cli(argv)
    err = capsys.readouterr().err.strip()
    if status:
        # exactly one error line, which holds the whole message (other lines on stderr: warnings
        # of torch, and logging's complaints about handlers an earlier test left on a closed stream)
        lines = [line for line in err.splitlines() if line.startswith("train_net.py: error:")]
        assert len(lines) == 1, err
        err = lines[0]
    return status, err


def _assert_error(argv, capsys, *expected):
    status, err = _cli(argv, capsys)
    assert status == 2, err
    for text in expected:
        assert text in err, (text, err)
    return err


def _killed_before_model_final(full_run, out):
    """OUTPUT_DIR as a kill leaves it between the last periodic checkpoint and model_final.pth."""
    out.mkdir(parents=True, exist_ok=True)
    last = f"model_{MAX_ITER - 1:07d}.pth"
    shutil.copy(full_run / last, out / last)
    (out / "last_checkpoint").write_text(last)
    return last


# -- 1. a kill while model_final.pth is written ----------------------------------------------
def test_resume_at_max_iter_writes_model_final(full_run, tiny_dataset, tmp_path, caplog):
    out = tmp_path / "resumed"
    _killed_before_model_final(full_run, out)
    with caplog.at_level(logging.INFO, logger="eqlosses_d2"):
        _run(["--config-file", QUICKSTART, "--resume"] + _train_opts(tiny_dataset, out))
    assert any("Training is complete (iteration 4 of SOLVER.MAX_ITER 4): wrote" in r.getMessage() for r in caplog.records)
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    # the model_final.pth the uninterrupted run wrote, its per-rank state included
    expected, written = _load(full_run / "model_final.pth"), _load(out / "model_final.pth")
    assert written["iteration"] == expected["iteration"] == MAX_ITER - 1
    assert written.keys() == expected.keys()
    _assert_same(expected, written, "model_final")
    assert written["rank_state"]["checkpoint"] == "model_final.pth"

    # resumed again, a finished run is left as it is
    before = os.stat(out / "model_final.pth").st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eqlosses_d2"):
        _run(["--config-file", QUICKSTART, "--resume"] + _train_opts(tiny_dataset, out))
    assert os.stat(out / "model_final.pth").st_mtime_ns == before
    assert any("the final weights are" in r.getMessage() and "model_final.pth" in r.getMessage() for r in caplog.records)


# -- 2. --eval-only of weights that do not fit ------------------------------------------------
def _eval_argv(tiny_dataset, out, weights, config=QUICKSTART):
    opts = _opts(tiny_dataset, out) + ["MODEL.WEIGHTS", str(weights)]
    if config == RETINANET:
        opts += ["MODEL.RETINANET.NUM_CLASSES", str(tiny_dataset["spec"].num_categories)]
    return ["--config-file", config, "--eval-only"] + opts


def test_eval_only_refuses_weights_of_another_num_classes(full_run, tiny_dataset, tmp_path, capsys):
    checkpoint = _load(full_run / "model_final.pth")
    model = checkpoint["model"]
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"):
        model[key] = torch.cat([model[key], model[key][:5]])  # 5 classes more
    weights = tmp_path / "other_classes.pth"
    torch.save(checkpoint, weights)
    _assert_error(
        _eval_argv(tiny_dataset, tmp_path / "eval", weights), capsys,
        str(weights), "2 parameter(s) of the box predictor", "roi_heads.box_predictor.cls_score.weight",
        "another NUM_CLASSES", "evaluation refuses it",
    )
    assert not os.path.exists(tmp_path / "eval" / "inference")  # nothing was scored


def test_eval_only_refuses_unrelated_weights(tiny_dataset, tmp_path, capsys):
    weights = tmp_path / "unrelated.pth"
    torch.save({"model": {"backbone.something": torch.zeros(3)}}, weights)
    _assert_error(
        _eval_argv(tiny_dataset, tmp_path / "eval", weights), capsys,
        str(weights), "box predictor and mask predictor", "absent from the checkpoint",
    )
    _assert_error(
        _eval_argv(tiny_dataset, tmp_path / "eval_retinanet", weights, config=RETINANET), capsys,
        str(weights), "of the one-stage head", "absent from the checkpoint",
    )


def test_training_from_weights_that_do_not_fit_still_fine_tunes(tiny_dataset, tmp_path):
    """Detectron2's fine-tuning behaviour is kept: mismatched layers start afresh, with its warning."""
    weights = tmp_path / "unrelated.pth"
    torch.save({"model": {"backbone.something": torch.zeros(3)}}, weights)
    out = tmp_path / "train"
    with _records("fvcore.common.checkpoint") as records:  # Detectron2's logging does not propagate it
        _run(["--config-file", QUICKSTART] + _train_opts(tiny_dataset, out, max_iter=1) + ["MODEL.WEIGHTS", str(weights)])
    assert os.path.isfile(out / "model_final.pth")
    assert any("Some model parameters or buffers are not found in the checkpoint" in r.getMessage() for r in records)


@contextlib.contextmanager
def _records(name):
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- 3. bad weights and resume tags, refused before OUTPUT_DIR is written -----------------------
@pytest.fixture(scope="module")
def bad_checkpoints(full_run, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_checkpoints")
    data = (full_run / "model_final.pth").read_bytes()
    (directory / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save([torch.zeros(2), torch.ones(2)], directory / "list.pth")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval_only"])
def test_bad_weights_are_one_line_and_write_nothing(bad_checkpoints, tiny_dataset, tmp_path, capsys, eval_only):
    out = tmp_path / "out"
    base = ["--config-file", QUICKSTART] + (["--eval-only"] if eval_only else []) + _train_opts(tiny_dataset, out)
    missing = tmp_path / "missing.pth"
    _assert_error(base + ["MODEL.WEIGHTS", str(missing)], capsys, "MODEL.WEIGHTS", "checkpoint not found", str(missing))
    truncated = bad_checkpoints / "truncated.pth"
    _assert_error(base + ["MODEL.WEIGHTS", str(truncated)], capsys, str(truncated), "truncated or not a checkpoint")
    holds_list = bad_checkpoints / "list.pth"
    _assert_error(base + ["MODEL.WEIGHTS", str(holds_list)], capsys, str(holds_list), "holds a list")
    assert not os.path.exists(out)  # no events file, no empty metrics.json, no config.yaml


def test_bad_resume_tags_are_one_line_and_write_nothing(bad_checkpoints, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    tag = out / "last_checkpoint"
    argv = ["--config-file", QUICKSTART, "--resume"] + _train_opts(tiny_dataset, out)
    tag.write_text("model_0000099.pth")
    _assert_error(argv, capsys, str(tag), "'model_0000099.pth'", "which is missing")
    shutil.copy(bad_checkpoints / "truncated.pth", out / "model_0000001.pth")
    tag.write_text("model_0000001.pth")
    _assert_error(argv, capsys, str(tag), str(out / "model_0000001.pth"), "truncated or not a checkpoint")
    _assert_error(argv[:2] + ["--eval-only"] + argv[2:], capsys, "truncated or not a checkpoint")
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000001.pth"]


# -- 4, 6, 7. malformed annotation files -------------------------------------------------------
def _tiny_json(tiny_dataset, split="train"):
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(tiny_dataset[split])
    with open(meta.json_file) as f:
        return json.load(f), meta.image_root


_REGISTERED = set()


def _register(name, tmp_path, content, image_root):
    """An LVIS-format dataset ``name`` whose annotation file holds ``content`` (text or a
    dict), registered as the project registers its own (Detectron2's LVIS loader)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.lvis import load_lvis_json

    path = tmp_path / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if name not in _REGISTERED:
        DatasetCatalog.register(name, lambda: load_lvis_json(str(path), image_root))
        MetadataCatalog.get(name).set(json_file=str(path), image_root=image_root, evaluator_type="lvis")
        _REGISTERED.add(name)
    return str(path)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))


def _data_argv(tiny_dataset, out, train=None, test=None):
    opts = _train_opts(tiny_dataset, out, max_iter=1)
    if train:
        opts += ["DATASETS.TRAIN", f"('{train}',)"]
    if test:
        opts += ["DATASETS.TEST", f"('{test}',)"]
    return ["--config-file", QUICKSTART] + opts


def test_malformed_annotation_files_are_one_line(tiny_dataset, tmp_path, capsys, own_cache):
    data, image_root = _tiny_json(tiny_dataset)
    out = tmp_path / "out"

    text = json.dumps(data)
    path = _register("pytest_faults_truncated", tmp_path, text[: len(text) // 2], image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_truncated"), capsys,
                  "dataset 'pytest_faults_truncated'", path, "not valid JSON")

    no_categories = {k: v for k, v in data.items() if k != "categories"}
    path = _register("pytest_faults_no_categories", tmp_path, no_categories, image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_no_categories"), capsys,
                  "dataset 'pytest_faults_no_categories'", path, "no 'categories' list")

    unknown = json.loads(text)
    unknown["annotations"][7]["category_id"] = 999
    ann_id = unknown["annotations"][7]["id"]
    path = _register("pytest_faults_unknown_category", tmp_path, unknown, image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_unknown_category"), capsys,
                  "dataset 'pytest_faults_unknown_category'", path, f"annotation {ann_id} has unknown category_id 999")
    assert not os.path.exists(out)


def test_short_polygon_is_one_line(tiny_dataset, tmp_path, capsys, own_cache):
    data, image_root = _tiny_json(tiny_dataset)
    out = tmp_path / "out"

    data["annotations"][3]["segmentation"].append([1.0, 2.0, 3.0, 4.0])  # 2 points
    ann = data["annotations"][3]
    path = _register("pytest_faults_polygon", tmp_path, data, image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_polygon"), capsys,
                  "dataset 'pytest_faults_polygon'", path, f"annotation {ann['id']} (image {ann['image_id']})",
                  "polygon of 4 coordinates")
    assert not os.path.exists(out)


def test_empty_test_set_is_one_line(tiny_dataset, tmp_path, capsys, own_cache):
    out = tmp_path / "out"
    val, val_root = _tiny_json(tiny_dataset, "val")
    empty = dict(val, images=[], annotations=[])
    path = _register("pytest_faults_empty_val", tmp_path, empty, val_root)
    _assert_error(_data_argv(tiny_dataset, out, test="pytest_faults_empty_val"), capsys,
                  "dataset 'pytest_faults_empty_val'", path, "has no images")
    assert not os.path.exists(out)


def test_training_set_without_annotations_is_one_line(tiny_dataset, tmp_path, capsys, own_cache):
    data, image_root = _tiny_json(tiny_dataset)
    out = tmp_path / "out"
    path = _register("pytest_faults_no_annotations", tmp_path, dict(data, annotations=[]), image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_no_annotations"), capsys,
                  "dataset 'pytest_faults_no_annotations'", path, "no image with an annotation to train on")
    assert not os.path.exists(out)


def test_negative_size_boxes_are_refused_in_training_and_statistics(tiny_dataset, tmp_path, capsys, own_cache):
    from eqlosses_d2.data import load_class_statistics

    data, image_root = _tiny_json(tiny_dataset)
    ann = data["annotations"][11]
    ann["bbox"][2] = -5.0
    out = tmp_path / "out"
    path = _register("pytest_faults_negative_box", tmp_path, data, image_root)
    _assert_error(_data_argv(tiny_dataset, out, "pytest_faults_negative_box"), capsys,
                  "dataset 'pytest_faults_negative_box'", path, f"annotation {ann['id']} (image {ann['image_id']})",
                  "negative size")
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match=f"{path}: annotation {ann['id']} .*negative size"):
        load_class_statistics(path)


def test_coco_files_keep_short_polygons(tmp_path, own_cache):
    """Detectron2's COCO loader drops instances without a valid polygon itself: no refusal there."""
    from eqlosses_d2.data import compute_class_statistics

    data = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 1, 1]]}],
    }
    assert compute_class_statistics(data).instance_count.tolist() == [1]
    with pytest.raises(ValueError, match="annotation 1 .image 1. has a polygon of 4 coordinates"):
        compute_class_statistics(data, lvis_polygons=True)


# -- 8. temporaries of killed writes, and the directory flushed after a rename -------------------
def test_training_start_removes_stale_temporaries(full_run, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    _killed_before_model_final(full_run, out)
    stale = [".model_final.pth.k2j4x9.part", ".model_0000001.pth.rank1.a8b7c6.part", ".last_checkpoint.zz1.part"]
    for name in stale:
        (out / name).write_bytes(b"x" * 1000)
    kept = [".notes.txt.abc.part", "results.part", "model_0000003.pth.part"]  # not this writer's temporaries
    for name in kept:
        (out / name).write_bytes(b"y")
    _run(["--config-file", QUICKSTART, "--resume"] + _train_opts(tiny_dataset, out))
    names = set(os.listdir(out))
    assert not names & set(stale)
    assert set(kept) <= names and "model_final.pth" in names


def test_atomic_write_flushes_the_directory_after_the_rename(tmp_path, monkeypatch):
    from eqlosses_d2 import atomic

    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        flushed.append(("dir" if stat.S_ISDIR(mode) else "file", (tmp_path / "a.bin").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic.atomic_write(str(tmp_path / "a.bin"), lambda f: f.write(b"abc"))
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    # the file before its rename, then its directory after it
    assert flushed == [("file", False), ("dir", True)]
