"""The image classifier through train_net.py: a few iterations on the tiny embedded
classification set, evaluation (the same numbers from --eval-only on the final checkpoint), the
class statistics in the checkpoint, and an exact --resume (weights, BatchNorm statistics,
Softmax-EQL's state, the class-aware sampler's position)."""
import json
import math

import pytest
import torch

import train_net
from eqlosses_d2.classification.data import TINY_CLS_SPEC, register_synthetic_classification
from eqlosses_d2.classification.data.synthetic import train_counts
from resume_helpers import resume_and_compare

CONFIG = "configs/quickstart/softmax_R18_synthetic_cls.yaml"


@pytest.fixture(scope="session")
def tiny_cls(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_cls"))
    train, val, test = register_synthetic_classification("pytest_cls_tiny", TINY_CLS_SPEC, root=root)
    return {"train": train, "test": test}


def _opts(data, out, max_iter=4, **extra):
    opts = [
        "DATASETS.TRAIN", f"('{data['train']}',)",
        "DATASETS.TEST", f"('{data['test']}',)",
        "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(TINY_CLS_SPEC.num_classes),
        "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.WARMUP_ITERS", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "1",
        "OUTPUT_DIR", str(out),
    ]
    for key, value in extra.items():
        opts += [key, value]
    return opts


def _run(argv):
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    return train_net.main(args)


def test_train_then_eval_only(tiny_cls, tmp_path, capsys):
    out = tmp_path / "run"
    results = _run(["--config-file", CONFIG] + _opts(tiny_cls, out))
    metrics = results["classification"]
    assert set(metrics) == {"top1", "top5", "many", "medium", "few"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("top1", "top5"))
    assert "| dataset | top1 | top5 | many | medium | few |" in capsys.readouterr().out
    # the training counts are in the checkpoint (class statistics buffers)
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert state["class_stats.image_count"].tolist() == train_counts(TINY_CLS_SPEC).tolist()
    # per-class json
    per_class = json.loads((out / "inference" / tiny_cls["test"] / "classification_per_class.json").read_text())
    assert [r["train_images"] for r in per_class] == train_counts(TINY_CLS_SPEC).tolist()
    png = out / "inference" / tiny_cls["test"] / "classification_per_class.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --eval-only on the final checkpoint gives the same numbers
    again = _run(["--config-file", CONFIG, "--eval-only"] + _opts(tiny_cls, tmp_path / "eval") +
                 ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    for key, value in metrics.items():
        assert (math.isnan(value) and math.isnan(again["classification"][key])) or again["classification"][key] == value


def test_num_classes_mismatch_is_one_line(tiny_cls, tmp_path, capsys):
    argv = ["--config-file", CONFIG] + _opts(tiny_cls, tmp_path / "x") + ["MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", "7"]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "NUM_CLASSES=7 does not match dataset 'pytest_cls_tiny_train', which has 6 classes" in err


@pytest.mark.parametrize("loss, sampler", [("softmax_eql", "ClassBalancedTrainingSampler"),
                                           ("balanced_softmax", "TrainingSampler")])
def test_resume_matches_uninterrupted_run(loss, sampler, tiny_cls, tmp_path):
    def opts(out):
        return _opts(tiny_cls, out, max_iter=6, **{
            "SOLVER.CHECKPOINT_PERIOD": "3", "DATASETS.TEST": "()", "MODEL.EQLOSSES.CLASSIFICATION.LOSS": loss,
            "DATALOADER.SAMPLER_TRAIN": sampler})

    a, mid = resume_and_compare(_run, lambda out: ["--config-file", CONFIG] + opts(out), tmp_path)
    assert not torch.equal(mid["head.fc.weight"], a["model"]["head.fc.weight"])
    if loss == "softmax_eql":
        assert a["model"]["loss.pos_grad"].gt(mid["loss.pos_grad"]).any()
