"""
EQL, EQLv2 and Softmax-EQL against their formulas.

Expected values come from the formulas of the method specification, written out below with
explicit loops in float64 numpy (``reference_*``), never from the losses' own helpers;
the EQL case and the 2-class toy cases have their numbers written out by hand.
"""
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if mp.current_process().name != "MainProcess":
    # A worker of the two-process test, importing this module to find its function: import
    # the losses without the package's __init__ (Detectron2 and its shims, ~4 s a process).
    # The losses import no Detectron2, so this also checks that they are pure PyTorch.
    _package = types.ModuleType("eqlosses_d2")
    _package.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eqlosses_d2")]
    sys.modules.setdefault("eqlosses_d2", _package)

from eqlosses_d2.losses import eql, eqlv2, softmax_eql  # noqa: E402
from eqlosses_d2.losses import LOSS_REGISTRY, build_loss  # noqa: E402

EQLv2 = eqlv2.EqualizationLossV2
SoftmaxEQL = softmax_eql.SoftmaxEqualizationLoss
EQL = eql.EqualizationLoss

C = 4  # foreground classes in the small cases; label C is background


# ----------------------------------------------------------------------------- references
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_eql(logits, labels, tail):
    """L = Σ w·BCE / N, w_ij = 1 - E(r_i) T(f_j) (1 - y_ij); and dL/dz."""
    logits = np.asarray(logits, dtype=np.float64)
    n, k = logits.shape
    loss, grad = 0.0, np.zeros((n, k))
    for i in range(n):
        foreground = 1.0 if labels[i] < k else 0.0
        for j in range(k):
            y = 1.0 if labels[i] == j else 0.0
            p = _sigmoid(logits[i, j])
            w = 1.0 - foreground * (1.0 if tail[j] else 0.0) * (1.0 - y)
            loss += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
            grad[i, j] = w * (p - y) / n
    return loss / n, grad


def reference_eqlv2(logits, labels, pos_grad, neg_grad, gamma=12.0, mu=0.8, alpha=4.0):
    """One EQLv2 iteration from the statistics before it: loss, dL/dz, and this batch's
    (pos, neg) contributions |σ - y|·weight (not divided by N)."""
    logits = np.asarray(logits, dtype=np.float64)
    n, k = logits.shape
    c = k - 1
    r, q = [], []
    for j in range(c):
        has_stats = pos_grad[j] > 0 or neg_grad[j] > 0
        ratio = pos_grad[j] / (neg_grad[j] + 1e-10) if has_stats else 100.0
        r.append(1.0 / (1.0 + math.exp(-gamma * (ratio - mu))))
        q.append(1.0 + alpha * (1.0 - r[-1]))
    r.append(1.0)
    q.append(1.0)
    loss, grad = 0.0, np.zeros((n, k))
    pos, neg = np.zeros(c), np.zeros(c)
    for i in range(n):
        for j in range(k):
            y = 1.0 if labels[i] == j else 0.0
            p = _sigmoid(logits[i, j])
            w = q[j] * y + r[j] * (1 - y)
            loss += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
            grad[i, j] = w * (p - y) / n
            if j < c:
                if y:
                    pos[j] += abs(p - y) * w
                else:
                    neg[j] += abs(p - y) * w
    return loss / n, grad, pos, neg


def reference_softmax_eql(logits, labels, pos_grad, neg_grad, tau=1.0, eps=1e-4, indicator="pos", form="margin"):
    """One Softmax-EQL iteration (foreground RoIs shifted over their foreground logits,
    background logit and background RoIs unshifted): loss, dL/dz, (pos, neg) contributions
    |dL/dz| of the N-normalized loss."""
    logits = np.asarray(logits, dtype=np.float64)
    n, k = logits.shape
    c = k - 1
    g = {"pos": pos_grad, "neg": neg_grad, "pos_and_neg": [a + b for a, b in zip(pos_grad, neg_grad)]}[indicator]
    loss, grad = 0.0, np.zeros((n, k))
    pos, neg = np.zeros(c), np.zeros(c)
    for i in range(n):
        y = labels[i]
        shifted = list(logits[i])
        if y < c:
            for j in range(c):
                if form == "margin":
                    if j != y:
                        shifted[j] += tau * math.log(max(g[j], eps) / max(g[y], eps))
                else:
                    shifted[j] += math.log((g[j] / (sum(g) + eps)) ** tau + 1e-9)
        top = max(shifted)
        exps = [math.exp(v - top) for v in shifted]
        probs = [e / sum(exps) for e in exps]
        loss += -math.log(probs[y])
        for j in range(k):
            grad[i, j] = (probs[j] - (1.0 if j == y else 0.0)) / n
            if j < c:
                if j == y:
                    pos[j] += abs(grad[i, j])
                else:
                    neg[j] += abs(grad[i, j])
    return loss / n, grad, pos, neg


# ----------------------------------------------------------------------------- helpers
def make_batch(seed, num_rois=6, num_classes=C, labels=None, extra=1):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rois, num_classes + extra, generator=gen) * 2.0
    if labels is None:
        labels = torch.randint(0, num_classes + 1, (num_rois,), generator=gen)
        labels[0], labels[1] = num_classes, 0  # at least one background and one foreground RoI
    return logits, torch.as_tensor(labels)


def class_stats(image_count, num_images_with_annotations, frequency_group=None):
    image_count = torch.as_tensor(image_count, dtype=torch.int64)
    if frequency_group is None:
        frequency_group = torch.full_like(image_count, -1)
    return types.SimpleNamespace(
        image_count=image_count,
        instance_count=image_count.clone(),
        frequency_group=torch.as_tensor(frequency_group, dtype=torch.int64),
        num_images=torch.tensor(num_images_with_annotations),
        num_images_with_annotations=torch.tensor(num_images_with_annotations),
        is_set=torch.tensor(True),
    )


def loss_and_grad(loss_module, logits, labels):
    logits = logits.clone().requires_grad_(True)
    loss = loss_module(logits, labels)["loss_cls"]
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, grad


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    actual = torch.as_tensor(actual).detach().double().numpy()
    np.testing.assert_allclose(actual, np.asarray(expected), rtol=rtol, atol=atol)


def stats_of(loss_module):
    return loss_module.gradient_stats.pos_grad.clone(), loss_module.gradient_stats.neg_grad.clone()


SOFTMAX_EQL_VARIANTS = [(i, f) for f in ("margin", "prior") for i in ("pos", "neg", "pos_and_neg")]


# ----------------------------------------------------------------------------- registry
def test_registered_with_config_nodes():
    assert LOSS_REGISTRY.get("eql") is EQL and EQL.config_node == "EQL"
    assert LOSS_REGISTRY.get("eqlv2") is EQLv2 and EQLv2.config_node == "EQLV2"
    assert LOSS_REGISTRY.get("softmax_eql") is SoftmaxEQL and SoftmaxEQL.config_node == "SOFTMAX_EQL"
    # the config keys are the constructor kwargs in upper case
    nodes = {
        "eql": {"TAIL_THRESHOLD": 0.0011, "PRIOR_PROB": 0.001},
        "eqlv2": {"GAMMA": 12.0, "MU": 0.8, "ALPHA": 4.0, "TEST_WITH_OBJ": True, "PRIOR_PROB": 0.001},
        "softmax_eql": {"TAU": 1.0, "EPS": 1e-4, "INDICATOR": "pos", "FORM": "margin"},
    }
    for name, node in nodes.items():
        loss = build_loss(name, C, **{key.lower(): value for key, value in node.items()})
        assert loss.num_logits == (C if name == "eql" else C + 1)


def test_bias_init_from_prior():
    assert_close(EQL(C).classifier_bias_init(), [-math.log(999.0)] * C)
    assert_close(EQLv2(C).classifier_bias_init(), [-math.log(999.0)] * (C + 1))  # objectness too
    assert SoftmaxEQL(C).classifier_bias_init() is None


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="INDICATOR"):
        SoftmaxEQL(C, indicator="both")
    with pytest.raises(ValueError, match="FORM"):
        SoftmaxEQL(C, form="additive")
    with pytest.raises(ValueError, match="PRIOR_PROB"):
        EQLv2(C, prior_prob=0.0)


# ----------------------------------------------------------------------------- EQL
def test_eql_hand_computed():
    # 2 classes, class 1 is a tail class (frequency 1/1000 < 0.0011), class 0 is not (0.5).
    # RoI 0 is class 0: its tail negative (class 1) is dropped; RoI 1 is background: it keeps both.
    loss_module = EQL(2, class_stats=class_stats([500, 1], 1000), tail_threshold=0.0011)
    logits = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])
    loss, grad = loss_and_grad(loss_module, logits, torch.tensor([0, 2]))
    # (BCE(0, 1) + BCE(-1, 0) + BCE(2, 0)) / 2 = (log 2 + log(1 + e^-1) + log(1 + e^2)) / 2
    assert loss.item() == pytest.approx((0.6931472 + 0.3132617 + 2.1269280) / 2, rel=1e-6)
    # w (σ(z) - y) / N: (σ(0) - 1)/2, 0 (dropped), σ(-1)/2, σ(2)/2
    assert_close(grad, [[-0.25, 0.0], [0.2689414 / 2, 0.8807971 / 2]], rtol=1e-6)


def test_eql_matches_formula():
    stats = class_stats([900, 3, 40, 1], 1000)  # frequencies 0.9, 0.003, 0.04, 0.001
    loss_module = EQL(C, class_stats=stats, tail_threshold=0.005)
    logits, labels = make_batch(0, extra=0)
    tail = [False, True, False, True]
    assert loss_module.tail_classes().tolist() == tail
    expected_loss, expected_grad = reference_eql(logits.numpy(), labels.tolist(), tail)
    loss, grad = loss_and_grad(loss_module, logits, labels)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


def test_eql_threshold_zero_is_sigmoid_bce():
    logits, labels = make_batch(1, extra=0)
    loss, _ = loss_and_grad(EQL(C, class_stats=class_stats([1, 1, 1, 1], 10), tail_threshold=0.0), logits, labels)
    target = torch.zeros(6, C + 1)
    target[torch.arange(6), labels] = 1
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[:, :C], reduction="sum") / 6
    assert_close(loss, plain.item())


def test_eql_needs_class_stats():
    logits, labels = make_batch(0, extra=0)
    with pytest.raises(RuntimeError, match="loss 'eql' needs per-class statistics"):
        EQL(C)(logits, labels)
    unset = class_stats([1] * C, 10)
    unset.is_set = torch.tensor(False)
    with pytest.raises(RuntimeError, match="needs per-class statistics"):
        EQL(C, class_stats=unset)(logits, labels)


def test_eql_inference():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    probs = EQL(C).predict_probs(logits)
    s = [_sigmoid(v) for v in (0.0, 2.0, -1.0, 1.0)]
    assert_close(probs, [s + [1.0 - max(s)]], rtol=1e-6)


# ----------------------------------------------------------------------------- EQLv2
def test_eqlv2_first_iteration_is_plain_bce():
    logits, labels = make_batch(2)
    loss, grad = loss_and_grad(EQLv2(C), logits, labels)
    target = torch.zeros(6, C + 1)
    target[torch.arange(6), labels] = 1  # background RoIs: 1 on the objectness channel
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 6
    assert_close(loss, plain.item())
    assert_close(grad, ((torch.sigmoid(logits) - target) / 6).numpy())


def test_eqlv2_two_iterations_match_formula():
    loss_module = EQLv2(C)
    pos, neg = np.zeros(C), np.zeros(C)
    for iteration in range(2):
        logits, labels = make_batch(10 + iteration)
        expected_loss, expected_grad, pos_contrib, neg_contrib = reference_eqlv2(
            logits.numpy(), labels.tolist(), pos, neg
        )
        loss, grad = loss_and_grad(loss_module, logits, labels)
        assert_close(loss, expected_loss)
        assert_close(grad, expected_grad)
        pos, neg = pos + pos_contrib, neg + neg_contrib  # not divided by N
        assert_close(loss_module.gradient_stats.pos_grad, pos, rtol=1e-6)
        assert_close(loss_module.gradient_stats.neg_grad, neg, rtol=1e-6)
    # the second iteration really was re-weighted by the first's statistics
    assert not np.allclose(expected_loss, reference_eqlv2(logits.numpy(), labels.tolist(), [0] * C, [0] * C)[0])


def test_eqlv2_two_class_toy():
    # statistics: class 0 balanced (ratio 1), class 1 never a positive (ratio 0)
    loss_module = EQLv2(2)
    loss_module.gradient_stats.pos_grad.copy_(torch.tensor([3.0, 0.0], dtype=torch.float64))
    loss_module.gradient_stats.neg_grad.copy_(torch.tensor([3.0, 5.0], dtype=torch.float64))
    r0, r1 = 1 / (1 + math.exp(-12 * 0.2)), 1 / (1 + math.exp(12 * 0.8))  # 0.916827, 6.7729e-5
    q1 = 1 + 4 * (1 - r1)
    # one RoI of class 1 with all-zero logits: every BCE is log 2
    loss, grad = loss_and_grad(loss_module, torch.zeros(1, 3), torch.tensor([1]))
    assert loss.item() == pytest.approx((r0 + q1 + 1.0) * math.log(2), rel=1e-6)
    assert_close(grad, [[0.5 * r0, -0.5 * q1, 0.5]], rtol=1e-6)
    assert_close(loss_module.gradient_stats.pos_grad, [3.0, 0.5 * q1], rtol=1e-6)
    assert_close(loss_module.gradient_stats.neg_grad, [3.0 + 0.5 * r0, 5.0], rtol=1e-6)


@pytest.mark.parametrize("test_with_obj", [True, False])
def test_eqlv2_inference(test_with_obj):
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.5], [-3.0, 0.0, 1.0, 2.0, -2.0]])
    probs = EQLv2(C, test_with_obj=test_with_obj).predict_probs(logits)
    assert probs.shape == (2, C + 1) and probs.dtype == torch.float32
    for i in range(2):
        background = _sigmoid(logits[i, C].item())
        for j in range(C):
            expected = _sigmoid(logits[i, j].item()) * ((1 - background) if test_with_obj else 1.0)
            assert probs[i, j].item() == pytest.approx(expected, rel=1e-6)
        assert probs[i, C].item() == pytest.approx(background, rel=1e-6)


def test_eqlv2_scalars_per_frequency_group():
    stats = class_stats([1, 50, 500, 2], 1000, frequency_group=[0, 1, 2, 0])
    loss_module = EQLv2(C, class_stats=stats)
    assert loss_module.scalars() == pytest.approx(
        {"pos_neg_ratio": 100.0, "pos_neg_ratio_r": 100.0, "pos_neg_ratio_c": 100.0, "pos_neg_ratio_f": 100.0}
    )
    loss_module.gradient_stats.pos_grad.copy_(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64))
    loss_module.gradient_stats.neg_grad.copy_(torch.tensor([4.0, 4.0, 4.0, 4.0], dtype=torch.float64))
    scalars = loss_module.scalars()
    assert scalars == pytest.approx(
        {"pos_neg_ratio": 6 / 16, "pos_neg_ratio_r": 0.125, "pos_neg_ratio_c": 0.5, "pos_neg_ratio_f": 0.75}
    )
    assert all(type(v) is float for v in scalars.values())
    assert set(EQLv2(C).scalars()) == {"pos_neg_ratio"}  # no class statistics: overall only


# ----------------------------------------------------------------------------- Softmax-EQL
@pytest.mark.parametrize("indicator,form", SOFTMAX_EQL_VARIANTS)
def test_softmax_eql_two_iterations_match_formula(indicator, form):
    loss_module = SoftmaxEQL(C, indicator=indicator, form=form, tau=1.5)
    pos, neg = np.zeros(C), np.zeros(C)
    for iteration in range(2):
        logits, labels = make_batch(20 + iteration, labels=[C, 0, 1, 0, C, 3])  # class 2 never seen
        expected_loss, expected_grad, pos_contrib, neg_contrib = reference_softmax_eql(
            logits.numpy(), labels.tolist(), pos, neg, tau=1.5, indicator=indicator, form=form
        )
        loss, grad = loss_and_grad(loss_module, logits, labels)
        assert_close(loss, expected_loss)
        assert_close(grad, expected_grad)
        pos, neg = pos + pos_contrib, neg + neg_contrib
        assert_close(loss_module.gradient_stats.pos_grad, pos, rtol=1e-6)
        assert_close(loss_module.gradient_stats.neg_grad, neg, rtol=1e-6)
    assert loss_module.gradient_stats.pos_grad[2] == 0  # never a positive


def test_softmax_eql_first_iteration_margin_is_plain_ce():
    logits, labels = make_batch(3)
    loss, grad = loss_and_grad(SoftmaxEQL(C), logits, labels)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert_close(loss, plain.item())
    assert_close(grad, ((torch.softmax(logits, 1) - torch.eye(C + 1)[labels]) / 6).numpy())


def test_softmax_eql_two_class_toy():
    # G = (1, 0.01): a class-0 RoI with zero logits sees class 1 shifted by log(0.01 / 1)
    loss_module = SoftmaxEQL(2)
    loss_module.gradient_stats.pos_grad.copy_(torch.tensor([1.0, 0.01], dtype=torch.float64))
    loss, grad = loss_and_grad(loss_module, torch.zeros(2, 3), torch.tensor([0, 2]))
    # RoI 0: softmax over (0, log 0.01, 0) -> -log(1 / 2.01); RoI 1 (background): plain, log 3
    assert loss.item() == pytest.approx((math.log(2.01) + math.log(3)) / 2, rel=1e-6)
    assert_close(grad, [[(1 / 2.01 - 1) / 2, 0.01 / 2.01 / 2, 1 / 2.01 / 2], [1 / 6, 1 / 6, -1 / 3]], rtol=1e-6)
    # pos: |p_y - 1| / N of RoI 0; neg: class 0 from RoI 1, class 1 from both
    assert_close(loss_module.gradient_stats.pos_grad, [1.0 + (1 - 1 / 2.01) / 2, 0.01], rtol=1e-6)
    assert_close(loss_module.gradient_stats.neg_grad, [1 / 6, 0.01 / 2.01 / 2 + 1 / 6], rtol=1e-6)


def test_softmax_eql_second_backward_through_the_same_graph_is_a_clear_error():
    # the analytic gradient is an intermediate handed to autograd once (scaled in place)
    logits, labels = make_batch(3)
    z = logits.clone().requires_grad_()
    total = SoftmaxEQL(C)(z, labels)["loss_cls"]
    (2.0 * total).backward(retain_graph=True)
    assert_close(z.grad, (2.0 * (torch.softmax(logits, 1) - torch.eye(C + 1)[labels]) / 6).numpy())
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        total.backward()


def test_softmax_eql_inference_is_plain_softmax():
    logits, _ = make_batch(4)
    loss_module = SoftmaxEQL(C)
    loss_module.gradient_stats.pos_grad.fill_(3.0)
    probs = loss_module.predict_probs(logits)
    for i in range(logits.shape[0]):
        exps = [math.exp(v) for v in logits[i].tolist()]
        assert_close(probs[i], [e / sum(exps) for e in exps], rtol=1e-6)
    assert set(SoftmaxEQL(C).scalars()) == {"grad_pos"}


# ----------------------------------------------------------------------------- edge cases
def _gradient_losses():
    return [EQLv2(C)] + [SoftmaxEQL(C, indicator=i, form=f) for i, f in SOFTMAX_EQL_VARIANTS]


def _reference_step(loss_module, logits, labels, pos, neg):
    if isinstance(loss_module, EQLv2):
        return reference_eqlv2(logits.numpy(), labels.tolist(), pos, neg)
    return reference_softmax_eql(
        logits.numpy(), labels.tolist(), pos, neg, indicator=loss_module.indicator, form=loss_module.form
    )


@pytest.mark.parametrize("kind", ["background_only", "foreground_only"])
def test_batches_without_foreground_or_background(kind):
    labels = [C] * 5 if kind == "background_only" else [0, 1, 0, 3, 1]
    for loss_module in _gradient_losses():
        pos, neg = np.zeros(C), np.zeros(C)
        for iteration in range(2):  # the second with the statistics of the first
            logits, labels_t = make_batch(30 + iteration, num_rois=5, labels=labels)
            expected_loss, expected_grad, pos_contrib, neg_contrib = _reference_step(
                loss_module, logits, labels_t, pos, neg
            )
            loss, grad = loss_and_grad(loss_module, logits, labels_t)
            assert_close(loss, expected_loss)
            assert_close(grad, expected_grad)
            pos, neg = pos + pos_contrib, neg + neg_contrib
            assert_close(loss_module.gradient_stats.pos_grad, pos, rtol=1e-6)
            assert torch.isfinite(loss_module.gradient_stats.neg_grad).all()
        if kind == "background_only":
            assert (loss_module.gradient_stats.pos_grad == 0).all()


def test_zero_rois():
    stats = class_stats([1, 2, 3, 4], 10)
    for loss_module in _gradient_losses() + [EQL(C, class_stats=stats)]:
        extra = 0 if isinstance(loss_module, EQL) else 1
        logits = torch.zeros(0, C + extra, requires_grad=True)
        loss = loss_module(logits, torch.zeros(0, dtype=torch.long))["loss_cls"]
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert logits.grad.shape == logits.shape
        if not isinstance(loss_module, EQL):
            assert (loss_module.gradient_stats.pos_grad == 0).all()
            assert (loss_module.gradient_stats.neg_grad == 0).all()
    # and the next real batch still starts from the initial state: plain BCE for EQLv2
    loss_module = EQLv2(C)
    loss_module(torch.zeros(0, C + 1), torch.zeros(0, dtype=torch.long))
    logits, labels = make_batch(5)
    expected_loss = reference_eqlv2(logits.numpy(), labels.tolist(), [0] * C, [0] * C)[0]
    assert_close(loss_and_grad(loss_module, logits, labels)[0], expected_loss)


def test_unseen_classes_stay_finite():
    # classes 1..3 never appear, and the logits are extreme: no NaN in weights, losses, gradients
    for loss_module in _gradient_losses():
        for iteration in range(3):
            logits, labels = make_batch(40 + iteration, num_rois=8, labels=[0, C, C, 0, C, C, C, C])
            logits = logits * 30.0
            loss, grad = loss_and_grad(loss_module, logits, labels)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
        pos, neg = stats_of(loss_module)
        assert torch.isfinite(pos).all() and torch.isfinite(neg).all()
        assert (pos[1:] == 0).all()
        if isinstance(loss_module, EQLv2):
            neg_weight, pos_weight = loss_module.class_weights()
            assert torch.isfinite(neg_weight).all() and torch.isfinite(pos_weight).all()
            assert loss_module.gradient_stats.ratio()[1:].eq(0).all()  # unseen: ratio 0, r = f(0)
            assert neg_weight[1].item() == pytest.approx(1 / (1 + math.exp(12 * 0.8)), rel=1e-5)
            assert loss_module.scalars()["pos_neg_ratio"] == loss_module.scalars()["pos_neg_ratio"]
        else:
            assert torch.isfinite(loss_module.logit_shifts()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(bad):
    losses = _gradient_losses() + [EQL(C, class_stats=class_stats([1, 2, 3, 4], 10))]
    for loss_module in losses:
        extra = 0 if isinstance(loss_module, EQL) else 1
        logits, labels = make_batch(6, extra=extra)
        logits[2, 1] = bad
        with pytest.raises(FloatingPointError, match=f"loss '{loss_module.name}': 1 of .* are NaN or inf"):
            loss_module(logits, labels)
        if not isinstance(loss_module, EQL):
            assert (loss_module.gradient_stats.pos_grad == 0).all()  # nothing was accumulated


def test_wrong_shapes_raise():
    with pytest.raises(ValueError, match=r"expects logits of shape \(N, 5\)"):
        EQLv2(C)(torch.zeros(3, C), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 labels for 3 logits"):
        SoftmaxEQL(C)(torch.zeros(3, C + 1), torch.zeros(2, dtype=torch.long))


def test_eval_mode_does_not_accumulate():
    for loss_module in _gradient_losses():
        loss_module.eval()
        logits, labels = make_batch(7)
        loss_module(logits, labels)
        assert (loss_module.gradient_stats.pos_grad == 0).all() and (loss_module.gradient_stats.neg_grad == 0).all()


# ----------------------------------------------------------------------------- precision and state
def test_mixed_precision_bf16():
    makers = (lambda: EQLv2(C), lambda: SoftmaxEQL(C), lambda: SoftmaxEQL(C, indicator="pos_and_neg", form="prior"))
    for make in makers:
        full, mixed, rounded = make(), make(), make()
        for iteration in range(2):
            logits, labels = make_batch(50 + iteration, num_rois=32)
            full(logits, labels)
            rounded(logits.bfloat16().float(), labels)
            half = logits.bfloat16().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mixed(half, labels)["loss_cls"]
            assert loss.dtype == torch.float32
            loss.backward()
            assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
        for name in ("pos_grad", "neg_grad"):
            mixed_value = getattr(mixed.gradient_stats, name)
            assert mixed_value.dtype == torch.float64
            # exactly the fp32 computation on the bf16 values, close to the fp32 run on the originals
            torch.testing.assert_close(mixed_value, getattr(rounded.gradient_stats, name), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(mixed_value, getattr(full.gradient_stats, name), rtol=2e-2, atol=1e-4)


def test_state_dict_resume_reproduces_next_iteration():
    for make in (lambda: EQLv2(C), lambda: SoftmaxEQL(C), lambda: SoftmaxEQL(C, indicator="neg", form="prior")):
        trained = make()
        for iteration in range(2):
            trained(*make_batch(60 + iteration))
        state = trained.state_dict()
        assert set(state) == {"gradient_stats.pos_grad", "gradient_stats.neg_grad"}
        assert state["gradient_stats.pos_grad"].dtype == torch.float64
        resumed = make()
        resumed.load_state_dict(state)
        logits, labels = make_batch(62)
        loss_a, grad_a = loss_and_grad(trained, logits, labels)
        loss_b, grad_b = loss_and_grad(resumed, logits, labels)
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
        for a, b in zip(stats_of(trained), stats_of(resumed)):
            assert torch.equal(a, b)
        # and a fresh loss (no resume) would have computed something else
        assert not torch.equal(loss_and_grad(make(), logits, labels)[0], loss_a)


# ----------------------------------------------------------------------------- two processes
ITERATIONS = 3


def _distributed_batches():
    """[iteration][rank] -> (logits, labels) of different sizes per rank."""
    batches = []
    for iteration in range(ITERATIONS):
        batches.append([make_batch(100 + 10 * iteration + rank, num_rois=6 + 2 * rank) for rank in range(2)])
    return batches


def _distributed_worker(rank, tmp_dir, batches):
    torch.set_num_threads(1)
    assert "detectron2" not in sys.modules, "the losses must not import Detectron2"
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=2)
    try:
        losses = {"eqlv2": EQLv2(C), "softmax_eql": SoftmaxEQL(C)}
        for iteration in range(ITERATIONS):
            logits, labels = batches[iteration][rank]
            for loss_module in losses.values():
                loss_and_grad(loss_module, logits, labels)
        states = {name: loss.state_dict() for name, loss in losses.items()}
        torch.save(states, os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_share_statistics(tmp_path):
    batches = _distributed_batches()
    mp.spawn(_distributed_worker, args=(str(tmp_path), batches), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in ("eqlv2", "softmax_eql"):
        for key in ("gradient_stats.pos_grad", "gradient_stats.neg_grad"):
            assert torch.equal(states[0][name][key], states[1][name][key]), (name, key)
        # one process that sees, every iteration, the contributions of both batches
        pos, neg = np.zeros(C), np.zeros(C)
        for iteration in range(ITERATIONS):
            pos_sum, neg_sum = np.zeros(C), np.zeros(C)
            for rank in range(2):
                logits, labels = batches[iteration][rank]
                if name == "eqlv2":
                    _, _, p, n = reference_eqlv2(logits.numpy(), labels.tolist(), pos, neg)
                else:
                    _, _, p, n = reference_softmax_eql(logits.numpy(), labels.tolist(), pos, neg)
                pos_sum, neg_sum = pos_sum + p, neg_sum + n
            pos, neg = pos + pos_sum, neg + neg_sum
        assert_close(states[0][name]["gradient_stats.pos_grad"], pos, rtol=1e-6)
        assert_close(states[0][name]["gradient_stats.neg_grad"], neg, rtol=1e-6)
        # and not what one process alone would have accumulated
        assert not np.allclose(states[0][name]["gradient_stats.neg_grad"].numpy(), neg / 2)
