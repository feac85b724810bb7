"""End to end on the tiny synthetic data: train an instant schedule, evaluate, save,
reload with --eval-only and get the same numbers; bad input fails in one line."""
import math
import os
import shutil

import pytest
import torch

import train_net
from eqlosses_d2 import find_class_stats, get_class_statistics

QUICKSTART = os.path.join(train_net.__file__.rsplit(os.sep, 1)[0], "configs", "quickstart",
                          "mask_rcnn_R18_FPN_synthetic.yaml")


def _opts(tiny_dataset, output_dir, max_iter=20):
    spec = tiny_dataset["spec"]
    return [
        "DATASETS.TRAIN", f"('{tiny_dataset['train']}',)",
        "DATASETS.TEST", f"('{tiny_dataset['val']}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(spec.num_categories),
        "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TRAIN", f"({spec.image_size},)",
        "INPUT.MAX_SIZE_TRAIN", str(spec.image_size),
        "INPUT.MIN_SIZE_TEST", str(spec.image_size),
        "INPUT.MAX_SIZE_TEST", str(spec.image_size),
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "5",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "1",
        "OUTPUT_DIR", str(output_dir),
    ]


def _assert_same(a, b, what):
    """Equal nested dicts / lists / tensors (``torch.equal``), ``what`` naming the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            _assert_same(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def _run(argv):
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    return train_net.main(args)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    results = _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, out))
    yield out, results
    shutil.rmtree(out, ignore_errors=True)  # checkpoints of ~100 MB each


def _assert_lvis_results(results):
    for task in ("bbox", "segm"):
        assert set(["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]) <= set(results[task])
        ap = results[task]["AP"]
        assert not math.isnan(ap) and 0.0 <= ap <= 100.0


def test_train_and_evaluate(trained, tiny_dataset):
    out, results = trained
    _assert_lvis_results(results)
    assert os.path.isfile(out / "model_final.pth")
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p for p in os.listdir(out) if p.endswith(".part")]
    # the checkpoint carries the training set's class statistics
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    stats = get_class_statistics(tiny_dataset["train"])
    assert state["roi_heads.class_stats.image_count"].tolist() == stats.image_count.tolist()
    assert state["roi_heads.class_stats.instance_count"].tolist() == stats.instance_count.tolist()
    assert int(state["roi_heads.class_stats.num_images"]) == stats.num_images
    assert bool(state["roi_heads.class_stats.is_set"])


def test_eval_only_round_trip(trained, tiny_dataset, tmp_path):
    out, results = trained
    opts = _opts(tiny_dataset, tmp_path)
    # eval-only must not read the training json: point the stats dataset somewhere absent
    opts += ["MODEL.EQLOSSES.CLASS_STATS_DATASET", "no_such_dataset", "MODEL.WEIGHTS", str(out / "model_final.pth")]
    again = _run(["--config-file", QUICKSTART, "--eval-only"] + opts)
    for task in ("bbox", "segm"):
        for key, value in results[task].items():
            if math.isnan(value):
                assert math.isnan(again[task][key])
            else:
                assert again[task][key] == pytest.approx(value, abs=1e-9), (task, key)


def test_cli_errors_are_one_line(tiny_dataset, tmp_path, capsys):
    def error(argv):
        assert train_net.cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("train_net.py: error:") and "\n" not in err
        return err

    base = ["--config-file", QUICKSTART] + _opts(tiny_dataset, tmp_path)
    assert "MODEL.NOT_A_KEY" in error(base + ["MODEL.NOT_A_KEY", "1"])
    err = error(base + ["MODEL.ROI_HEADS.NUM_CLASSES", "7"])
    assert "MODEL.ROI_HEADS.NUM_CLASSES=7" in err and tiny_dataset["train"] in err
    assert "not registered" in error(base + ["DATASETS.TRAIN", "('no_such_dataset',)"])
    err = error(base + ["--eval-only", "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    assert "MODEL.WEIGHTS" in err and "missing.pth" in err


def test_missing_data_directory_is_one_line(tmp_path, capsys):
    from detectron2.data.datasets import register_lvis_instances

    register_lvis_instances("pytest_missing_lvis", {}, str(tmp_path / "lvis" / "train.json"), str(tmp_path))
    argv = ["--config-file", QUICKSTART, "DATASETS.TRAIN", "('pytest_missing_lvis',)",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "pytest_missing_lvis" in err and "train.json not found" in err and "\n" not in err


def test_dataset_without_statistics(tmp_path):
    from detectron2.data import DatasetCatalog

    from eqlosses_d2.data import DatasetError

    DatasetCatalog.register("pytest_no_json", lambda: [])
    with pytest.raises(DatasetError, match="pytest_no_json.*per-class statistics"):
        get_class_statistics("pytest_no_json")


def test_model_without_statistics_refuses_methods_that_need_them():
    from eqlosses_d2 import ClassStatsBuffers

    with pytest.raises(RuntimeError, match="EQL needs per-class statistics"):
        ClassStatsBuffers(3).require("EQL")
