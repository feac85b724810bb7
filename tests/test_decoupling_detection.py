"""Decoupling for detection (Kang et al. 2020) in the RoI box predictor: the LWS layer's logits and
scale gradients against hand-derived float64 values; LWS on a stage-1 checkpoint computes the stage-1
logits; cRT's classifier left out of a stage-1 checkpoint (standard and cascade heads) and loaded
from a stage-2 one; the scales' checkpoint round trip; the config errors; and, end to end on the
tiny set from a stage-1 model trained here for 2 iterations, each quickstart config for 5 iterations:
only the intended parameters get gradients and change, every other parameter bit-for-bit the
stage-1 model's."""
import os

import pytest
import torch
from torch.nn import functional as F

import train_net
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import ConfigError, merge_config_file, merge_config_list, validate_config
from eqlosses_d2.modeling import LearnableWeightScaling, LongTailOutputLayers

from test_training import QUICKSTART, _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRT = os.path.join(ROOT, "configs", "quickstart", "crt_mask_rcnn_R18_FPN_synthetic.yaml")
LWS = os.path.join(ROOT, "configs", "quickstart", "lws_mask_rcnn_R18_FPN_synthetic.yaml")
LVIS_CRT = os.path.join(ROOT, "configs", "LVISv1-InstanceSegmentation", "crt_mask_rcnn_R_50_FPN_1x_finetune.yaml")
LVIS_LWS = os.path.join(ROOT, "configs", "LVISv1-InstanceSegmentation", "lws_mask_rcnn_R_50_FPN_1x_finetune.yaml")


def _cfg(config=QUICKSTART, opts=()):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    merge_config_list(cfg, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "4"] + list(opts))
    return cfg


def _model(config=QUICKSTART, opts=(), seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(config, opts)).eval()


# -- the LWS layer against hand-derived values ------------------------------------------------------


def _layer(seed=0, k=4, d=3, n=5):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    scales = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    layer = LearnableWeightScaling(d, k).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.scales.copy_(scales)
    return layer, weight, bias, scales, x


def test_lws_logits_and_gradients_by_hand():
    """z_nk = f_k (Σ_d w_kd x_nd + b_k); with L = CE(z, y) (mean over n):
    ∂L/∂f_k = Σ_n (p_nk − y_nk)/N · (w_k·x_n + b_k), ∂L/∂x_nd = Σ_k (p_nk − y_nk)/N · f_k w_kd;
    W and b get no gradient."""
    layer, weight, bias, scales, x = _layer()
    x.requires_grad_(True)
    labels = torch.tensor([0, 3, 1, 3, 2])
    n, k, d = x.shape[0], weight.shape[0], weight.shape[1]
    z = layer(x)
    # logits, by loops
    frozen = [[sum(weight[j, i].item() * x[m, i].item() for i in range(d)) + bias[j].item() for j in range(k)]
              for m in range(n)]
    expected = torch.tensor([[scales[j].item() * frozen[m][j] for j in range(k)] for m in range(n)], dtype=torch.float64)
    assert torch.allclose(z.detach(), expected, rtol=0, atol=1e-12)
    loss = F.cross_entropy(z, labels)
    loss.backward()
    # softmax by hand
    import math

    probs = []
    for m in range(n):
        row = [expected[m, j].item() for j in range(k)]
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        probs.append([e / sum(exps) for e in exps])
    delta = [[(probs[m][j] - (1.0 if labels[m].item() == j else 0.0)) / n for j in range(k)] for m in range(n)]
    grad_scales = torch.tensor([sum(delta[m][j] * frozen[m][j] for m in range(n)) for j in range(k)], dtype=torch.float64)
    grad_x = torch.tensor(
        [[sum(delta[m][j] * scales[j].item() * weight[j, i].item() for j in range(k)) for i in range(d)] for m in range(n)],
        dtype=torch.float64,
    )
    assert torch.allclose(layer.scales.grad, grad_scales, rtol=0, atol=1e-12)
    assert torch.allclose(x.grad, grad_x, rtol=0, atol=1e-12)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_lws_weights_stay_frozen_even_when_marked_trainable():
    """``requires_grad`` on (as a TRAINABLE_MODULES prefix naming the whole layer would set it):
    W and b are detached in forward, so they still get no gradient."""
    layer, *_, x = _layer(seed=1)
    layer.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None and layer.scales.grad is not None


def test_lws_finite_difference_gradient():
    layer, *_, x = _layer(seed=2)
    labels = torch.tensor([1, 1, 0, 2, 3])
    F.cross_entropy(layer(x), labels).backward()
    eps = 1e-6
    for j in range(4):
        with torch.no_grad():
            layer.scales[j] += eps
            up = F.cross_entropy(layer(x), labels).item()
            layer.scales[j] -= 2 * eps
            down = F.cross_entropy(layer(x), labels).item()
            layer.scales[j] += eps
        assert abs((up - down) / (2 * eps) - layer.scales.grad[j].item()) < 1e-8


def test_lws_from_linear():
    linear = torch.nn.Linear(3, 4)
    layer = LearnableWeightScaling.from_linear(linear)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.scales, torch.ones(4))
    x = torch.randn(6, 3)
    assert torch.equal(layer(x), linear(x))


# -- the box predictor ------------------------------------------------------------------------------


def _predictors(model):
    predictor = model.roi_heads.box_predictor
    return list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_lws_predictor_on_a_stage1_checkpoint_computes_the_stage1_logits(loss, tmp_path):
    """An LWS model loaded from a stage-1 checkpoint: W, b are stage 1's, the scales (absent there)
    are 1, one per classifier output (C + 1 for softmax, background included; C for sigmoid), and
    the predictor's scores equal the stage-1 model's."""
    stage1 = _model(opts=["MODEL.EQLOSSES.LOSS", loss], seed=0)
    DetectionCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")
    lws = _model(opts=["MODEL.EQLOSSES.LOSS", loss, "MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws"], seed=1)
    DetectionCheckpointer(lws).load(str(tmp_path / "stage1.pth"))
    predictor, reference = lws.roi_heads.box_predictor, stage1.roi_heads.box_predictor
    assert isinstance(predictor.cls_score, LearnableWeightScaling)
    assert torch.equal(predictor.cls_score.weight, reference.cls_score.weight)
    assert torch.equal(predictor.cls_score.bias, reference.cls_score.bias)
    num_logits = 5 if loss == "softmax" else 4
    assert torch.equal(predictor.cls_score.scales, torch.ones(num_logits))
    features = torch.randn(7, predictor.cls_score.in_features)
    scores, deltas = predictor(features)
    ref_scores, ref_deltas = reference(features)
    assert torch.equal(scores, ref_scores) and torch.equal(deltas, ref_deltas)


def test_lws_cascade_stages_on_a_stage1_checkpoint(tmp_path):
    """Each cascade stage's classifier is an LWS layer with stage 1's W, b and scales 1; every stage's
    scores equal stage 1's."""
    opts = ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]
    stage1 = _model(opts=opts, seed=0)
    DetectionCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")
    lws = _model(opts=opts + ["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws"], seed=1)
    DetectionCheckpointer(lws).load(str(tmp_path / "stage1.pth"))
    assert len(_predictors(lws)) == 3
    for predictor, reference in zip(_predictors(lws), _predictors(stage1)):
        assert isinstance(predictor.cls_score, LearnableWeightScaling)
        assert torch.equal(predictor.cls_score.scales, torch.ones(5))
        features = torch.randn(4, predictor.cls_score.in_features)
        assert torch.equal(predictor(features)[0], reference(features)[0])


def test_lws_scales_checkpoint_round_trip(tmp_path):
    opts = ["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws"]
    model = _model(opts=opts, seed=0)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.scales.copy_(torch.tensor([0.5, 1.5, 2.0, 0.25, 1.125]))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("lws")
    saved = torch.load(tmp_path / "lws.pth", map_location="cpu", weights_only=True)["model"]
    assert "roi_heads.box_predictor.cls_score.scales" in saved
    again = _model(opts=opts, seed=1)
    DetectionCheckpointer(again).load(str(tmp_path / "lws.pth"))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


@pytest.mark.parametrize("head", ["LongTailStandardROIHeads", "LongTailCascadeROIHeads"])
def test_crt_leaves_the_stage1_classifier_out_and_loads_a_stage2_one(head, tmp_path):
    """cRT on a stage-1 checkpoint: every parameter and buffer is stage 1's except ``cls_score``
    (of each cascade stage), which keeps the fresh initialisation of the model just built (seed 1),
    not stage 1's (seed 0). A checkpoint of the cRT model (with ``retrained_classifier``) loads whole."""
    opts = ["MODEL.ROI_HEADS.NAME", head]
    if head == "LongTailCascadeROIHeads":
        opts += ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]
    crt_opts = opts + ["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"]
    stage1 = _model(opts=opts, seed=0)
    with torch.no_grad():  # a trained classifier's bias is not the fresh one's zeros
        for predictor in _predictors(stage1):
            predictor.cls_score.bias.uniform_(-1.0, 1.0)
    DetectionCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")
    crt = _model(opts=crt_opts, seed=1)
    fresh = {k: v.clone() for k, v in crt.state_dict().items()}
    DetectionCheckpointer(crt).load(str(tmp_path / "stage1.pth"))
    reference = stage1.state_dict()
    classifier_keys = [k for k in fresh if ".cls_score." in k]
    assert len(classifier_keys) == 2 * len(_predictors(crt))
    for name, value in crt.state_dict().items():
        if name in classifier_keys:
            assert torch.equal(value, fresh[name]), name
            assert not torch.equal(value, reference[name]), name
        elif name.endswith("retrained_classifier"):
            assert bool(value)
        else:
            assert torch.equal(value, reference[name]), name
    # stage 2: its checkpoint has the marker, so a cRT model (another fresh classifier) loads all of it
    with torch.no_grad():
        for predictor in _predictors(crt):
            predictor.cls_score.weight.add_(1.0)
    DetectionCheckpointer(crt, save_dir=str(tmp_path)).save("stage2")
    saved = torch.load(tmp_path / "stage2.pth", map_location="cpu", weights_only=True)["model"]
    assert sum(k.endswith("retrained_classifier") for k in saved) == len(_predictors(crt))
    again = _model(opts=crt_opts, seed=2)
    DetectionCheckpointer(again).load(str(tmp_path / "stage2.pth"))
    for name, value in crt.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_crt_eval_only_refuses_a_stage1_checkpoint(tmp_path):
    """``--eval-only`` with a cRT config: a stage-1 checkpoint would leave the classifier random
    (refused, one line, as any predictor left unloaded); a stage-2 one loads whole."""
    from eqlosses_d2.checkpoint import AtomicCheckpointer, CheckpointError, check_predictors_loaded

    opts = ["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"]
    DetectionCheckpointer(_model(), save_dir=str(tmp_path)).save("stage1")
    DetectionCheckpointer(_model(opts=opts), save_dir=str(tmp_path)).save("stage2")
    model = _model(opts=opts, seed=1)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path / "eval"))
    checkpointer.resume_or_load(str(tmp_path / "stage1.pth"), resume=False)
    with pytest.raises(CheckpointError, match="roi_heads.box_predictor.cls_score"):
        check_predictors_loaded(model, checkpointer.incompatible, "stage1.pth")
    checkpointer.resume_or_load(str(tmp_path / "stage2.pth"), resume=False)
    check_predictors_loaded(model, checkpointer.incompatible, "stage2.pth")


def test_crt_classifier_initialisation_is_the_predictors():
    """The fresh cRT classifier is the predictor's own initialisation: N(0, 0.01²) weights, zero bias
    (softmax); the sigmoid loss's prior bias −log((1 − π)/π), π = 0.001."""
    predictor = _model(opts=["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"]).roi_heads.box_predictor
    weight = predictor.cls_score.weight
    assert torch.equal(predictor.cls_score.bias, torch.zeros(5))
    assert 0.005 < weight.std().item() < 0.015 and abs(weight.mean().item()) < 0.002
    sigmoid = _model(opts=["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True", "MODEL.EQLOSSES.LOSS", "sigmoid"])
    prior = -torch.log(torch.tensor((1 - 0.001) / 0.001))
    assert torch.allclose(sigmoid.roi_heads.box_predictor.cls_score.bias, prior.expand(4))


# -- two processes (gloo on the CPU) -----------------------------------------------------------------


def _ddp_worker(rank, tmp_dir):
    """Each rank builds the cRT model with its own seed (another fresh classifier, as Detectron2 seeds
    each rank), wraps it as ``DefaultTrainer`` does (``create_ddp_model``: DDP broadcasts rank 0's
    parameters), then loads the stage-1 checkpoint (``resume_or_load``, after the wrap). Then one SGD
    step of an LWS predictor on this rank's own features and labels."""
    import torch.distributed as dist
    from detectron2.engine.defaults import create_ddp_model
    from eqlosses_d2.modeling import restrict_trainable

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=2)
    try:
        crt = _model(opts=["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"], seed=10 + rank)
        fresh = crt.roi_heads.box_predictor.cls_score.weight.detach().clone()
        ddp = create_ddp_model(crt, broadcast_buffers=False, device_ids=None)  # as the CPU launch does
        DetectionCheckpointer(ddp).load(os.path.join(tmp_dir, "stage1.pth"))
        lws = _model(opts=["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws"], seed=20 + rank)
        DetectionCheckpointer(lws).load(os.path.join(tmp_dir, "stage1.pth"))
        predictor = lws.roi_heads.box_predictor.train()
        restrict_trainable(predictor, ["cls_score.scales"])
        ddp_predictor = create_ddp_model(predictor, broadcast_buffers=False, device_ids=None)
        features, labels = _rank_features(rank, predictor.cls_score.in_features)
        optimizer = torch.optim.SGD([predictor.cls_score.scales], lr=0.5)
        F.cross_entropy(ddp_predictor(features)[0], labels).backward()
        optimizer.step()
        torch.save({"fresh": fresh, "state": crt.state_dict(), "scales": predictor.cls_score.scales.detach().clone()},
                   os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_features(rank, dim):
    g = torch.Generator().manual_seed(100 + rank)
    num = 6 if rank == 0 else 3
    return torch.randn(num, dim, generator=g), torch.randint(0, 5, (num,), generator=g)


def test_two_processes_share_the_fresh_classifier_and_average_the_scale_gradients(tmp_path):
    """cRT: both ranks end with rank 0's fresh classifier and stage 1's other weights. LWS: after one
    step both ranks have the same scales, 1 − lr · (∇_0 + ∇_1)/2, each ∇_r the gradient of rank r's
    own mean cross-entropy, computed here in one process."""
    import torch.multiprocessing as mp

    stage1 = _model(seed=0)
    with torch.no_grad():
        stage1.roi_heads.box_predictor.cls_score.bias.uniform_(-1.0, 1.0)
    DetectionCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert not torch.equal(ranks[0]["fresh"], ranks[1]["fresh"])
    reference = stage1.state_dict()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
        if ".cls_score." not in name and not name.endswith("retrained_classifier"):
            assert torch.equal(value, reference[name]), name
    assert torch.equal(ranks[0]["state"]["roi_heads.box_predictor.cls_score.weight"], ranks[0]["fresh"])
    # LWS: the gradient each rank computes alone, averaged (DDP's all-reduce mean)
    lws = _model(opts=["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws"], seed=0)
    DetectionCheckpointer(lws).load(str(tmp_path / "stage1.pth"))
    layer = lws.roi_heads.box_predictor.cls_score
    grads = []
    for rank in range(2):
        layer.scales.grad = None
        features, labels = _rank_features(rank, layer.in_features)
        F.cross_entropy(layer(features), labels).backward()
        grads.append(layer.scales.grad.clone())
    expected = 1.0 - 0.5 * (grads[0] + grads[1]) / 2
    for rank in range(2):
        assert torch.allclose(ranks[rank]["scales"], expected, rtol=0, atol=1e-6)
    assert torch.equal(ranks[0]["scales"], ranks[1]["scales"])


# -- config ------------------------------------------------------------------------------------------


def _validate(opts, config=QUICKSTART):
    cfg = _cfg(config, opts)
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "tau"], "MODEL.EQLOSSES.DECOUPLING.CLASSIFIER must be one of default, lws, tde, vmf; got 'tau'"),
        (["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws", "MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"],
         "MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER re-initialises the classifier"),
        (["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws", "MODEL.EQLOSSES.COSINE_SCALE", "20.0"],
         "MODEL.EQLOSSES.COSINE_SCALE must be 0"),
        (["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws", "TEST.EQLOSSES.CALIBRATION.METHOD", "tau_norm"],
         "TEST.EQLOSSES.CALIBRATION.METHOD tau_norm reads the unscaled stage-1 weights"),
        (["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True", "MODEL.ROI_HEADS.NAME", "StandardROIHeads"],
         "MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER applies to the box predictor"),
    ],
)
def test_config_errors_are_one_line(opts, message):
    with pytest.raises(ConfigError) as info:
        _validate(opts)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_one_stage_config_refuses_decoupling():
    config = os.path.join(ROOT, "configs", "quickstart", "focal_retinanet_R18_FPN_synthetic.yaml")
    with pytest.raises(ConfigError, match="DECOUPLING.CLASSIFIER 'lws' applies to the box predictor"):
        _validate(["MODEL.EQLOSSES.DECOUPLING.CLASSIFIER", "lws", "MODEL.RETINANET.NUM_CLASSES", "4"], config)


def test_cosine_crt_is_allowed():
    _validate(["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True", "MODEL.EQLOSSES.COSINE_SCALE", "20.0"])


@pytest.mark.parametrize("config", [CRT, LWS, LVIS_CRT, LVIS_LWS], ids=os.path.basename)
def test_shipped_configs(config):
    """The recipes: the classifier (cRT) or its scales (LWS) trainable, RFS, cosine lr to 0 without
    warm-up, weight decay 5e-4 (the authors' stage 2); quickstart a quarter of the 600-iteration
    baseline; LVIS v1 10 (cRT) / 5 (LWS) epochs of int(99,388 / 16) = 6211 iterations from the 1x baseline."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    validate_config(cfg)
    crt = "crt_" in os.path.basename(config)
    node = cfg.MODEL.EQLOSSES
    assert node.DECOUPLING.RETRAIN_CLASSIFIER is crt
    assert node.DECOUPLING.CLASSIFIER == ("default" if crt else "lws")
    assert node.TRAINABLE_MODULES == ["roi_heads.box_predictor.cls_score" + ("" if crt else ".scales")]
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR" and cfg.SOLVER.WARMUP_ITERS == 0
    assert cfg.SOLVER.WEIGHT_DECAY == 0.0005
    if "LVISv1" in config:
        assert cfg.SOLVER.MAX_ITER == (10 if crt else 5) * (99388 // 16)
        assert cfg.MODEL.WEIGHTS == "./output/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x/model_final.pth"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    else:
        assert cfg.SOLVER.MAX_ITER == 150
        assert cfg.MODEL.WEIGHTS == "./output/quickstart/mask_rcnn_R18_FPN_synthetic/model_final.pth"


# -- end to end on the tiny set ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, out, max_iter=2) + ["DATASETS.TEST", "()"])
    return out / "model_final.pth"


def _stage2_argv(config, tiny_dataset, stage1, out, max_iter=5):
    # the tiny set's RFS factors at the config's threshold; evaluation on the tiny val split
    return ["--config-file", config] + _opts(tiny_dataset, out, max_iter=max_iter) + [
        "MODEL.WEIGHTS", str(stage1), "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    ]


@pytest.mark.parametrize("config", [CRT, LWS], ids=os.path.basename)
def test_quickstart_stage2_trains_only_the_classifier(config, tiny_dataset, stage1, tmp_path):
    """The quickstart config for 5 iterations from the tiny stage-1 model: in the first step only the
    intended parameters get gradients; after training, they changed and every other parameter is
    bit-for-bit stage 1's (the backbone's BatchNorm running statistics are updated, as in the
    authors' code); cRT's classifier started from its fresh initialisation; evaluation runs."""
    crt = config == CRT
    intended = "roi_heads.box_predictor.cls_score." if crt else "roi_heads.box_predictor.cls_score.scales"
    # gradients of one step, through the trainer's own model and loader
    args = train_net.default_argument_parser().parse_args(_stage2_argv(config, tiny_dataset, stage1, tmp_path / "grad"))
    train_net.check_args(args)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    model.train()
    data = next(iter(trainer._trainer.data_loader))
    with EventStorage(0):
        sum(model(data).values()).backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert with_grad == trainable and with_grad and all(name.startswith(intended) for name in with_grad)
    assert with_grad == (["roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
                         if crt else ["roi_heads.box_predictor.cls_score.scales"])
    del trainer, model

    out = tmp_path / "train"
    results = _run(_stage2_argv(config, tiny_dataset, stage1, out))
    assert set(results) >= {"bbox", "segm"}
    start = torch.load(stage1, map_location="cpu", weights_only=True)["model"]
    end = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    parameters = {name for name, _ in build_model(cfg).named_parameters()}
    changed = sorted(name for name in parameters if name in start and not torch.equal(start[name], end[name]))
    if crt:
        # the classifier is not stage 1's at all (fresh, then trained)
        assert changed == ["roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
        assert bool(end["roi_heads.box_predictor.retrained_classifier"])
    else:
        assert "roi_heads.box_predictor.cls_score.scales" not in start
        assert changed == []  # W, b and everything else: stage 1's
        scales = end["roi_heads.box_predictor.cls_score.scales"]
        assert scales.shape == (tiny_dataset["spec"].num_categories + 1,) and not torch.equal(scales, torch.ones_like(scales))
    assert set(end) - set(start) == ({"roi_heads.box_predictor.retrained_classifier"} if crt
                                     else {"roi_heads.box_predictor.cls_score.scales"})
    bn = "backbone.bottom_up.stem.conv1.norm.running_mean"
    assert bn in start and not torch.equal(start[bn], end[bn])  # BatchNorm statistics: updated (the authors' train())
