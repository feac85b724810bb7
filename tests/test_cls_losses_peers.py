"""The image-classification peers of the detection losses (issue 19): sigmoid BCE, EQLv2, Seesaw,
IIF and Bal-BCE, each against a float64 reference written here with plain loops from the
authors' code (value, gradient, and for EQLv2 and Seesaw the state over several iterations and
through a state_dict round trip), and a quickstart config per loss that builds its model."""
import math
import os
import statistics

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification import build_image_loss

from classification_helpers import Counts, classification_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("sigmoid", "eqlv2", "seesaw", "iif", "bal_bce")


_node = classification_node


def _loss(name, num_classes, counts=None, **overrides):
    stats = None if counts is None else Counts(counts, dtype=torch.float32)
    return build_image_loss(_node(LOSS=name, **overrides), num_classes, class_stats=stats).train()


def _run(loss, logits, labels):
    """(value, gradient) of ``loss`` on float64 inputs (cast to float32 as a model's logits)."""
    x = torch.tensor(np.asarray(logits), dtype=torch.float32, requires_grad=True)
    value = loss(x, torch.as_tensor(np.asarray(labels), dtype=torch.long))["loss_cls"]
    value.backward()
    return value.item(), x.grad.double().numpy()


def _data(seed, n, c, scale=3.0, weights=None):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c)) * scale
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    labels = rng.choice(c, size=n, p=p)
    return logits, labels


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bce(x, t):
    return softplus(x) - t * x


def softmax_row(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    s = sum(e)
    return [v / s for v in e], top + math.log(s)


# -- sigmoid BCE ------------------------------------------------------------------------------


def reference_sigmoid(logits, labels, normalizer="batch"):
    n, c = logits.shape
    value, grad = 0.0, np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            t = 1.0 if j == labels[i] else 0.0
            value += bce(logits[i, j], t)
            grad[i, j] = sigmoid(logits[i, j]) - t
    norm = n if normalizer == "batch" else n * c
    return value / norm, grad / norm


@pytest.mark.parametrize("n,c,scale", [(7, 5, 3.0), (70, 9, 3.0), (33, 4, 60.0)])
@pytest.mark.parametrize("normalizer", ["batch", "elements"])
def test_sigmoid_value_and_gradient(n, c, scale, normalizer):
    logits, labels = _data(n * c, n, c, scale)
    value, grad = _run(_loss("sigmoid", c, **{"SIGMOID.NORMALIZER": normalizer}), logits, labels)
    ref_value, ref_grad = reference_sigmoid(logits, labels, normalizer)
    assert value == pytest.approx(ref_value, rel=2e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)


def test_sigmoid_scores_are_one_vs_all():
    loss = _loss("sigmoid", 3)
    z = torch.tensor([[0.0, 2.0, -1.0]])
    assert torch.allclose(loss.predict_probs(z), torch.sigmoid(z))


# -- EQLv2 ------------------------------------------------------------------------------------


class ReferenceEQLv2:
    """The authors' EQLv2 (tztztztztz/eqlv2, mmdet/models/losses/eqlv2.py) without the background
    column, in float64 loops: weights from pos_neg (100 at the start), Σ w·BCE / N, then
    pos/neg sums of |σ − y|·w (no 1/N)."""

    def __init__(self, c, gamma=12.0, mu=0.8, alpha=4.0):
        self.c, self.gamma, self.mu, self.alpha = c, gamma, mu, alpha
        self.pos_grad = [0.0] * c
        self.neg_grad = [0.0] * c
        self.pos_neg = [100.0] * c

    def step(self, logits, labels):
        n, c = logits.shape
        neg_w = [1.0 / (1.0 + math.exp(-self.gamma * (g - self.mu))) for g in self.pos_neg]
        pos_w = [1.0 + self.alpha * (1.0 - r) for r in neg_w]
        value, grad = 0.0, np.zeros((n, c))
        pos, neg = [0.0] * c, [0.0] * c
        for i in range(n):
            for j in range(c):
                t = 1.0 if j == labels[i] else 0.0
                w = pos_w[j] * t + neg_w[j] * (1.0 - t)
                value += w * bce(logits[i, j], t)
                err = sigmoid(logits[i, j]) - t
                grad[i, j] = w * err / n
                if t:
                    pos[j] += abs(err) * w
                else:
                    neg[j] += abs(err) * w
        for j in range(c):
            self.pos_grad[j] += pos[j]
            self.neg_grad[j] += neg[j]
            self.pos_neg[j] = self.pos_grad[j] / (self.neg_grad[j] + 1e-10)
        return value / n, grad


@pytest.mark.parametrize("n,c", [(12, 5), (70, 6)])
def test_eqlv2_three_iterations_match_the_reference(n, c):
    weights = [30, 10, 3, 1, 0.3, 0.1][:c]
    ours = _loss("eqlv2", c, **{"EQLV2.GAMMA": 12.0, "EQLV2.MU": 0.8, "EQLV2.ALPHA": 4.0})
    ref = ReferenceEQLv2(c)
    for step in range(3):
        logits, labels = _data(100 + step, n, c, 2.0, weights)
        value, grad = _run(ours, logits, labels)
        ref_value, ref_grad = ref.step(logits, labels)
        assert value == pytest.approx(ref_value, rel=2e-6), step
        np.testing.assert_allclose(grad, ref_grad, atol=2e-7, err_msg=str(step))
        np.testing.assert_allclose(ours.gradient_stats.pos_grad.numpy(), ref.pos_grad, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(ours.gradient_stats.neg_grad.numpy(), ref.neg_grad, rtol=2e-6, atol=1e-7)
    # the weights have moved off plain BCE: the rarest class's ratio is far below μ
    neg_weight, pos_weight = ours.class_weights()
    assert float(neg_weight.min()) < 0.5 and float(pos_weight.max()) > 2.0


def test_eqlv2_first_iteration_is_plain_bce_and_state_round_trips():
    c = 4
    logits, _ = _data(7, 9, c)
    labels = np.zeros(9, dtype=np.int64)  # only class 0 seen: the other classes' ratios become 0
    loss = _loss("eqlv2", c)
    value, grad = _run(loss, logits, labels)
    ref_value, ref_grad = reference_sigmoid(logits, labels)
    assert value == pytest.approx(ref_value, rel=2e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)
    state = loss.state_dict()
    assert state["gradient_stats.pos_grad"].dtype == torch.float64 and set(state) == {
        "gradient_stats.pos_grad", "gradient_stats.neg_grad"}
    restored = _loss("eqlv2", c)
    restored.load_state_dict(state)
    logits, labels = _data(8, 9, c)
    value_restored, grad_restored = _run(restored, logits, labels)
    value, grad = _run(loss, logits, labels)
    assert value_restored == value and np.array_equal(grad_restored, grad)
    assert torch.equal(restored.gradient_stats.pos_grad, loss.gradient_stats.pos_grad)
    assert torch.equal(restored.gradient_stats.neg_grad, loss.gradient_stats.neg_grad)
    # a fresh loss (no statistics) differs: the state is what carries the weights
    assert _run(_loss("eqlv2", c), logits, labels)[0] == pytest.approx(reference_sigmoid(logits, labels)[0], rel=2e-6)
    assert value < reference_sigmoid(logits, labels)[0] - 0.1


def test_eqlv2_eval_mode_keeps_state_and_scores_sigmoid():
    loss = _loss("eqlv2", 3).eval()
    _run(loss, *_data(1, 4, 3))
    assert float(loss.gradient_stats.pos_grad.abs().sum()) == 0.0
    z = torch.tensor([[0.5, -2.0, 1.0]])
    assert torch.allclose(loss.predict_probs(z), torch.sigmoid(z))


# -- Seesaw -----------------------------------------------------------------------------------


class ReferenceSeesaw:
    """mmpretrain's SeesawLoss (mmpretrain/models/losses/seesaw_loss.py) in float64 loops:
    counts updated with the batch first, mitigation (N_j/N_y)^p where N_j < N_y, compensation
    (σ_j / max(σ_y, eps))^q where > 1, CE of z + log S off the label, mean over the batch."""

    def __init__(self, c, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        self.c, self.p, self.q, self.eps, self.loss_weight = c, p, q, eps, loss_weight
        self.cum = [0.0] * c

    def step(self, logits, labels):
        n, c = logits.shape
        for y in labels:
            self.cum[y] += 1
        value, grad = 0.0, np.zeros((n, c))
        for i in range(n):
            y = labels[i]
            probs, _ = softmax_row(list(logits[i]))
            adjusted = []
            for j in range(c):
                s = 1.0
                if self.p > 0:
                    ratio = max(self.cum[j], 1) / max(self.cum[y], 1)
                    s *= ratio ** self.p if ratio < 1.0 else 1.0
                if self.q > 0:
                    ratio = probs[j] / max(probs[y], self.eps)
                    s *= ratio ** self.q if ratio > 1.0 else 1.0
                adjusted.append(logits[i, j] + (math.log(s) if j != y else 0.0))
            p_adj, lse = softmax_row(adjusted)
            value += lse - adjusted[y]
            for j in range(c):
                grad[i, j] = (p_adj[j] - (1.0 if j == y else 0.0)) / n
        return self.loss_weight * value / n, self.loss_weight * grad


@pytest.mark.parametrize("p,q,loss_weight", [(0.8, 2.0, 1.0), (0.0, 2.0, 1.0), (0.8, 0.0, 1.0), (1.5, 1.0, 0.5)])
def test_seesaw_three_iterations_match_mmpretrain(p, q, loss_weight):
    c = 6
    ours = _loss("seesaw", c, **{"SEESAW.P": p, "SEESAW.Q": q, "SEESAW.LOSS_WEIGHT": loss_weight})
    ref = ReferenceSeesaw(c, p=p, q=q, loss_weight=loss_weight)
    for step in range(3):
        logits, labels = _data(200 + step, 11, c, 3.0, [20, 8, 4, 2, 1, 0.5])
        value, grad = _run(ours, logits, labels)
        ref_value, ref_grad = ref.step(logits, labels)
        assert value == pytest.approx(ref_value, rel=2e-6), step
        np.testing.assert_allclose(grad, ref_grad, atol=2e-7, err_msg=str(step))
        np.testing.assert_allclose(ours.cumulative_count.numpy(), ref.cum)


def test_seesaw_hand_value_and_eps():
    """Two classes, counts after the batch N = (3, 1): sample 0 (label 0) gets mitigation
    (1/3)^0.8 on class 1; sample 1 (label 1) has σ_y = e^-6/(1+e^-6) < eps = 0.01, so its
    compensation is (σ_0 / 0.01)^2 on class 0."""
    loss = _loss("seesaw", 2)
    logits = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, -3.0]]
    value, _ = _run(loss, logits, [0, 0, 0, 1])
    m = (1.0 / 3.0) ** 0.8
    row_label0 = math.log(1 + m)  # z̃ = (0, log m)
    s0 = 1 / (1 + math.exp(-6.0))
    comp = (s0 / 0.01) ** 2
    row_label1 = math.log(1 + math.exp(6.0) * comp)  # z̃_0 = 3 + log comp, z̃_1 = -3
    assert value == pytest.approx((3 * row_label0 + row_label1) / 4, rel=1e-6)


def test_seesaw_loss_is_exact_where_the_label_probability_underflows():
    c = 4
    logits = np.array([[200.0, 0.0, -50.0, 10.0], [0.0, 1.0, 2.0, 3.0]])
    labels = np.array([2, 0])
    ref = ReferenceSeesaw(c)
    value, grad = _run(_loss("seesaw", c), logits, labels)
    ref_value, ref_grad = ref.step(logits, labels)
    assert math.isfinite(value) and value == pytest.approx(ref_value, rel=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)


def test_seesaw_counts_round_trip_and_eval_keeps_them():
    c = 5
    loss = _loss("seesaw", c)
    _run(loss, *_data(3, 10, c, weights=[5, 3, 1, 1, 0.2]))
    state = loss.state_dict()
    assert list(state) == ["cumulative_count"] and state["cumulative_count"].dtype == torch.float64
    assert float(state["cumulative_count"].sum()) == 10
    restored = _loss("seesaw", c)
    restored.load_state_dict(state)
    batch = _data(4, 10, c, weights=[5, 3, 1, 1, 0.2])
    v1, g1 = _run(restored, *batch)
    v2, g2 = _run(loss, *batch)
    assert v1 == v2 and np.array_equal(g1, g2)
    assert torch.equal(restored.cumulative_count, loss.cumulative_count)
    loss.eval()
    _run(loss, *batch)
    assert torch.equal(restored.cumulative_count, loss.cumulative_count)
    z = torch.tensor([[1.0, 0.0, 2.0, -1.0, 0.5]])
    assert torch.allclose(loss.predict_probs(z), torch.softmax(z, dim=1))


# -- IIF --------------------------------------------------------------------------------------


def reference_iif_weights(counts, variant, norm=0):
    """kostas1515/iif classification/custom.py, with M = Σ counts (their freqs.sum())."""
    m = float(sum(counts))
    inv = statistics.NormalDist().inv_cdf
    table = {
        "raw": lambda f: math.log(m / f),
        "smooth": lambda f: math.log((m + 1) / (f + 1)) + 1,
        "rel": lambda f: math.log((m - f) / f),
        "normit": lambda f: -inv(f / m),
        "gombit": lambda f: -math.log(-math.log(1 - f / m)),
        "base2": lambda f: math.log2(m / f),
        "base10": lambda f: math.log10(m / f),
    }
    w = [table[variant](float(f)) for f in counts]
    if norm > 0:
        total = sum(abs(v) ** norm for v in w) ** (1.0 / norm)
        w = [v / total for v in w]
    return w


def reference_weighted_ce(logits, labels, weights):
    n, c = logits.shape
    value, grad = 0.0, np.zeros((n, c))
    for i in range(n):
        row = [weights[j] * logits[i, j] for j in range(c)]
        probs, lse = softmax_row(row)
        value += lse - row[labels[i]]
        for j in range(c):
            grad[i, j] = weights[j] * (probs[j] - (1.0 if j == labels[i] else 0.0)) / n
    return value / n, grad


@pytest.mark.parametrize("variant", ["raw", "smooth", "rel", "normit", "gombit", "base2", "base10"])
@pytest.mark.parametrize("norm", [0, 2])
def test_iif_variants_value_gradient_and_scores(variant, norm):
    counts = [500, 120, 40, 9, 2]
    logits, labels = _data(9, 8, 5, 2.0)
    loss = _loss("iif", 5, counts, **{"IIF.VARIANT": variant, "IIF.IIF_NORM": norm})
    weights = reference_iif_weights(counts, variant, norm)
    np.testing.assert_allclose(loss.logit_weights().double().numpy(), weights, rtol=1e-6)
    value, grad = _run(loss, logits, labels)
    ref_value, ref_grad = reference_weighted_ce(logits, labels, weights)
    assert value == pytest.approx(ref_value, rel=2e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-7)
    # inference: their evaluate ranks the weighted logits; we return their softmax
    probs = loss.predict_probs(torch.tensor(logits, dtype=torch.float32)).double().numpy()
    for i in range(len(labels)):
        np.testing.assert_allclose(probs[i], softmax_row([weights[j] * logits[i, j] for j in range(5)])[0], atol=1e-6)


def test_iif_defaults_are_the_authors_recipes():
    loss = _loss("iif", 3, [10, 5, 1])
    assert loss.variant == "smooth" and loss.iif_norm == 0
    with pytest.raises(ValueError, match="IIF.VARIANT"):
        _loss("iif", 3, [10, 5, 1], **{"IIF.VARIANT": "prob"})


def test_iif_loss_is_exact_where_the_label_probability_underflows():
    counts = [100, 10, 1]
    logits = np.array([[80.0, 0.0, -80.0], [1.0, 2.0, 3.0]])
    labels = np.array([2, 1])
    loss = _loss("iif", 3, counts, **{"IIF.VARIANT": "raw"})
    value, grad = _run(loss, logits, labels)
    ref_value, ref_grad = reference_weighted_ce(logits, labels, reference_iif_weights(counts, "raw"))
    assert ref_value > 100 and value == pytest.approx(ref_value, rel=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)


# -- Bal-BCE ----------------------------------------------------------------------------------


def reference_bal_bce(logits, labels, counts, tau=1.0, smoothing=0.1):
    """LiVT util/loss.py BCE_loss(type='Bal'): x + K (log π − log(1 − π)), smoothed one-hot
    (off s/C, on 1 − s + s/C), C · mean BCE."""
    n, c = logits.shape
    total = float(sum(counts))
    off = smoothing / c
    on = 1.0 - smoothing + off
    value, grad = 0.0, np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            pi = counts[j] / total
            x = logits[i, j] + tau * (math.log(pi) - math.log(1 - pi))
            t = on if j == labels[i] else off
            value += bce(x, t)
            grad[i, j] = (sigmoid(x) - t) / n
    return c * value / (n * c), grad


@pytest.mark.parametrize("n,tau,smoothing", [(7, 1.0, 0.1), (70, 0.5, 0.0), (9, 1.0, 0.3)])
def test_bal_bce_value_and_gradient(n, tau, smoothing):
    counts = [300, 90, 30, 10, 3, 1]
    logits, labels = _data(n, n, 6, 3.0)
    loss = _loss("bal_bce", 6, counts, **{"BAL_BCE.TAU": tau, "BAL_BCE.SMOOTHING": smoothing})
    value, grad = _run(loss, logits, labels)
    ref_value, ref_grad = reference_bal_bce(logits, labels, counts, tau, smoothing)
    assert value == pytest.approx(ref_value, rel=2e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-7)


def test_bal_bce_defaults_and_scores():
    loss = _loss("bal_bce", 3, [10, 5, 1])
    assert (loss.tau, loss.smoothing) == (1.0, 0.1)
    z = torch.tensor([[1.0, 0.0, 2.0]])
    assert torch.allclose(loss.predict_probs(z), torch.softmax(z, dim=1))  # no prior at inference
    with pytest.raises(ValueError, match="BAL_BCE.SMOOTHING"):
        _loss("bal_bce", 3, [10, 5, 1], **{"BAL_BCE.SMOOTHING": 1.0})


def test_prior_losses_need_counts():
    for name in ("iif", "bal_bce"):
        with pytest.raises(RuntimeError, match="per-class image counts"):
            _run(_loss(name, 3), *_data(0, 2, 3))


# -- shared -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_non_finite_logits_are_refused_and_empty_batches_are_zero(name):
    loss = _loss(name, 3, [5, 3, 1])
    with pytest.raises(FloatingPointError):
        loss(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]))
    x = torch.zeros(0, 3, requires_grad=True)
    value = loss(x, torch.zeros(0, dtype=torch.long))["loss_cls"]
    value.backward()
    assert value.item() == 0.0


@pytest.mark.parametrize("name", PEERS)
def test_quickstart_config_builds_the_loss(name):
    from detectron2.modeling import build_model

    from eqlosses_d2.config import merge_config_file

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, "configs", "quickstart", f"{name}_R18_synthetic_cls.yaml"))
    assert cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS == name
    base = get_cfg()
    add_eqlosses_config(base)
    merge_config_file(base, os.path.join(ROOT, "configs", "quickstart", "Base-Synthetic-Classification-R18.yaml"))
    base.MODEL.EQLOSSES.CLASSIFICATION.LOSS = name
    base.OUTPUT_DIR = cfg.OUTPUT_DIR
    assert base == cfg  # only the loss (and the output directory) differ from the base
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.loss.name == name and model.loss.num_classes == cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES


# -- two processes ----------------------------------------------------------------------------


def _two_rank_step(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for name in ("eqlv2", "seesaw"):
            loss = _loss(name, 5)
            for step in range(2):
                logits, labels = _data(300 + 10 * step + rank, 6 + 3 * rank, 5, 2.0, [9, 4, 2, 1, 0.5])
                _run(loss, logits, labels)
            results[name] = {k: v.clone() for k, v in loss.state_dict().items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_state_is_summed_over_two_processes(tmp_path):
    """EQLv2's gradient statistics and Seesaw's counts after two steps on two gloo processes (6 and
    9 samples a step) are the same on both ranks and equal one process's on the concatenated batches."""
    torch.multiprocessing.spawn(_two_rank_step, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    singles = {name: _loss(name, 5) for name in ("eqlv2", "seesaw")}
    for step in range(2):
        parts = [_data(300 + 10 * step + r, 6 + 3 * r, 5, 2.0, [9, 4, 2, 1, 0.5]) for r in range(2)]
        logits = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        for loss in singles.values():
            _run(loss, logits, labels)
    for name, loss in singles.items():
        for key, value in loss.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            # EQLv2's per-process sums add up in another order than one batch's: float rounding
            assert torch.allclose(ranks[0][name][key], value, rtol=1e-6, atol=1e-9), (name, key)
    assert float(ranks[0]["seesaw"]["cumulative_count"].sum()) == 30
