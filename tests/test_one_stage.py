"""One-stage detectors (LongTailRetinaNet, LongTailFCOS) with the focal loss and EFL: they
train and evaluate on the tiny data, keep class statistics and EFL's state in the
checkpoint, log EFL's scalars, resume exactly and share EFL's state across two processes;
ATSS, the per-class top-k inference, the compat helpers and the config checks by hand."""
import json
import math
import os
import shutil

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import train_net
from eqlosses_d2 import add_eqlosses_config, compat
from eqlosses_d2.compat import launch
from eqlosses_d2.config import ConfigError, validate_one_stage
from eqlosses_d2.modeling.atss import atss_match

from test_training import _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs", "quickstart", "efl_retinanet_R18_FPN_synthetic.yaml")
FCOS = os.path.join(ROOT, "configs", "quickstart", "efl_fcos_R18_FPN_synthetic.yaml")


def _one_stage_opts(tiny_dataset, out, max_iter=3, loss="efl"):
    return _opts(tiny_dataset, out, max_iter=max_iter) + [
        "MODEL.RETINANET.NUM_CLASSES", str(tiny_dataset["spec"].num_categories),
        "MODEL.EQLOSSES.ONE_STAGE.LOSS", loss,
    ]


def _cfg(config_file, *opts):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "config_file, loss, assigner",
    [(RETINANET, "efl", "default"), (FCOS, "efl", "default"), (RETINANET, "focal", "atss"), (FCOS, "efl", "atss")],
    ids=["retinanet-efl", "fcos-efl", "retinanet-focal-atss", "fcos-efl-atss"],
)
def test_trains_and_evaluates(config_file, loss, assigner, tiny_dataset, tmp_path):
    opts = _one_stage_opts(tiny_dataset, tmp_path, loss=loss) + ["MODEL.EQLOSSES.ONE_STAGE.ASSIGNER", assigner]
    results = _run(["--config-file", config_file] + opts)
    assert set(results["bbox"]) >= {"AP", "AP50", "APr", "APc", "APf"}
    assert math.isnan(results["bbox"]["AP"]) or 0.0 <= results["bbox"]["AP"] <= 100.0
    state = _state(tmp_path / "model_final.pth")
    assert bool(state["class_stats.is_set"])
    if loss == "efl":
        assert state["cls_loss.gradient_stats.neg_grad"].dtype == torch.float64
        assert bool((state["cls_loss.gradient_stats.neg_grad"] > 0).all())
    with open(tmp_path / "metrics.json") as f:
        logged = set().union(*(json.loads(line) for line in f if line.strip()))
    assert "num_pos_anchors" in logged
    if loss == "efl":
        assert {"efl/gamma", "efl/gamma_r", "efl/gamma_c", "efl/gamma_f", "efl/pos_neg_ratio_r"} <= logged


def test_eval_only_round_trip_without_training_json(tiny_dataset, tmp_path):
    out = tmp_path / "train"
    results = _run(["--config-file", RETINANET] + _one_stage_opts(tiny_dataset, out, max_iter=4))
    opts = _one_stage_opts(tiny_dataset, tmp_path / "eval") + [
        "MODEL.EQLOSSES.CLASS_STATS_DATASET", "no_such_dataset", "MODEL.WEIGHTS", str(out / "model_final.pth"),
    ]
    again = _run(["--config-file", RETINANET, "--eval-only"] + opts)
    for key, value in results["bbox"].items():
        assert (math.isnan(value) and math.isnan(again["bbox"][key])) or value == pytest.approx(again["bbox"][key])


def test_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    def opts(out):
        return _one_stage_opts(tiny_dataset, out, max_iter=6) + ["SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()"]

    full = tmp_path / "full"
    _run(["--config-file", RETINANET] + opts(full))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    _run(["--config-file", RETINANET, "--resume"] + opts(resumed))
    a, b = _state(full / "model_final.pth"), _state(resumed / "model_final.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    mid = _state(full / "model_0000002.pth")
    assert not torch.equal(mid["cls_loss.gradient_stats.neg_grad"], a["cls_loss.gradient_stats.neg_grad"])


def _train_and_dump(argv, prefix, data_root, dump_dir):
    import detectron2.utils.comm as comm
    from eqlosses_d2.data import TINY_SPEC, register_synthetic_lvis

    register_synthetic_lvis(prefix, TINY_SPEC, root=data_root)  # a spawned process starts bare
    args = train_net.default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    trainer.resume_or_load(resume=False)
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               f"{dump_dir}/rank{comm.get_rank()}.pt")


def test_two_cpu_processes_share_efl_state(tiny_dataset, tmp_path):
    prefix = tiny_dataset["train"][: -len("_train")]
    opts = _one_stage_opts(tiny_dataset, tmp_path, max_iter=3) + ["DATASETS.TEST", "()"]
    argv = ["--config-file", RETINANET, "--num-gpus", "2"] + opts
    launch(_train_and_dump, 2, dist_url="auto", args=(argv, prefix, tiny_dataset["root"], str(tmp_path)))
    state0, state1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for key in state0:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # plain BatchNorm statistics are per process, as in Detectron2
        assert torch.equal(state0[key], state1[key]), key
    assert bool((state0["cls_loss.gradient_stats.neg_grad"] > 0).all())


# ----------------------------------------------------------------------------- pieces
def test_atss_by_hand():
    # one level of four 10x10 anchors in a row, a second level of one 40x40 anchor
    level0 = Boxes(torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]], dtype=torch.float32))
    level1 = Boxes(torch.tensor([[0, 0, 40, 40]], dtype=torch.float32))
    gt = Boxes(torch.tensor([[0, 0, 20, 10]], dtype=torch.float32))
    # top 2 per level by center distance: anchors 0, 1 (level 0) and 4 (level 1).
    # IoUs 0.5, 0.5, 0.125: mean 0.375, std 0.2165 -> threshold 0.5915: none passes; with
    # top 1 per level, candidates 0 (or 1) and 4 ...
    matched = atss_match([level0, level1], gt, topk=2)
    assert matched.tolist() == [-1, -1, -1, -1, -1]
    # a box that anchor 1 fits exactly: IoUs of candidates 1, 0/2, 4: 1.0, 0, 0.0625
    gt = Boxes(torch.tensor([[10, 0, 20, 10]], dtype=torch.float32))
    assert atss_match([level0, level1], gt, topk=2).tolist() == [-1, 0, -1, -1, -1]
    # two boxes claiming one anchor: the one of higher IoU keeps it
    gt = Boxes(torch.tensor([[10, 0, 20, 10], [8, 0, 22, 10]], dtype=torch.float32))
    assert atss_match([level0, level1], gt, topk=2)[1].item() == 0
    # no boxes
    assert atss_match([level0, level1], Boxes(torch.zeros(0, 4)), topk=2).tolist() == [-1] * 5


def test_per_class_topk_inference():
    cfg = _cfg(RETINANET, "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.EQLOSSES.ONE_STAGE.TEST_TOPK_PER_CLASS", "2",
               "TEST.DETECTIONS_PER_IMAGE", "5")
    model = build_model(cfg).eval()
    # 6 far-apart anchors on one level; class 0 scores high everywhere, class 2 low
    anchors = Boxes(torch.tensor([[100.0 * i, 0, 100.0 * i + 10, 10] for i in range(6)]))
    scores = torch.tensor([[0.9, 0.5, 0.01]] * 6) - torch.arange(6)[:, None] * 0.001
    deltas = torch.zeros(6, 4)
    result = model.inference_single_image([anchors], [scores], [deltas], (10, 600))
    # 2 per class (6 candidates), then the best 5 per image
    assert len(result) == 5
    assert result.pred_classes.tolist() == [0, 0, 1, 1, 2]
    assert result.scores[:2].tolist() == pytest.approx([0.9, 0.899])
    # Detectron2's candidate selection (top k over all classes) when it is 0
    model.test_topk_per_class = 0
    model.test_topk_candidates = 3
    assert model.inference_single_image([anchors], [scores], [deltas], (10, 600)).pred_classes.tolist() == [0, 0, 0]
    # no per-image cap (Fixed AP)
    model.test_topk_per_class, model.max_detections_per_image = 2, -1
    assert len(model.inference_single_image([anchors], [scores], [deltas], (10, 600))) == 6


def test_compat_helpers():
    norm = compat.dense_head_norm("GN")
    layer = norm(64) if callable(norm) else torch.nn.GroupNorm(32, 64)
    assert isinstance(layer, torch.nn.GroupNorm) and layer.num_groups == 32
    if callable(norm):  # this Detectron2 probes the norm with one channel
        assert norm(1).num_channels == 1
    assert compat.dense_head_norm("BN") == "BN"
    tensors = [torch.rand(3, 4)]
    assert compat.matched_boxes_as_tensors([Boxes(tensors[0])])[0] is tensors[0]
    assert compat.matched_boxes_as_tensors(tensors)[0] is tensors[0]
    model = build_model(_cfg(FCOS))
    anchors = [Boxes(torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8]]))]
    gt = [torch.tensor([[0.0, 0, 16, 8], [0.0, 0, 16, 8]])]
    # anchor points (4, 4) and (12, 4) in box (0, 0, 16, 8): l, t, r, b = 4, 4, 12, 4 and
    # 12, 4, 4, 4 -> sqrt(min/max(l, r) * min/max(t, b)) = sqrt(1/3) for both
    expected = torch.tensor([[math.sqrt(1 / 3), math.sqrt(1 / 3)]])
    torch.testing.assert_close(compat.fcos_centerness_targets(model, anchors, gt), expected)
    torch.testing.assert_close(compat.fcos_centerness_targets(model, anchors, [Boxes(gt[0])]), expected)


def test_checkpoint_keys_and_gn_head():
    for config_file in (RETINANET, FCOS):
        model = build_model(_cfg(config_file))
        keys = model.state_dict().keys()
        assert {"class_stats.image_count", "cls_loss.gradient_stats.pos_grad", "cls_loss.gradient_stats.neg_grad"} <= set(keys)
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules())


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.EQLOSSES.ONE_STAGE.LOSS", "nope"], "ONE_STAGE.LOSS: unknown loss 'nope'"),
        (["MODEL.EQLOSSES.ONE_STAGE.ASSIGNER", "nope"], "ONE_STAGE.ASSIGNER must be one of"),
        (["MODEL.EQLOSSES.ONE_STAGE.ATSS_TOPK", "0"], "ATSS_TOPK must be >= 1"),
        (["MODEL.EQLOSSES.ONE_STAGE.TEST_TOPK_PER_CLASS", "-1"], "TEST_TOPK_PER_CLASS must be >= 0"),
        (["MODEL.EQLOSSES.EFL.GAMMA", "0.0"], "MODEL.EQLOSSES.EFL.GAMMA"),
        (["MODEL.EQLOSSES.EFL.SCALE_FACTOR", "-1.0"], "MODEL.EQLOSSES.EFL.SCALE_FACTOR"),
        (["MODEL.RETINANET.FOCAL_LOSS_GAMMA", "3.0"], "not MODEL.RETINANET.FOCAL_LOSS_"),
        (["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal"], "not supported by LongTailRetinaNet"),
    ],
)
def test_bad_config_is_one_line(opts, message):
    cfg = _cfg(RETINANET, *opts)
    with pytest.raises(ConfigError) as e:
        validate_one_stage(cfg)
    assert "\n" not in str(e.value) and message in str(e.value)
