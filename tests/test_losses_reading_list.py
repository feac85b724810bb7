"""
The reading list's RoI losses (issue 21): Balanced Softmax (its authors' sigmoid detection form and
the C + 1 logit-adjustment form), Bal-BCE, ECM and DB.

Every expected number is derived here from the formulas with explicit loops in float64 numpy,
independently of the implementations (ECM's and DB's loops follow their authors' code line by
line); gradients are central finite differences of those loops. The batch has background RoIs, a
class without training images or instances (class 2, whose counts are clamped at 1) and a RoI of
that class. Checks: value and gradient (CPU and GPU policy, defaults and other settings); batches
of background RoIs only and of foreground RoIs only at large logits; empty batches (a connected
zero); heads (logit counts, bias inits) and inference probabilities; the cached per-class
constants following in-place changes of the statistics; ECM's margins and weights in closed form;
one-line errors (no statistics, NaN logits, bad values, a second backward); bf16 autocast; config
nodes and defaults; every LVIS and quickstart config of these losses building its model (sampler,
schedule, trainable modules); no collective and no buffer (no state); host reads of a training
step (none under the GPU policy) and NaN losses for NaN logits without a host read.
"""
import math
import os

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import merge_config_file
from eqlosses_d2.losses import LOSS_REGISTRY, base as loss_base, build_loss, build_loss_from_cfg
from loss_helpers import fd_grad, count_host_reads

C = 4
# fg RoIs at rows 0, 1, 3, 5 (classes 0, 2, 3, 2), background (label C) at rows 2 and 4
LABELS = [0, 2, 4, 3, 4, 2]
IMAGE_COUNT = [2, 30, 0, 500]  # class 2 never seen
INSTANCE_COUNT = [3, 40, 0, 900]
NUM_IMAGES_WITH_ANNOTATIONS = 10000
NUM_IMAGES = 12000
NAMES = ("balanced_softmax", "bal_bce", "ecm", "db")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stats(image_count=IMAGE_COUNT, instance_count=INSTANCE_COUNT):
    return SimpleNamespace(
        image_count=torch.tensor(image_count, dtype=torch.int64),
        instance_count=torch.tensor(instance_count, dtype=torch.int64),
        frequency_group=torch.tensor([0, 1, 0, 2], dtype=torch.int64),
        num_images=torch.tensor(NUM_IMAGES),
        num_images_with_annotations=torch.tensor(NUM_IMAGES_WITH_ANNOTATIONS),
        is_set=torch.tensor(True),
    )


def _logits(num_logits, seed=0, rows=len(LABELS), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, num_logits, generator=g, dtype=torch.float64).mul(scale).float()



def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _bce(x, t):
    """BCE(x, t) = −t log σ(x) − (1 − t) log(1 − σ(x)) = softplus(x) − t x."""
    return _softplus(x) - t * x


# -- hand references ---------------------------------------------------------------------------


def ref_balanced_softmax_sigmoid(z, labels, tau=1.0):
    m = NUM_IMAGES_WITH_ANNOTATIONS
    total = 0.0
    for i, y in enumerate(labels):
        for j in range(C):
            n = min(max(IMAGE_COUNT[j], 1), m - 1)
            f = n / m
            shift = -tau * math.log((1 - f) / f) if y < C else 0.0  # foreground RoIs only
            total += _bce(z[i][j] + shift, 1.0 if j == y else 0.0)
    return total / len(labels)


def ref_balanced_softmax_softmax(z, labels, tau=1.0):
    b = sum(1 for y in labels if y == C) / len(labels)
    share = [n / sum(IMAGE_COUNT) for n in IMAGE_COUNT]
    prior = [(1 - b) * s for s in share] + [b]
    adjust = [math.log(p ** tau + 1e-12) for p in prior]
    total = 0.0
    for i, y in enumerate(labels):
        x = [z[i][j] + adjust[j] for j in range(C + 1)]
        top = max(x)
        total += top + math.log(sum(math.exp(v - top) for v in x)) - x[y]
    return total / len(labels)


def ref_bal_bce(z, labels, tau=1.0, smoothing=0.0):
    counts = [max(n, 1) for n in INSTANCE_COUNT]
    total = 0.0
    for i, y in enumerate(labels):
        for j in range(C):
            p = counts[j] / sum(counts)
            shift = tau * (math.log(p) - math.log(1 - p))  # all RoIs, background included
            t = smoothing / C + ((1 - smoothing) if j == y else 0.0)
            total += _bce(z[i][j] + shift, t)
    return total / len(labels)


def ref_ecm(z, labels, fg_bg_ratio=6.3313, loss_weight=1.0):
    """The authors' forward, entry by entry (n: image counts clamped at 1, background appended)."""
    n = [float(max(c, 1)) for c in IMAGE_COUNT]
    n.append(sum(n) * fg_bg_ratio)
    s = sum(n)
    total = 0.0
    for i, y in enumerate(labels):
        for j in range(C + 1):
            n_pos, n_neg = n[j], s - n[j]
            pos_w = math.log(1.0 / (n_neg ** 0.25 / (n_pos ** 0.25 + n_neg ** 0.25)))
            neg_w = math.log(1.0 / (n_pos ** 0.25 / (n_pos ** 0.25 + n_neg ** 0.25)))
            a = (s - n[j]) / n[j]
            w = a * math.log((1 + a) / a)
            e_pos, e_neg = math.exp(z[i][j] + pos_w), math.exp(-z[i][j] + neg_w)
            pred_pos, pred_neg = e_pos / (e_pos + e_neg), e_neg / (e_pos + e_neg)
            t = 1.0 if j == y else 0.0
            total += -(math.log(pred_pos) * t + math.log(pred_neg) * (1 - t)) * w
    return total / len(labels) * loss_weight


def ref_db(z, labels, alpha=0.1, beta=10.0, mu=0.2, neg_scale=2.0, init_bias=0.05, gamma=2.0, balance=2.0):
    """The authors' ResampleLoss (rebalance, logit_reg, focal), entry by entry, summed / N."""
    m = NUM_IMAGES
    n = [float(min(max(c, 1), m - 1)) for c in IMAGE_COUNT]
    total = 0.0
    for i, y in enumerate(labels):
        repeat_rate = 1.0 / n[y] if y < C else 0.0
        for j in range(C):
            t = 1.0 if j == y else 0.0
            if repeat_rate > 0:
                r = (1.0 / n[j]) / repeat_rate
                w = 1.0 / (1.0 + math.exp(-beta * (r - mu))) + alpha
            else:  # background: r = +inf, σ(+inf) = 1
                w = 1.0 + alpha
            v = -math.log(m / n[j] - 1) * init_bias / neg_scale
            x = z[i][j] + v
            if t == 0:
                x, w = x * neg_scale, w / neg_scale
            bce = _bce(x, t)
            pt = math.exp(-bce)
            total += balance * (1 - pt) ** gamma * w * bce
    return total / len(labels)


CASES = {
    "balanced_softmax": ({}, ref_balanced_softmax_sigmoid),
    "balanced_softmax-tau": ({"tau": 0.5}, lambda z, y: ref_balanced_softmax_sigmoid(z, y, tau=0.5)),
    "balanced_softmax-softmax": ({"form": "softmax"}, ref_balanced_softmax_softmax),
    "balanced_softmax-softmax-tau": ({"form": "softmax", "tau": 1.5},
                                     lambda z, y: ref_balanced_softmax_softmax(z, y, tau=1.5)),
    "bal_bce": ({}, ref_bal_bce),
    "bal_bce-smoothing": ({"tau": 0.7, "smoothing": 0.1}, lambda z, y: ref_bal_bce(z, y, 0.7, 0.1)),
    "ecm": ({}, ref_ecm),
    "ecm-weighted": ({"fg_bg_ratio": 3.0, "loss_weight": 0.5}, lambda z, y: ref_ecm(z, y, 3.0, 0.5)),
    "db": ({}, ref_db),
    "db-gamma": ({"focal_gamma": 1.5, "neg_scale": 3.0, "init_bias": 0.1},
                 lambda z, y: ref_db(z, y, neg_scale=3.0, init_bias=0.1, gamma=1.5)),
    "db-no-focal": ({"focal_gamma": 0.0, "balance": 1.0}, lambda z, y: ref_db(z, y, gamma=0.0, balance=1.0)),
}


def _build(case):
    hparams, _ = CASES[case]
    return build_loss(case.split("-")[0], C, class_stats=_stats(), **hparams)


@pytest.mark.parametrize("policy", ["auto", "gpu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_against_hand_reference(case, policy, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    loss = _build(case)
    reference = CASES[case][1]
    z = _logits(loss.num_logits, seed=len(case)).requires_grad_()
    out = loss(z, torch.tensor(LABELS))
    assert set(out) == {"loss_cls"} and out["loss_cls"].dtype == torch.float32
    expected = reference(z.detach().double().tolist(), LABELS)
    assert out["loss_cls"].item() == pytest.approx(expected, rel=2e-6, abs=1e-6)
    out["loss_cls"].backward()
    fd = fd_grad(lambda a: reference(a.tolist(), LABELS), z.detach().double().numpy())
    np.testing.assert_allclose(z.grad.double().numpy(), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels", [[C, C, C], [0, 3, 1]], ids=["background", "foreground"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_kind_of_roi_and_large_logits(case, labels):
    """Batches of background RoIs only and of foreground RoIs only (the softmax form's
    background prior b = 1 and b = 0: log(0 + 1e-12) on the other columns), logits of scale 8."""
    loss = _build(case)
    z = _logits(loss.num_logits, seed=3, rows=3, scale=8.0).requires_grad_()
    out = loss(z, torch.tensor(labels))["loss_cls"]
    expected = CASES[case][1](z.detach().double().tolist(), labels)
    assert out.item() == pytest.approx(expected, rel=2e-6, abs=1e-6)
    out.backward()
    fd = fd_grad(lambda a: CASES[case][1](a.tolist(), labels), z.detach().double().numpy())
    np.testing.assert_allclose(z.grad.double().numpy(), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_batch_is_a_connected_zero(case):
    loss = _build(case)
    z = torch.zeros(0, loss.num_logits, requires_grad=True)
    out = loss(z, torch.zeros(0, dtype=torch.int64))["loss_cls"]
    assert out.item() == 0.0
    out.backward()
    assert z.grad.shape == (0, loss.num_logits)


def test_forms_heads_and_inference():
    z = _logits(C + 1, seed=7)
    sig = torch.sigmoid(z.double())
    # ECM: C + 1 sigmoid channels; p_j = σ(z_j)(1 − σ(z_bg)), background σ(z_bg), raw logits
    ecm = _build("ecm")
    assert ecm.num_logits == C + 1 and ecm.family == "sigmoid" and ecm.classifier_bias_init() is None
    expected = torch.cat([sig[:, :C] * (1 - sig[:, C:]), sig[:, C:]], dim=1)
    torch.testing.assert_close(ecm.predict_probs(z).double(), expected, rtol=1e-6, atol=1e-7)
    # C-logit sigmoid heads: σ(z) of the raw logits (no shift at inference), background 1 − max
    for case in ("balanced_softmax", "bal_bce", "db"):
        loss = _build(case)
        assert loss.num_logits == C and loss.family == "sigmoid"
        probs = loss.predict_probs(z[:, :C])
        torch.testing.assert_close(probs[:, :C].double(), sig[:, :C], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(probs[:, C].double(), 1 - sig[:, :C].max(1).values, rtol=1e-6, atol=1e-7)
    # bias inits: prior 0.001 (Balanced Softmax's authors, Bal-BCE as the sigmoid baseline), DB zero
    for case in ("balanced_softmax", "bal_bce"):
        bias = _build(case).classifier_bias_init()
        assert bias.shape == (C,) and bias[0].item() == pytest.approx(-math.log(999.0))
    assert _build("db").classifier_bias_init() is None
    # the softmax form: C + 1 logits, softmax of the raw logits, a plain-softmax activation
    soft = _build("balanced_softmax-softmax")
    assert soft.num_logits == C + 1 and soft.family == "softmax" and soft.softmax_logits
    assert soft.classifier_bias_init() is None
    torch.testing.assert_close(soft.predict_probs(z), torch.softmax(z, 1))
    torch.testing.assert_close(soft.activation_logits(z), z)
    assert not _build("balanced_softmax").softmax_logits


def test_constants_follow_the_class_statistics():
    """The cached per-class constants are recomputed when the statistics change in place (a
    checkpoint load), and not otherwise."""
    stats = _stats()
    loss = build_loss("db", C, class_stats=stats)
    first = loss.constants()
    assert loss.constants() is first
    stats.image_count.copy_(torch.tensor([5, 5, 5, 5]))
    table, bias = loss.constants()
    assert table is not first[0]
    assert table[0, 1].item() == pytest.approx(1 / (1 + math.exp(-10 * (1 - 0.2))) + 0.1, rel=1e-6)
    assert table[C].tolist() == pytest.approx([1.1] * C)
    assert bias[0].item() == pytest.approx(-math.log(12000 / 5 - 1) * 0.05 / 2, rel=1e-6)


def test_ecm_margins_equal_a_quarter_log_ratio():
    from eqlosses_d2.losses.ecm import ecm_margins_and_weights

    margin, weight = ecm_margins_and_weights([10, 1000], 2.0)
    n = [10.0, 1000.0, 2020.0]
    for j in range(3):
        assert margin[j].item() == pytest.approx(0.25 * math.log(n[j] / (sum(n) - n[j])), rel=1e-12)
        a = (sum(n) - n[j]) / n[j]
        assert weight[j].item() == pytest.approx(a * math.log(1 + 1 / a), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_missing_class_stats_is_a_clear_error(name):
    loss = build_loss(name, C)
    with pytest.raises(RuntimeError, match=f"loss '{name}' needs per-class statistics"):
        loss(torch.zeros(2, loss.num_logits), torch.tensor([0, C]))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_logits_are_rejected(name):
    loss = build_loss(name, C, class_stats=_stats())
    z = torch.zeros(2, loss.num_logits)
    z[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"loss '{name}': 1 of"):
        loss(z, torch.tensor([0, C]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_policy_non_finite_logits_give_nan_without_a_host_read(case, monkeypatch):
    """Under the GPU policy a NaN logit is not read on the host: the returned loss is NaN, which
    Detectron2's trainer stops on in the same iteration."""
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "gpu")
    loss = _build(case)
    z = _logits(loss.num_logits)
    z[2, 1] = float("nan")
    assert torch.isnan(loss(z, torch.tensor(LABELS))["loss_cls"])


@pytest.mark.parametrize("name", NAMES)
def test_second_backward_is_a_clear_error(name):
    loss = build_loss(name, C, class_stats=_stats())
    z = _logits(loss.num_logits).requires_grad_()
    total = loss(z, torch.tensor(LABELS))["loss_cls"]
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        total.backward()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_gives_float32_losses_close_to_fp32(name):
    loss = build_loss(name, C, class_stats=_stats())
    z = _logits(loss.num_logits)
    fp32 = loss(z, torch.tensor(LABELS))["loss_cls"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(z.bfloat16(), torch.tensor(LABELS))["loss_cls"]
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


# -- config ------------------------------------------------------------------------------------


def _cfg():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    return cfg


def test_config_nodes_and_defaults():
    node = _cfg().MODEL.EQLOSSES
    assert dict(node.BALANCED_SOFTMAX) == {"FORM": "sigmoid", "TAU": 1.0, "PRIOR_PROB": 0.001}
    assert dict(node.BAL_BCE) == {"TAU": 1.0, "SMOOTHING": 0.0, "PRIOR_PROB": 0.001}
    assert dict(node.ECM) == {"FG_BG_RATIO": 6.3313, "LOSS_WEIGHT": 1.0}
    assert dict(node.DB) == {"ALPHA": 0.1, "BETA": 10.0, "MU": 0.2, "NEG_SCALE": 2.0, "INIT_BIAS": 0.05,
                             "FOCAL_GAMMA": 2.0, "BALANCE": 2.0, "LOSS_WEIGHT": 1.0}
    for name in NAMES:
        node.LOSS = name
        loss = build_loss_from_cfg(node, C, class_stats=_stats())
        assert loss.name == name and type(loss) is LOSS_REGISTRY.get(name)
    node.LOSS = "balanced_softmax"
    node.BALANCED_SOFTMAX.FORM = "softmax"
    node.BALANCED_SOFTMAX.TAU = 0.5
    loss = build_loss_from_cfg(node, C)
    assert (loss.form, loss.tau, loss.num_logits) == ("softmax", 0.5, C + 1)


@pytest.mark.parametrize("name, hparams, message", [
    ("balanced_softmax", {"form": "cosine"}, "BALANCED_SOFTMAX.FORM must be one of sigmoid, softmax, got 'cosine'"),
    ("balanced_softmax", {"tau": -1.0}, "BALANCED_SOFTMAX.TAU must be >= 0"),
    ("bal_bce", {"smoothing": 1.0}, r"BAL_BCE.SMOOTHING must be in \[0, 1\)"),
    ("bal_bce", {"prior_prob": 0.0}, r"PRIOR_PROB must be in \(0, 1\)"),
    ("ecm", {"fg_bg_ratio": 0.0}, "ECM.FG_BG_RATIO must be > 0"),
    ("db", {"neg_scale": 0.0}, "DB.NEG_SCALE must be > 0"),
    ("db", {"focal_gamma": -1.0}, "DB.FOCAL_GAMMA must be >= 0"),
])
def test_bad_values_are_one_line(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, C, **hparams)


CONFIGS = [os.path.join("LVISv1-InstanceSegmentation", f"{name}_mask_rcnn_R_50_FPN_{sched}.yaml")
           for name in NAMES for sched in ("1x", "2x")] + [
    os.path.join("LVISv1-InstanceSegmentation", "balanced_softmax_mask_rcnn_R_50_FPN_1x_finetune.yaml")] + [
    os.path.join("quickstart", f"{name}_mask_rcnn_R18_FPN_synthetic.yaml") for name in NAMES]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_its_model(config):
    cfg = _cfg()
    merge_config_file(cfg, os.path.join(ROOT, "configs", config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    name = os.path.basename(config).split("_mask_rcnn")[0]
    assert cfg.MODEL.EQLOSSES.LOSS == name
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    loss = predictor.cls_loss
    assert loss.name == name and predictor.cls_score.out_features == loss.num_logits
    assert loss.num_logits == cfg.MODEL.ROI_HEADS.NUM_CLASSES + (1 if name == "ecm" else 0)
    if config.startswith("LVIS"):
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    if name == "ecm" and config.startswith("LVIS"):
        assert cfg.MODEL.EQLOSSES.COSINE_SCALE == 20.0 and cfg.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE == 20.0
        assert cfg.SOLVER.WARMUP_ITERS == 10000 and cfg.SOLVER.CLIP_GRADIENTS.ENABLED
        assert cfg.SOLVER.STEPS == ((60000, 82500) if "1x" in config else (150000, 165000))
    if config.endswith("balanced_softmax_mask_rcnn_R_50_FPN_1x_finetune.yaml"):  # the authors' decoupled recipe
        assert cfg.MODEL.EQLOSSES.TRAINABLE_MODULES == ["roi_heads.box_predictor.cls_score"]
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (22000, (11000, 18000))
    elif config.startswith("LVIS"):
        assert cfg.MODEL.EQLOSSES.TRAINABLE_MODULES == [] and cfg.SOLVER.MAX_ITER == (90000 if "1x" in config else 180000)


# -- host reads and collectives of a training step (as tests/test_host_syncs.py counts them) ------


def test_training_step_collectives_none(monkeypatch):
    """No state: a training step of these losses runs no collective (nothing to synchronize)."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: calls.append(tensor.numel()))
    for case in sorted(CASES):
        loss = _build(case)
        z = _logits(loss.num_logits).requires_grad_()
        loss(z, torch.tensor(LABELS))["loss_cls"].backward()
        assert list(loss.buffers()) == []
    assert calls == []


@pytest.mark.parametrize("policy", ["gpu", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_host_reads_of_a_training_step(case, policy, monkeypatch):
    """Every form and setting (tests/test_host_syncs.py counts the default of each in the box
    predictor): under the GPU policy no host read; under the CPU policy the finite check's
    ``bool`` and the fused kernels' backward's unit-gradient ``float``, CPU tensors only.
    A warm-up step first (the class statistics' first check is cached)."""
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    loss = _build(case)
    counts = count_host_reads(monkeypatch)
    for step in range(2):
        z = _logits(loss.num_logits, seed=step).requires_grad_()
        counts.on = step == 1
        loss(z, torch.tensor(LABELS))["loss_cls"].backward()
        counts.on = False
    assert counts == ({} if policy == "gpu" else {"__bool__": 1, "__float__": 1})
