"""
The fused computations behind the classification losses' speed (kernels.py, Seesaw's two
paths, Bal-BCE's cached prior shift), each against float64 written here or the other path.
"""
import math

import numpy as np
import pytest
import torch

from eqlosses_d2.classification.losses import bal_bce, seesaw
from eqlosses_d2.classification.losses.kernels import softmax_ce_rows_and_grad


def _ce_reference(x, labels, scale, w=None):
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape
    w = np.ones(c) if w is None else np.asarray(w, dtype=np.float64)
    value, grad = 0.0, np.zeros((n, c))
    for i in range(n):
        top = max(x[i])
        lse = top + math.log(sum(math.exp(v - top) for v in x[i]))
        value += (lse - x[i, labels[i]]) * scale
        for j in range(c):
            grad[i, j] = scale * w[j] * (math.exp(x[i, j] - lse) - (1.0 if j == labels[i] else 0.0))
    return value, grad


@pytest.mark.parametrize("underflow", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_ce_rows_both_branches(underflow, weighted):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g) * 3
    if underflow:  # label probability e^-150: the row-max branch
        x[2] = torch.tensor([100.0, 0.0, -50.0, 3.0, 1.0])
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25]) if weighted else None
    loss, grad = softmax_ce_rows_and_grad(x.clone(), labels, 0.25, column_weight=w)
    ref_value, ref_grad = _ce_reference(x.numpy(), labels.numpy(), 0.25, None if w is None else w.numpy())
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(ref_value, rel=1e-6)
    np.testing.assert_allclose(grad.numpy(), ref_grad, atol=2e-7)


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.8, 1.0), (0.0, 2.0), (1.5, 0.0), (0.0, 0.0)])
def test_seesaw_probability_domain_equals_logit_domain(monkeypatch, p, q):
    g = torch.Generator().manual_seed(int(10 * p + q))
    logits = torch.randn(40, 7, generator=g) * 3
    logits[5] = torch.tensor([120.0, 0.0, -60.0, 3.0, 1.0, 0.0, 2.0])  # label 2: σ_y underflows
    labels = torch.randint(0, 7, (40,), generator=g)
    labels[5] = 2
    count = torch.tensor([500.0, 90, 30, 10, 3, 1, 0], dtype=torch.float64)

    def run(in_probabilities):
        if not in_probabilities:
            monkeypatch.setattr(seesaw, "_probability_domain_factors", lambda *a: (False, None))
        loss = seesaw.ImageSeesawLoss(7, p=p, q=q).eval()
        loss.cumulative_count.copy_(count)
        x = logits.clone().requires_grad_()
        value = loss(x, labels)["loss_cls"]
        value.backward()
        return value.item(), x.grad.numpy()

    value_prob, grad_prob = run(True)
    value_log, grad_log = run(False)
    assert math.isfinite(value_prob) and value_prob == pytest.approx(value_log, rel=1e-6)
    np.testing.assert_allclose(grad_prob, grad_log, atol=1e-7)


def test_seesaw_probability_domain_applies_on_cpu_defaults_only():
    x, count = torch.zeros(2, 3), torch.tensor([1.0, 3.0, 9.0], dtype=torch.float64)
    applies, factor = seesaw._probability_domain_factors(x, count, 0.8, 2.0)
    assert applies
    np.testing.assert_allclose(factor.numpy(), (np.array([1.0, 3.0, 9.0]) / 9.0) ** 0.8, rtol=1e-6)
    assert not seesaw._probability_domain_factors(x, count, 0.8, 1.5)[0]  # a general power: logit domain
    # (1 / e^100)^0.8 = e^-80 is below the e^-60 floor: logit domain
    assert not seesaw._probability_domain_factors(x, torch.tensor([1.0, math.exp(100.0)], dtype=torch.float64), 0.8, 2.0)[0]
    assert seesaw._probability_domain_factors(x, torch.tensor([1.0, math.exp(70.0)], dtype=torch.float64), 0.8, 2.0)[0]


class _Counts:
    def __init__(self, image_count):
        self.image_count = image_count


def test_bal_bce_prior_shift_follows_the_counts():
    counts = torch.tensor([30, 10, 1])
    loss = bal_bce.ImageBalancedBCE(3, class_stats=_Counts(counts))

    def expected(values):
        pi = np.asarray(values, dtype=np.float64) / sum(values)
        return np.log(pi) - np.log1p(-pi)

    np.testing.assert_allclose(loss.prior_shift().numpy(), expected([30, 10, 1]), rtol=1e-6)
    assert loss.prior_shift() is loss.prior_shift()  # kept while the counts are unchanged
    counts.copy_(torch.tensor([5, 5, 5]))  # in place (a checkpoint load): recomputed
    np.testing.assert_allclose(loss.prior_shift().numpy(), expected([5, 5, 5]), atol=1e-7)
    loss.class_stats.image_count = torch.tensor([1, 2, 4])  # another tensor: recomputed
    np.testing.assert_allclose(loss.prior_shift().numpy(), expected([1, 2, 4]), rtol=1e-6)


@pytest.mark.parametrize("dim", [None, 0])
@pytest.mark.parametrize("overwrite", [False, True])
def test_sigmoid_and_softplus_sums(dim, overwrite):
    from eqlosses_d2.classification.losses.kernels import sigmoid_and_softplus_sums

    g = torch.Generator().manual_seed(5)
    z = torch.randn(130, 3, generator=g) * 6  # 130 rows: two groups of 64 and a remainder
    z[0, 0], z[1, 1] = 40.0, -40.0
    out = torch.empty_like(z)
    sums = sigmoid_and_softplus_sums(z.clone(), out, dim=dim, overwrite_logits=overwrite)
    zz = z.double().numpy()
    softplus = np.maximum(zz, 0) + np.log1p(np.exp(-np.abs(zz)))
    np.testing.assert_allclose(sums.numpy(), softplus.sum() if dim is None else softplus.sum(0), rtol=2e-6)
    np.testing.assert_allclose(out.numpy(), 1 / (1 + np.exp(-zz)), atol=1e-7)
