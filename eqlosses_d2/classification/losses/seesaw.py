"""
Seesaw loss for image classification (Wang et al., "Seesaw Loss for Long-Tailed Instance
Segmentation", CVPR 2021), as its authors' group runs it for classification:
open-mmlab/mmpretrain ``mmpretrain/models/losses/seesaw_loss.py`` (commit 0979e785, "migrate
from mmdetection", whose ``mmdet/models/losses/seesaw_loss.py`` at 08282a60 has the same
``seesaw_ce_loss``). A sample of label y is trained on

    z̃_j = z_j + log S_yj  (j ≠ y),  z̃_y = z_y,   S_yj = M_yj · C_yj,
    M_yj = (N_j / N_y)^p if N_j < N_y else 1,     C_yj = (σ_j / max(σ_y, eps))^q if that ratio > 1 else 1,
    L = loss_weight · mean_i CE(z̃_i, y_i),        scores softmax(z)

with N the cumulative training samples per class (clamped at 1 in the ratio), updated with
this batch's labels *before* the loss, and σ = softmax(z) detached.

No objectness/background branch: a classifier has none, and mmpretrain's classification loss
has none either (mmdetection's C + 2 logits and its ``loss_cls_objectness`` are detection only):
the loss is the class branch over every sample, averaged over the batch (their ``reduction='mean'``).

State: the float64 buffer ``cumulative_count`` (C,) (theirs float32 ``cum_samples``), saved
in checkpoints; each batch's label counts are summed over processes before they are added
(theirs are per GPU, never synchronised), on every process even when it has no sample, in
training mode only (theirs on every call; the classifier calls its loss only in training).

Defaults (theirs): p = 0.8, q = 2.0, eps = 1e-2, loss_weight = 1. Config node
``MODEL.EQLOSSES.CLASSIFICATION.SEESAW``.

Computation (values and gradients as theirs up to float rounding): the factors are applied in
log space, ``log S = p·min(log N_j − log N_y, 0) + q·max(log σ_j − max(log σ_y, log eps), 0)``
(both zero at j = y), without the C × C ratio matrix and up to per-row constants, which change
neither CE nor its gradient (:class:`_SeesawCE`); one autograd Function computes the loss and its
gradient ``loss_weight · (softmax(z̃) − onehot) / N`` (S is a constant of the loss, as their
``detach``). On the CPU, for q ∈ {0, 1, 2}, from one softmax pass in the probability domain,
``softmax(z̃) ∝ σ ⊙ S`` with S's per-row factors dropped (:func:`_seesaw_ce_in_probabilities`; the
loss exact where the label's probability underflows); otherwise (GPU, other q, count ratios
beyond e^60 after the power p) from a log-softmax and a softmax pass
(:func:`.kernels.softmax_ce_rows_and_grad`), as many as plain CE.
"""
import math

import torch

from ...losses.base import gpu_policy, scaled_stashed_grad, sync_state
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import TINY_PROBABILITY, softmax_ce_rows_and_grad

__all__ = ["ImageSeesawLoss", "SeesawHyperparameters"]


class _SeesawCE(torch.autograd.Function):
    """``scale · Σ_i CE(z̃_i, y_i)`` and its gradient ``scale · (softmax(z̃) − onehot)``, z̃ as the
    module docstring says. Per-row constants leave CE and its gradient unchanged, so z̃ is built
    up to one: with ``log σ`` the log-softmax of z and ``L = log N``,
    ``log C_ij = q · max(z_ij − c_i, 0)``, ``c_i = max(z_iy, z_iy − log σ_iy + log eps)``
    (= lse_i + max(log σ_iy, log eps)), and ``log M_ij = p · min(L_j, L_y) − p · L_y`` (the last
    term a row constant, left out). Two softmax passes in all, as plain CE."""

    @staticmethod
    def forward(ctx, logits, labels, count, p, q, eps, scale):
        use_probabilities, count_factor = _probability_domain_factors(logits, count, p, q)
        if use_probabilities:
            loss, ctx.grad = _seesaw_ce_in_probabilities(logits, labels, count_factor, q, eps, scale)
            return loss.to(logits.dtype)
        log_count = count.log()  # float64
        rows = labels[:, None]
        if q > 0:
            logit_y = logits.gather(1, rows)
            buffer = torch.log_softmax(logits, dim=1)
            threshold = torch.maximum(logit_y, logit_y - buffer.gather(1, rows) + math.log(eps))  # c_i
            torch.sub(logits, threshold, out=buffer).clamp_(min=0.0)
            torch.add(logits, buffer, alpha=q, out=buffer)  # z + log C
        else:
            buffer = logits.clone()
        if p > 0:  # + log M: p · min(L_j, L_y), p folded into L first (p ≥ 0 keeps the order)
            scaled_log_count = (log_count * p).float()
            buffer.add_(torch.minimum(scaled_log_count[None, :], scaled_log_count[rows]))
        loss, ctx.grad = softmax_ce_rows_and_grad(buffer, labels, scale)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "Seesaw (classification)"), None, None, None, None, None, None


#: the probability-domain computation keeps ``(N_j / N_max)^p`` above e^-60 (far from float32's underflow)
_MIN_COUNT_FACTOR = math.exp(-60.0)


def _probability_domain_factors(logits, count, p, q):
    """``(applies, m)``: whether :func:`_seesaw_ce_in_probabilities` applies (the CPU policy: it
    reads a value back; q ∈ {0, 1, 2}: powers as products, a general power being a slow exp/log
    pass on the CPU; count ratios whose p-th power stays in float32's range) and its float32
    ``m = (N / N_max)^p`` (None when p = 0); ``count``: N clamped at 1, float64."""
    if gpu_policy(logits.device) or q not in (0.0, 1.0, 2.0):
        return False, None
    if p == 0:
        return True, None
    smallest, largest = torch.stack(torch.aminmax(count)).tolist()  # one pass and one host read (the CPU policy)
    if not (smallest / largest) ** p > _MIN_COUNT_FACTOR:  # the smallest factor, from the two counts
        return False, None
    return True, count.div(largest).pow_(p).float()  # in (0, 1]


def _seesaw_ce_in_probabilities(logits, labels, count_factor, q, eps, scale):
    """
    :class:`_SeesawCE`'s value and gradient from one softmax: ``softmax(z̃)_ij ∝ σ_ij C_ij M_ij``
    (σ = softmax(z)), and up to per-row factors, which the normalisation removes,
    ``C_ij = max(σ_ij, d_i)^q`` (d_i = max(σ_iy, eps)) and ``M_ij = min(m_j, m_y)``,
    ``m = (N / N_max)^p``. So ``W = σ ⊙ max(σ, d)^q ⊙ M``, ``softmax(z̃) = W / Σ_j W_ij``, and
    the row loss ``−log(W_iy / S_i)``; where that probability is below ``TINY_PROBABILITY``, for
    every row ``log S_i − [z_iy − lse_i + q log d_i + log m_y]`` (lse_i = max z_i − log max σ_i),
    exact where σ_iy underflows.
    """
    rows = labels[:, None]
    prob = torch.softmax(logits, dim=1)
    prob_y = prob.gather(1, rows)
    if q > 0:
        floor = prob_y.clamp(min=eps)  # d_i
        weights = torch.maximum(prob, floor)
        if q == 2.0:
            weights.square_()
        weights.mul_(prob)
    else:
        weights = prob.clone()
    if count_factor is not None:  # m; M in σ's buffer (σ is not read again but in the rare case below)
        count_factor_y = count_factor.index_select(0, labels)[:, None]
        weights.mul_(torch.minimum(count_factor[None, :], count_factor_y, out=prob))
        del prob
    row_sum = weights.sum(dim=1, keepdim=True)
    prob_adjusted_y = weights.gather(1, rows).div_(row_sum)
    if bool(prob_adjusted_y.min() > TINY_PROBABILITY):
        loss = prob_adjusted_y.log_().sum(dtype=torch.float64) * -scale
    else:
        largest = torch.softmax(logits, dim=1).amax(dim=1, keepdim=True)  # max σ_i (σ again: rare)
        log_weight_y = logits.gather(1, rows) - logits.amax(dim=1, keepdim=True) + largest.log_()
        if q > 0:
            log_weight_y += q * floor.log()
        if count_factor is not None:
            log_weight_y += count_factor_y.log()
        loss = (row_sum.log() - log_weight_y).sum(dtype=torch.float64) * scale
    grad = weights.mul_(scale / row_sum)
    grad.scatter_(1, rows, grad.gather(1, rows).sub_(scale))  # − scale at the label (a plain scatter: faster than reduce="add")
    return loss, grad


class SeesawHyperparameters:
    """What the classification and the per-pixel Seesaw share: p, q, ε and the loss weight (their
    config keys, defaults and checks) and the float64 buffer ``cumulative_count`` (N, saved in
    checkpoints). A mixin of an ``nn.Module`` loss: the buffer is the loss's own."""

    @staticmethod
    def add_seesaw_config(node):
        """The node's keys and defaults (the authors')."""
        # p of the mitigation (N_j / N_y)^p for N_j < N_y (N: the loss's cumulative count per class)
        node.P = 0.8
        # q of the compensation (σ_j / σ_y)^q for σ_j > σ_y
        node.Q = 2.0
        # lower clamp of σ_y in the compensation
        node.EPS = 0.01
        # weight of the loss
        node.LOSS_WEIGHT = 1.0

    def init_seesaw(self, num_classes: int, key: str, p: float, q: float, eps: float, loss_weight: float):
        """Check and keep the hyper-parameters (``key``: the node's name in errors); N starts at zeros."""
        if p < 0:
            raise ValueError(f"{key}.P must be >= 0, got {p}")
        if q < 0:
            raise ValueError(f"{key}.Q must be >= 0, got {q}")
        if not 0 < eps <= 1:
            raise ValueError(f"{key}.EPS must be in (0, 1], got {eps}")
        if not loss_weight > 0:
            raise ValueError(f"{key}.LOSS_WEIGHT must be > 0, got {loss_weight}")
        self.p = float(p)
        self.q = float(q)
        self.eps = float(eps)
        self.loss_weight = float(loss_weight)
        self.register_buffer("cumulative_count", torch.zeros(num_classes, dtype=torch.float64))

    def extra_repr(self):
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, loss_weight={self.loss_weight}"


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageSeesawLoss(SeesawHyperparameters, ImageClassificationLoss):
    name = "seesaw"
    config_node = "SEESAW"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        # N: training samples per class since the start of training, over all processes
        cls.add_seesaw_config(config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.SEESAW"))

    def __init__(self, num_classes, class_stats=None, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        self.init_seesaw(num_classes, "SEESAW", p, q, eps, loss_weight)

    @torch.no_grad()
    def accumulate(self, labels: torch.Tensor):
        """Add this batch's label counts (summed over processes) to N; a collective."""
        batch_count = torch.bincount(labels, minlength=self.num_classes).to(self.cumulative_count)
        self.cumulative_count += sync_state(batch_count)[0]

    def forward(self, logits, labels):
        self._check(logits, labels)
        labels = labels.long()
        if self.training:  # before the loss, as theirs, and on every process
            self.accumulate(labels)
        if logits.shape[0] == 0:
            return {"loss_cls": logits.float().sum() * 0.0}
        logits = logits.float().contiguous()
        count = self.cumulative_count.clamp(min=1).to(logits.device)  # float64
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = _SeesawCE.apply(logits, labels, count, self.p, self.q, self.eps,
                                   self.loss_weight / logits.shape[0])
        return {"loss_cls": loss}
