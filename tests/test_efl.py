"""
Sigmoid focal loss and EFL against their formulas.

Expected values come from the formulas (method specification, "One-stage"), written out
with explicit loops in float64 numpy (``reference_efl``), never from the losses' own
helpers; its hand-derived gradient is itself checked against central differences, and
the 1-anchor case has its numbers written out by hand.
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
    # a worker of the two-process test: the losses without the package's __init__ (no
    # Detectron2), which also checks that they are pure PyTorch
    _package = types.ModuleType("eqlosses_d2")
    _package.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eqlosses_d2")]
    sys.modules.setdefault("eqlosses_d2", _package)

from eqlosses_d2.losses import dense, efl, focal  # noqa: E402

EFL = efl.EqualizedFocalLoss
Focal = focal.SigmoidFocalLoss

C = 5  # foreground classes; label C is background


# ----------------------------------------------------------------------------- reference
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_factors(pos_grad, neg_grad, gamma_b=2.0, scale=8.0):
    gammas = []
    for pos, neg in zip(pos_grad, neg_grad):
        ratio = min(max(pos / (neg + 1e-10), 0.0), 1.0) if (pos > 0 or neg > 0) else 1.0
        gammas.append(gamma_b + scale * (1.0 - ratio))
    return np.array(gammas)


def reference_term(z, y, gamma, weight, alpha):
    """α_t · w · (1 − p_t)^γ · (−log p_t) of one entry."""
    p = _sigmoid(z)
    p_t = p if y else 1.0 - p
    alpha_t = (alpha if y else 1.0 - alpha) if alpha >= 0 else 1.0
    return alpha_t * weight * (1.0 - p_t) ** gamma * -math.log(p_t)


def reference_term_grad(z, y, gamma, weight, alpha):
    """d/dz of :func:`reference_term`, derived by hand: with u = 1 − p_t, s = ±1,
    −s α_t w u^γ (u − γ p_t log p_t)."""
    p = _sigmoid(z)
    p_t = p if y else 1.0 - p
    alpha_t = (alpha if y else 1.0 - alpha) if alpha >= 0 else 1.0
    sign = 1.0 if y else -1.0
    u = 1.0 - p_t
    return -sign * alpha_t * weight * u**gamma * (u - gamma * p_t * math.log(p_t))


def reference_efl(logits, labels, pos_grad, neg_grad, normalizer, alpha=0.25, gamma_b=2.0, scale=8.0,
                  stats_scale=1.0):
    """One EFL iteration from the statistics before it: loss, dL/dz and this batch's
    (pos, neg) contributions Σ|dL/dz| (normalized loss) times ``stats_scale``."""
    logits = np.asarray(logits, dtype=np.float64)
    n, c = logits.shape
    gammas = reference_factors(pos_grad, neg_grad, gamma_b, scale)
    loss, grad = 0.0, np.zeros((n, c))
    pos, neg = np.zeros(c), np.zeros(c)
    for i in range(n):
        for j in range(c):
            y = labels[i] == j
            weight = gammas[j] / gamma_b
            loss += reference_term(logits[i, j], y, gammas[j], weight, alpha) / normalizer
            grad[i, j] = reference_term_grad(logits[i, j], y, gammas[j], weight, alpha) / normalizer
            if y:
                pos[j] += abs(grad[i, j]) * stats_scale
            else:
                neg[j] += abs(grad[i, j]) * stats_scale
    return loss, grad, pos, neg


def make_batch(seed, num_anchors=40, num_classes=C, background=0.6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_anchors, num_classes, generator=generator) * 3.0 - 2.0
    labels = torch.randint(0, num_classes, (num_anchors,), generator=generator)
    is_background = torch.rand(num_anchors, generator=generator) < background
    labels[is_background] = num_classes
    return logits, labels


def loss_and_grad(loss_module, logits, labels, normalizer):
    leaf = logits.clone().requires_grad_(True)
    loss = loss_module(leaf, labels, normalizer=normalizer)["loss_cls"]
    loss.backward()
    return loss.detach(), leaf.grad


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the reference itself
def test_reference_gradient_matches_central_differences():
    for z in (-6.0, -1.3, 0.0, 0.7, 4.0):
        for y in (True, False):
            for gamma in (2.0, 5.5, 10.0):
                h = 1e-6
                numeric = (reference_term(z + h, y, gamma, 1.7, 0.25) - reference_term(z - h, y, gamma, 1.7, 0.25)) / (2 * h)
                assert reference_term_grad(z, y, gamma, 1.7, 0.25) == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def test_one_anchor_by_hand():
    # z = 0, y = 1: p_t = 1/2; γ = 2, α = 0.25:
    # L = 0.25 · (1/2)^2 · log 2 = 0.0433217...;  dL/dz = −0.25 · (1/2)^2 · (1/2 + 2 · (1/2) · log 2) = −0.0745422...
    loss, grad = loss_and_grad(Focal(1), torch.zeros(1, 1), torch.tensor([0]), 1.0)
    assert loss.item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    assert grad.item() == pytest.approx(-0.25 * 0.25 * (0.5 + math.log(2)), rel=1e-6)
    # the same anchor as a background one: p_t = 1/2 too, α_t = 0.75, gradient +
    loss, grad = loss_and_grad(Focal(1), torch.zeros(1, 1), torch.tensor([1]), 2.0)
    assert loss.item() == pytest.approx(0.75 * 0.25 * math.log(2) / 2, rel=1e-6)
    assert grad.item() == pytest.approx(0.75 * 0.25 * (0.5 + math.log(2)) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- focal loss
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5), (-1.0, 0.0), (0.25, 3.0)])
def test_focal_matches_fvcore(alpha, gamma):
    from fvcore.nn import sigmoid_focal_loss

    logits, labels = make_batch(1)
    target = torch.zeros(len(labels), C + 1)
    target[torch.arange(len(labels)), labels] = 1.0
    leaf = logits.clone().requires_grad_(True)
    expected = sigmoid_focal_loss(leaf, target[:, :C], alpha=alpha, gamma=gamma, reduction="sum") / 7.0
    expected.backward()
    loss, grad = loss_and_grad(Focal(C, alpha=alpha, gamma=gamma), logits, labels, 7.0)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_efl_without_scale_factor_is_focal_and_fvcore():
    from fvcore.nn import sigmoid_focal_loss

    efl_loss = EFL(C, scale_factor=0.0)
    for iteration in range(3):  # statistics accumulate, but s = 0 ignores them
        logits, labels = make_batch(10 + iteration)
        target = torch.zeros(len(labels), C + 1)
        target[torch.arange(len(labels)), labels] = 1.0
        leaf = logits.clone().requires_grad_(True)
        expected = sigmoid_focal_loss(leaf, target[:, :C], alpha=0.25, gamma=2.0, reduction="sum") / 3.0
        expected.backward()
        loss, grad = loss_and_grad(efl_loss, logits, labels, 3.0)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)
    assert (efl_loss.gradient_stats.neg_grad > 0).all()


# ----------------------------------------------------------------------------- EFL
def test_efl_first_iteration_is_focal():
    logits, labels = make_batch(3)
    a = loss_and_grad(EFL(C), logits, labels, 4.0)
    b = loss_and_grad(Focal(C), logits, labels, 4.0)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_efl_iterations_match_formula():
    loss_module = EFL(C)
    pos, neg = np.zeros(C), np.zeros(C)
    for iteration in range(4):
        logits, labels = make_batch(20 + iteration)
        normalizer = max(1, int((labels < C).sum()))
        expected_loss, expected_grad, p, n = reference_efl(logits.numpy(), labels.tolist(), pos, neg, normalizer)
        # the factors of this iteration come from the statistics before it
        gamma, weight = loss_module.focusing_factors()
        stats = loss_module.gradient_stats
        own = reference_factors(stats.pos_grad.tolist(), stats.neg_grad.tolist())
        assert_close(gamma, own, rtol=1e-12)
        assert_close(weight, own / 2.0, rtol=1e-12)
        assert_close(gamma, reference_factors(pos, neg), rtol=1e-6)
        loss, grad = loss_and_grad(loss_module, logits, labels, normalizer)
        assert loss.item() == pytest.approx(expected_loss, rel=2e-5)
        assert_close(grad, expected_grad, rtol=2e-4, atol=1e-7)
        pos, neg = pos + p, neg + n
        assert_close(loss_module.gradient_stats.pos_grad, pos, rtol=2e-5, atol=1e-9)
        assert_close(loss_module.gradient_stats.neg_grad, neg, rtol=2e-5, atol=1e-9)
    # after a few iterations the classes' factors differ, and are those of the formula
    gamma, weight = loss_module.focusing_factors()
    assert_close(gamma, reference_factors(pos, neg), rtol=2e-5)
    assert float(gamma.max() - gamma.min()) > 0.5
    assert bool((gamma >= 2.0).all() and (gamma <= 10.0).all())
    torch.testing.assert_close(weight, gamma / 2.0)


def test_efl_ratio_is_clamped_and_unseen_class_gets_the_largest_factor():
    loss_module = EFL(3)
    loss_module.gradient_stats.pos_grad.copy_(torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64))
    loss_module.gradient_stats.neg_grad.copy_(torch.tensor([1.0, 4.0, 3.0], dtype=torch.float64))
    gamma, weight = loss_module.focusing_factors()
    # g = (1 (clamped from 5), 0.25, 0): γ = 2 + 8 (1 − g)
    assert gamma.tolist() == pytest.approx([2.0, 8.0, 10.0])
    assert weight.tolist() == pytest.approx([1.0, 4.0, 5.0])


def test_no_positive_anchors():
    loss_module = EFL(C)
    logits = make_batch(4)[0]
    labels = torch.full((logits.shape[0],), C)
    expected, expected_grad, p, n = reference_efl(logits.numpy(), labels.tolist(), np.zeros(C), np.zeros(C), 1.0)
    loss, grad = loss_and_grad(loss_module, logits, labels, 1.0)
    assert loss.item() == pytest.approx(expected, rel=2e-5)
    assert_close(grad, expected_grad, rtol=2e-4, atol=1e-7)
    assert (loss_module.gradient_stats.pos_grad == 0).all()
    assert_close(loss_module.gradient_stats.neg_grad, n, rtol=2e-5)
    # every ratio is now 0: every class gets γ_b + s
    assert loss_module.focusing_factors()[0].tolist() == pytest.approx([10.0] * C)


def test_zero_anchors():
    for loss_module in (EFL(C), Focal(C)):
        leaf = torch.zeros(0, C, requires_grad=True)
        loss = loss_module(leaf, torch.zeros(0, dtype=torch.long))["loss_cls"]
        loss.backward()
        assert loss.item() == 0.0 and leaf.grad.shape == (0, C)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad):
    logits, labels = make_batch(5)
    logits[3, 1] = bad
    for loss_module in (EFL(C), Focal(C)):
        with pytest.raises(FloatingPointError) as e:
            loss_module(logits, labels, normalizer=1.0)
        assert "\n" not in str(e.value) and "NaN or inf" in str(e.value)
    assert (EFL(C).gradient_stats.neg_grad == 0).all()


def test_bad_inputs_and_hyper_parameters_raise():
    logits, labels = make_batch(6)
    with pytest.raises(ValueError, match="labels must be in"):
        EFL(C)(logits, torch.full_like(labels, -1))
    with pytest.raises(ValueError, match="shape"):
        EFL(C)(logits[:, :2], labels)
    with pytest.raises(ValueError, match="normalizer"):
        EFL(C)(logits, labels, normalizer=0.0)
    with pytest.raises(ValueError, match="GAMMA"):
        EFL(C, gamma=0.0)
    with pytest.raises(ValueError, match="SCALE_FACTOR"):
        EFL(C, scale_factor=-1.0)
    with pytest.raises(ValueError, match="GAMMA"):
        Focal(C, gamma=-1.0)


def test_second_backward_is_a_clear_error():
    logits, labels = make_batch(7)
    leaf = logits.clone().requires_grad_(True)
    loss = EFL(C)(leaf, labels)["loss_cls"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_eval_mode_does_not_accumulate():
    loss_module = EFL(C).eval()
    loss_module(*make_batch(8), normalizer=2.0)
    assert (loss_module.gradient_stats.pos_grad == 0).all() and (loss_module.gradient_stats.neg_grad == 0).all()


def test_large_chunked_problem_matches_autograd():
    # more rows than one CPU chunk; compare against plain autograd of the formula
    generator = torch.Generator().manual_seed(9)
    num_classes = 37
    logits = torch.randn(5000, num_classes, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, num_classes + 1, (5000,), generator=generator)
    gamma = 2.0 + 8.0 * torch.rand(num_classes, generator=generator, dtype=torch.float64)
    loss_module = EFL(num_classes)
    loss_module.gradient_stats.pos_grad.copy_(10.0 - (gamma - 2.0) * 10.0 / 8.0)
    loss_module.gradient_stats.neg_grad.fill_(10.0)
    gamma_used, weight = loss_module.focusing_factors()
    torch.testing.assert_close(gamma_used, gamma)
    leaf = logits.clone().requires_grad_(True)
    target = torch.zeros(5000, num_classes + 1, dtype=torch.float64)
    target[torch.arange(5000), labels] = 1
    target = target[:, :num_classes]
    p = torch.sigmoid(leaf)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    expected = (alpha_t * weight * (1 - p_t) ** gamma * -torch.log(p_t)).sum() / 123.0
    expected.backward()
    loss, grad = loss_and_grad(loss_module, logits.float(), labels, 123.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-4, atol=1e-8)
    abs_grad = leaf.grad.abs()
    pos = (abs_grad * target).sum(0)
    neg = (abs_grad * (1 - target)).sum(0)
    torch.testing.assert_close(loss_module.gradient_stats.pos_grad, 10.0 - (gamma - 2.0) * 1.25 + pos, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss_module.gradient_stats.neg_grad, 10.0 + neg, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- precision and state
def test_mixed_precision_bf16():
    full, mixed, rounded = EFL(C), EFL(C), EFL(C)
    for iteration in range(3):
        logits, labels = make_batch(30 + iteration)
        full(logits, labels, normalizer=5.0)
        rounded(logits.bfloat16().float(), labels, normalizer=5.0)
        half = logits.bfloat16().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mixed(half, labels, normalizer=5.0)["loss_cls"]
        assert loss.dtype == torch.float32
        loss.backward()
        assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
    for name in ("pos_grad", "neg_grad"):
        value = getattr(mixed.gradient_stats, name)
        assert value.dtype == torch.float64
        # exactly the fp32 computation on the bf16 values, close to the fp32 run on the originals
        torch.testing.assert_close(value, getattr(rounded.gradient_stats, name), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(value, getattr(full.gradient_stats, name), rtol=3e-2, atol=1e-4)


def test_state_dict_resume_reproduces_next_iteration():
    trained = EFL(C)
    for iteration in range(3):
        trained(*make_batch(40 + iteration), normalizer=4.0)
    state = trained.state_dict()
    assert set(state) == {"gradient_stats.pos_grad", "gradient_stats.neg_grad"}
    assert state["gradient_stats.pos_grad"].dtype == torch.float64
    resumed = EFL(C)
    resumed.load_state_dict(state)
    logits, labels = make_batch(43)
    loss_a, grad_a = loss_and_grad(trained, logits, labels, 4.0)
    loss_b, grad_b = loss_and_grad(resumed, logits, labels, 4.0)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert torch.equal(trained.gradient_stats.pos_grad, resumed.gradient_stats.pos_grad)
    assert torch.equal(trained.gradient_stats.neg_grad, resumed.gradient_stats.neg_grad)
    assert not torch.equal(loss_and_grad(EFL(C), logits, labels, 4.0)[0], loss_a)


def test_scalars_per_frequency_group():
    stats = types.SimpleNamespace(frequency_group=torch.tensor([0, 0, 1, 2, 2]), is_set=torch.tensor(True))
    loss_module = EFL(C, class_stats=stats)
    loss_module.gradient_stats.pos_grad.copy_(torch.tensor([0.0, 0.5, 1.0, 2.0, 2.0], dtype=torch.float64))
    loss_module.gradient_stats.neg_grad.fill_(2.0)
    scalars = loss_module.scalars()
    # g = (0, 0.25, 0.5, 1, 1): γ = (10, 8, 6, 2, 2)
    assert scalars["gamma_r"] == pytest.approx(9.0)
    assert scalars["gamma_c"] == pytest.approx(6.0)
    assert scalars["gamma_f"] == pytest.approx(2.0)
    assert scalars["gamma"] == pytest.approx(28.0 / 5)
    assert scalars["pos_neg_ratio_r"] == pytest.approx(0.125)
    # without class statistics, only the overall means
    assert set(EFL(C).scalars()) == {"gamma", "pos_neg_ratio"}


def test_registered_with_config_nodes():
    assert dense.DENSE_LOSS_REGISTRY.get("efl") is EFL and EFL.config_node == "EFL"
    assert dense.DENSE_LOSS_REGISTRY.get("focal") is Focal and Focal.config_node == "FOCAL"
    with pytest.raises(KeyError, match="ONE_STAGE.LOSS: unknown loss 'nope'"):
        dense.build_dense_loss("nope", 3)


# ----------------------------------------------------------------------------- two processes
ITERATIONS = 3


def _distributed_batches():
    """[iteration][rank] -> (logits, labels), of different sizes per rank; one rank of the
    second iteration has no positive anchor."""
    batches = []
    for iteration in range(ITERATIONS):
        per_rank = []
        for rank in range(2):
            logits, labels = make_batch(100 + 10 * iteration + rank, num_anchors=30 + 7 * rank)
            if iteration == 1 and rank == 0:
                labels[:] = C
            per_rank.append((logits, labels))
        batches.append(per_rank)
    return batches


def _distributed_worker(rank, tmp_dir, batches):
    torch.set_num_threads(1)
    assert "detectron2" not in sys.modules, "the losses must not import Detectron2"
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=2)
    try:
        loss_module = EFL(C)
        normalizers = []
        for iteration in range(ITERATIONS):
            logits, labels = batches[iteration][rank]
            normalizer = dense.positive_anchor_normalizer(int((labels < C).sum()))
            normalizers.append(normalizer)
            loss_and_grad(loss_module, logits, labels, normalizer)
        torch.save({"state": loss_module.state_dict(), "normalizers": normalizers},
                   os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_share_statistics(tmp_path):
    batches = _distributed_batches()
    mp.spawn(_distributed_worker, args=(str(tmp_path), batches), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key in ("gradient_stats.pos_grad", "gradient_stats.neg_grad"):
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    # one process that sees both batches each iteration, normalized by their positive count
    single = EFL(C)
    pos, neg = np.zeros(C), np.zeros(C)
    for iteration in range(ITERATIONS):
        logits = torch.cat([batches[iteration][r][0] for r in range(2)])
        labels = torch.cat([batches[iteration][r][1] for r in range(2)])
        total = int((labels < C).sum())
        # each rank divides by max(1, P) / W
        assert ranks[0]["normalizers"][iteration] == ranks[1]["normalizers"][iteration] == max(1, total) / 2
        _, _, p, n = reference_efl(logits.numpy(), labels.tolist(), pos, neg, max(1, total))
        pos, neg = pos + p, neg + n
        single(logits, labels, normalizer=max(1, total))
    state = ranks[0]["state"]
    assert_close(state["gradient_stats.pos_grad"], pos, rtol=2e-5, atol=1e-9)
    assert_close(state["gradient_stats.neg_grad"], neg, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(state["gradient_stats.pos_grad"], single.gradient_stats.pos_grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(state["gradient_stats.neg_grad"], single.gradient_stats.neg_grad, rtol=1e-6, atol=1e-12)
