"""Semantic segmentation through train_net.py: a few iterations on the tiny embedded segmentation set
(the quickstart config, shrunk), evaluation with its mIoU table (the same numbers from --eval-only on
the final checkpoint), the training masks' per-class pixel and image counts in the checkpoint, an
exact --resume (weights, BatchNorm statistics, Softmax-EQL's gradient statistics, the sample stream),
the same on 2 gloo processes (Softmax-EQL's statistics equal on both ranks, resume exact per rank),
one-line errors, and every segmentation config merged, checked and its model built."""
import glob
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_net
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from eqlosses_d2.config import validate_config
from eqlosses_d2.segmentation.data import TINY_SEM_SEG_SPEC, register_synthetic_sem_seg
from resume_helpers import resume_and_compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/quickstart/softmax_sem_seg_synthetic.yaml"
SEM_SEG_CONFIGS = sorted(
    # Base-ADE20K.yaml: the data, input and solver both ADE20K families share (no head of its own)
    [p for p in glob.glob(os.path.join(ROOT, "configs", "ADE20K", "*.yaml")) if not p.endswith("Base-ADE20K.yaml")]
    + glob.glob(os.path.join(ROOT, "configs", "quickstart", "*sem_seg_synthetic.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "quickstart", "Base-Synthetic-SemSeg-*.yaml"))
)


@pytest.fixture(scope="session")
def tiny_seg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_sem_seg"))
    train, val = register_synthetic_sem_seg("pytest_seg_tiny", TINY_SEM_SEG_SPEC, root=root)
    return {"train": train, "val": val}


def _opts(data, out, max_iter=4, **extra):
    opts = [
        "DATASETS.TRAIN", f"('{data['train']}',)",
        "DATASETS.TEST", f"('{data['val']}',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(TINY_SEM_SEG_SPEC.num_classes),
        "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)",
        "INPUT.CROP.SIZE", "(64, 64)",
        "INPUT.MIN_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "4",
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


def _mask_counts(dataset):
    """Per-class labelled pixels and images of a split, read from its masks here."""
    num_classes = TINY_SEM_SEG_SPEC.num_classes
    pixels, images = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    for record in DatasetCatalog.get(dataset):
        labels = np.asarray(Image.open(record["sem_seg_file_name"]))
        counts = np.bincount(labels[labels != 255].ravel(), minlength=num_classes)
        pixels += counts
        images += counts > 0
    return pixels, images


def test_train_then_eval_only(tiny_seg, tmp_path, capsys):
    out = tmp_path / "run"
    results = _run(["--config-file", CONFIG] + _opts(tiny_seg, out))
    metrics = results["sem_seg"]
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert {"mIoU-r", "mIoU-c", "mIoU-f"} <= set(metrics)
    printed = capsys.readouterr().out  # the table, after the evaluation
    assert "| dataset | mIoU | mIoU-r | mIoU-c | mIoU-f | fwIoU | mACC | pACC |" in printed
    assert f"| {tiny_seg['val']} | {metrics['mIoU']:.2f} |" in printed
    # the training masks' counts are in the checkpoint (the head's class statistics buffers)
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    pixels, images = _mask_counts(tiny_seg["train"])
    assert state["sem_seg_head.class_stats.pixel_count"].tolist() == pixels.tolist()
    assert state["sem_seg_head.class_stats.image_count"].tolist() == images.tolist()
    assert bool(state["sem_seg_head.class_stats.is_set"])
    assert int(state["sem_seg_head.class_stats.num_images"]) == TINY_SEM_SEG_SPEC.num_train_images
    # frequency groups from MODEL.EQLOSSES.SEM_SEG.RARE_MAX_IMAGES / COMMON_MAX_IMAGES (10 / 100): 0 r, 1 c, 2 f
    expected_groups = [0 if n <= 10 else (1 if n <= 100 else 2) for n in images]
    assert state["sem_seg_head.class_stats.frequency_group"].tolist() == expected_groups
    # --eval-only on the final checkpoint gives the same numbers
    again = _run(["--config-file", CONFIG, "--eval-only"] + _opts(tiny_seg, tmp_path / "eval") +
                 ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    for key, value in metrics.items():
        theirs = again["sem_seg"][key]
        assert (isinstance(value, float) and math.isnan(value) and math.isnan(theirs)) or theirs == value, key


def test_eval_only_refuses_a_predictor_of_another_num_classes(tiny_seg, tmp_path, capsys):
    """A checkpoint whose segmentation predictor has other classes would leave it random: one line, no output."""
    out = tmp_path / "run"
    _run(["--config-file", CONFIG] + _opts(tiny_seg, out, max_iter=1))
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    for key in ("sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"):
        checkpoint["model"][key] = torch.cat([checkpoint["model"][key], checkpoint["model"][key][:3]])  # 3 classes more
    weights = tmp_path / "other_classes.pth"
    torch.save(checkpoint, weights)
    argv = ["--config-file", CONFIG, "--eval-only"] + _opts(tiny_seg, tmp_path / "eval") + ["MODEL.WEIGHTS", str(weights)]
    assert train_net.cli(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(weights) in err and "2 parameter(s) of the semantic segmentation predictor" in err
    assert "sem_seg_head.predictor.weight" in err and "another NUM_CLASSES" in err
    assert not os.path.exists(tmp_path / "eval" / "inference")


def test_deeplab_quickstart_trains_on_sizes_not_divisible_by_its_stride(tiny_seg, tmp_path, capsys):
    """The DeepLabV3+ variant (a ResNet without size divisibility): 50 and 62 px training images give
    logits of 52 and 64 px, cropped to the targets; evaluation on 64 px images."""
    config = "configs/quickstart/deeplab_softmax_sem_seg_synthetic.yaml"
    results = _run(["--config-file", config] + _opts(tiny_seg, tmp_path / "dl", max_iter=3, **{
        "INPUT.MIN_SIZE_TRAIN": "(50, 62)", "INPUT.CROP.ENABLED": "False"}))
    assert 0.0 <= results["sem_seg"]["mIoU"] <= 100.0
    state = torch.load(tmp_path / "dl" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert "sem_seg_head.aspp.convs.0.weight" in state and bool(state["sem_seg_head.class_stats.is_set"])


def test_num_classes_mismatch_is_one_line(tiny_seg, tmp_path, capsys):
    argv = ["--config-file", CONFIG] + _opts(tiny_seg, tmp_path / "x") + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7"]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "MODEL.SEM_SEG_HEAD.NUM_CLASSES=7 does not match dataset 'pytest_seg_tiny_train', which has 8 classes" in err


def test_ignore_value_mismatch_is_one_line(tiny_seg, tmp_path, capsys):
    argv = ["--config-file", CONFIG] + _opts(tiny_seg, tmp_path / "x") + ["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "0"]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "MODEL.SEM_SEG_HEAD.IGNORE_VALUE=0 does not match dataset 'pytest_seg_tiny_train', " \
           "whose ignore label is 255" in err


@pytest.mark.parametrize("loss", ["softmax_eql", "softmax"])
def test_resume_matches_uninterrupted_run(loss, tiny_seg, tmp_path):
    def opts(out):
        return _opts(tiny_seg, out, max_iter=6, **{
            "SOLVER.CHECKPOINT_PERIOD": "3", "DATASETS.TEST": "()", "MODEL.EQLOSSES.SEM_SEG.LOSS": loss})

    a, mid = resume_and_compare(_run, lambda out: ["--config-file", CONFIG] + opts(out), tmp_path)
    assert not torch.equal(mid["sem_seg_head.predictor.weight"], a["model"]["sem_seg_head.predictor.weight"])
    assert not torch.equal(mid["backbone.bottom_up.res2.0.conv1.norm.running_mean"],
                           a["model"]["backbone.bottom_up.res2.0.conv1.norm.running_mean"])
    if loss == "softmax_eql":
        assert a["model"]["sem_seg_head.loss.pos_grad"].dtype == torch.float64
        assert a["model"]["sem_seg_head.loss.pos_grad"].gt(mid["sem_seg_head.loss.pos_grad"]).any()


@pytest.mark.parametrize("path", SEM_SEG_CONFIGS, ids=[os.path.relpath(p, ROOT) for p in SEM_SEG_CONFIGS])
def test_config_merges_checks_and_builds(path):
    args = train_net.default_argument_parser().parse_args(["--config-file", path, "MODEL.DEVICE", "cpu"])
    cfg = train_net.setup_cfg(args)
    assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
    cfg.defrost()
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.FPN):
        if node.NORM == "SyncBN":  # SyncBN needs a process group to run, not to build; BN builds the same shapes
            node.NORM = "BN"
    validate_config(cfg)
    model = build_model(cfg)
    head = model.sem_seg_head
    assert type(head).__name__ == cfg.MODEL.SEM_SEG_HEAD.NAME
    assert head.loss.name == cfg.MODEL.EQLOSSES.SEM_SEG.LOSS
    assert head.predictor.out_channels == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if "ADE20K" in path:
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 and cfg.SOLVER.IMS_PER_BATCH == 16
        assert tuple(cfg.INPUT.CROP.SIZE) == (512, 512) and cfg.SOLVER.MAX_ITER == 160000


WORLD_SIZE = 2


def _ddp_train(argv):
    """One rank: train (or resume) and return this rank's model state."""
    args = train_net.default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    model = getattr(trainer.model, "module", trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_study(opts, data_root, out_dir):
    """Every rank: the full 4-iteration run, then the run resumed after iteration 2 (period 2)."""
    import pathlib

    import detectron2.utils.comm as comm

    register_synthetic_sem_seg("pytest_seg_tiny", TINY_SEM_SEG_SPEC, root=data_root)  # a spawned process starts bare
    out = pathlib.Path(out_dir)
    rank = comm.get_rank()

    def argv(directory, resume=False):
        return (["--config-file", CONFIG, "--num-gpus", str(WORLD_SIZE)] + (["--resume"] if resume else [])
                + opts + ["OUTPUT_DIR", str(directory)])

    results = {"full": _ddp_train(argv(out / "full"))}
    if rank == 0:
        (out / "resumed").mkdir()
        for f in os.listdir(out / "full"):
            if f.startswith("model_0000001.pth"):  # the checkpoint and rank 1's state beside it
                shutil.copy(out / "full" / f, out / "resumed" / f)
        (out / "resumed" / "last_checkpoint").write_text("model_0000001.pth")
    comm.synchronize()
    results["resumed"] = _ddp_train(argv(out / "resumed", resume=True))
    torch.save(results, out / f"rank{rank}.pt")


def test_ddp_softmax_eql_state_is_global_and_resume_exact_per_rank(tiny_seg, tmp_path):
    """2 gloo processes, Softmax-EQL: the gradient statistics and class statistics are the same on both
    ranks (summed over processes) while each rank's BatchNorm statistics are its own; a run resumed after
    iteration 2 ends with each rank's state equal to the uninterrupted run's."""
    from eqlosses_d2.compat import launch

    opts = _opts(tiny_seg, tmp_path, max_iter=4, **{
        "SOLVER.CHECKPOINT_PERIOD": "2", "DATASETS.TEST": "()", "MODEL.EQLOSSES.SEM_SEG.LOSS": "softmax_eql"})
    opts = opts[: opts.index("OUTPUT_DIR")] + opts[opts.index("OUTPUT_DIR") + 2:]
    data_root = MetadataCatalog.get(tiny_seg["train"]).sem_seg_data_root
    launch(_ddp_study, WORLD_SIZE, dist_url="auto", args=(opts, data_root, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        for key in result["full"]:
            assert torch.equal(result["full"][key], result["resumed"][key]), (rank, key)
    a, b = ranks[0]["full"], ranks[1]["full"]
    for key in ("sem_seg_head.loss.pos_grad", "sem_seg_head.loss.neg_grad", "sem_seg_head.class_stats.pixel_count",
                "sem_seg_head.predictor.weight"):
        assert torch.equal(a[key], b[key]), key
    assert a["sem_seg_head.loss.pos_grad"].gt(0).any()
    bn = "backbone.bottom_up.res2.0.conv1.norm.running_mean"
    assert not torch.equal(a[bn], b[bn])  # each rank's own batches (DDP does not broadcast buffers)
