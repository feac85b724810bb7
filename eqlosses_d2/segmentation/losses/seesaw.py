"""
Seesaw loss per pixel (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR
2021): the class branch of mmdetection's ``seesaw_ce_loss`` (``mmdet/models/losses/seesaw_loss.py``,
commit 08282a60; the same function in mmpretrain, which the classification form
:mod:`eqlosses_d2.classification.losses.seesaw` follows) with every valid pixel a sample. A valid
pixel of label y is trained on

    z̃_j = z_j + log S_yj  (j ≠ y),  z̃_y = z_y,   S_yj = M_yj · C_yj,
    M_yj = (N_j / N_y)^p if N_j < N_y else 1,         (mitigation)
    C_yj = (σ_j / max(σ_y, eps))^q if that ratio > 1 else 1,   (compensation, per pixel)
    L = loss_weight · (1 / V) Σ_{valid pixels} CE(z̃_p, y_p),

V the valid pixels of the batch, σ = softmax(z) of the pixel (detached, as their ``detach``), and
N the cumulative labelled pixels per class (clamped at 1 in the ratio): before the loss, every
step in training mode adds the batch's valid-pixel counts per class, summed over processes
(:func:`~eqlosses_d2.losses.base.sync_state`, on every process, a collective), so a step's
mitigation already counts its own pixels (theirs: ``cum_samples`` updated before the loss, per
GPU, never synchronised). Ignored pixels count nothing. Predicted from the raw logits (theirs
score ``softmax(z)``; no objectness branch: that is detection only). Float64 buffer
``cumulative_count`` (theirs float32), saved in checkpoints.

The authors have no segmentation variant; the authors' defaults are kept: p = 0.8, q = 2.0,
eps = 1e-2, loss_weight = 1. Note that the mitigation follows pixel-count ratios, not instance
ratios: a class of large regions (stuff) mitigates the gradient it pushes onto classes of small
regions, however many images both appear in. Config node
``MODEL.EQLOSSES.SEM_SEG.SEESAW``.

Computation (values and gradients as theirs up to float rounding), up to per-row constants and
factors (which change neither CE nor its gradient); one autograd Function (:class:`_SeesawPixels`)
walks the logits chunk by chunk (:func:`.kernels.pixel_softmax_ce` with an adjustment callback: the
adjusted chunk is built in the gradient's buffer, plus one chunk-sized temporary), computes the
loss and its gradient ``loss_weight · (softmax(z̃) − onehot) / V`` (S is a constant of the loss, as
their ``detach``), and holds only the gradient. Two equivalent forms:

- probability domain (q ∈ {0, 1, 2} and count ratios within e^60 after the power p: read from the
  counts on the CPU policy; under the GPU policy, which reads nothing on the host, p ≤ 1.63, which
  keeps every float64-exact count ratio within it): ``softmax(z̃) ∝ e ⊙ max(e, D)^q ⊙ min(m_j,
  m_y)`` with e = exp(z − max z), D = max(e_y, eps Σ e), m = (N / N_max)^p: one exponential per
  entry, as plain CE;
- logit domain (every other case): with lse the log-sum-exp of z and L = log N, ``log C_yj = q ·
  max(z_j − c, 0)``, ``c = max(z_y, lse + log eps)`` (= lse + max(log σ_y, log eps)), and ``log M_yj
  = p · min(L_j, L_y) − p · L_y`` (the last term a row constant, left out); two exponentials per entry.
"""
import math

import torch

from ...classification.losses.seesaw import SeesawHyperparameters
from ...losses.base import gpu_policy, scaled_stashed_grad, sync_state
from ...registry import PIXEL_LOSS_REGISTRY, config_node, register
from .base import PixelLoss
from .kernels import PixelBatch, check_finite_loss, exp_shifted, pixel_softmax_ce

__all__ = ["PixelSeesawLoss"]


class _SeesawPixels(torch.autograd.Function):
    """``Σ_p f_p CE(z̃_p, y_p)`` and its gradient ``f ⊙ (softmax(z̃) − onehot)``, z̃ as the module
    docstring says. ``log_count``: (C,) float64 log N (clamped at 1)."""

    @staticmethod
    def forward(ctx, logits, batch, log_count, p, q, eps, factor):
        probability_domain, count_factor = _probability_domain_factors(logits, log_count, p, q)
        if probability_domain:
            adjust = _probability_domain_adjust(count_factor, q, eps)
            temporaries = 1 if q > 0 or count_factor is not None else 0
        else:
            adjust = _logit_domain_adjust(None if p == 0 else (log_count * p).float(), q, eps)
            temporaries = 0 if p == 0 else 1
        out = pixel_softmax_ce(logits, batch, factor, adjust=adjust, buffers=1 + temporaries)
        ctx.grad = out["grad"]
        return out["loss"].to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "Seesaw (pixels)"), None, None, None, None, None, None


#: the probability domain keeps every count factor ``(N_j / N_max)^p`` above e^-60 (float32's normal range
#: ends near e^-87)
_MAX_LOG_COUNT_SPREAD = 60.0
#: log(2^53): float64 counts above 2^53 (9e15 pixels of one class) are no longer exact integers; below it,
#: with counts clamped at 1, no log-count spread exceeds this
_MAX_EXACT_LOG_COUNT = 53 * math.log(2.0)


def _probability_domain_factors(logits, log_count, p, q):
    """``(applies, m)``: whether the probability domain applies and its float32 ``m = (N / N_max)^p``
    (None when p = 0). It needs q in {0, 1, 2} (powers as products; a general power would be an
    exp/log pass) and count factors within e^-60: on the CPU policy read from the counts (no device
    to wait for); under the GPU policy, without a host read, whenever p · log(2^53) ≤ 60 (p ≤ 1.63,
    the authors' 0.8 included), the spread of counts below 2^53 (m is clamped at e^-60 as a guard,
    which no such count reaches). The logit domain (exact for every p, q, spread) serves every other
    case."""
    if q not in (0.0, 1.0, 2.0):
        return False, None
    if p == 0:
        return True, None
    log_factor = (log_count - log_count.max()).mul_(p)  # ≤ 0, float64
    if gpu_policy(logits.device):
        if p * _MAX_EXACT_LOG_COUNT > _MAX_LOG_COUNT_SPREAD:
            return False, None
        return True, log_factor.clamp_(min=-_MAX_LOG_COUNT_SPREAD).exp_().float()
    if not bool(log_factor.min() > -_MAX_LOG_COUNT_SPREAD):
        return False, None
    return True, log_factor.exp_().float()


def _probability_domain_adjust(count_factor, q, eps):
    """The weights ``W = e ⊙ max(e, D)^q ⊙ min(m_j, m_y)`` ∝ exp(z̃) of a chunk, e = exp(z − max z)
    (∝ σ), ``D = max(e_y, eps · Σ_j e_j)`` (∝ max(σ_y, eps)), m = (N / N_max)^p: the compensation
    ``max(σ_j / max(σ_y, eps), 1)^q`` and the mitigation ``min(N_j / N_y, 1)^p`` times per-pixel
    factors, which the softmax's normalisation removes. One exponential per entry (the logit domain
    takes two). ``log W_y = (z_y − max z) + q log D + log m_y`` from the logits (exact where e_y
    underflows)."""
    log_count_factor = None if count_factor is None else count_factor.log()

    def adjust(x, out, rows, image, start, stop):
        top = exp_shifted(x, out)  # e
        log_weight_y = x.gather(0, rows).sub_(top)
        temporary = None
        if q > 0:
            floor = torch.maximum(out.gather(0, rows), out.sum(dim=0, keepdim=True).mul_(eps))  # D
            temporary = torch.maximum(out, floor)
            if q == 2.0:
                temporary.square_()
            out.mul_(temporary)
            log_weight_y.add_(floor.log_(), alpha=q)
        if count_factor is not None:
            temporary = torch.minimum(count_factor[:, None], count_factor[rows], out=temporary)
            out.mul_(temporary)
            log_weight_y.add_(log_count_factor[rows])
        return log_weight_y, True

    return adjust


def _logit_domain_adjust(scaled_log_count, q, eps):
    """The adjusted logits ``z + q · max(z − c, 0) + p · min(L_j, L_y)`` of a chunk, c = max(z_y, lse
    + log eps) (``scaled_log_count``: float32 p · L, or None when p = 0); two exponentials per entry
    when q > 0 (the lse here, the softmax after)."""
    log_eps = math.log(eps)

    def adjust(x, out, rows, image, start, stop):
        logit_y = x.gather(0, rows)
        if q > 0:
            top = exp_shifted(x, out)
            threshold = torch.maximum(logit_y, out.sum(dim=0, keepdim=True).log_().add_(top).add_(log_eps))
            torch.sub(x, threshold, out=out).clamp_(min=0.0)
            torch.add(x, out, alpha=q, out=out)
        else:
            out.copy_(x)
        if scaled_log_count is None:
            return logit_y, False
        scaled_log_count_y = scaled_log_count[rows]  # (1, L)
        out.add_(torch.minimum(scaled_log_count[:, None], scaled_log_count_y))  # + p · min(L_j, L_y)
        return logit_y + scaled_log_count_y, False

    return adjust


@register(PIXEL_LOSS_REGISTRY)
class PixelSeesawLoss(SeesawHyperparameters, PixelLoss):
    name = "seesaw"
    config_node = "SEESAW"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        # N: labelled (valid) training pixels per class since the start of training, over all processes
        cls.add_seesaw_config(config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.SEESAW"))

    def __init__(self, num_classes, class_stats=None, ignore_value=255, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        super().__init__(num_classes, class_stats, ignore_value)
        self.init_seesaw(num_classes, "SEM_SEG.SEESAW", p, q, eps, loss_weight)

    @torch.no_grad()
    def accumulate(self, batch: PixelBatch):
        """Add this batch's valid-pixel counts per class (summed over processes) to N; a collective."""
        if gpu_policy(batch.labels.device):  # no host read (bincount reads its maximum)
            counts = torch.zeros(self.num_classes, dtype=torch.float64, device=batch.labels.device)
            counts.index_add_(0, batch.labels.reshape(-1), batch.valid.reshape(-1).double())
        else:
            counts = torch.bincount(batch.labels[batch.valid], minlength=self.num_classes).double()
        self.cumulative_count += sync_state(counts)[0].to(self.cumulative_count.device)

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        if self.training:  # before the loss, as theirs, and on every process
            self.accumulate(batch)
        log_count = self.cumulative_count.clamp(min=1).log().to(logits.device)  # float64
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = _SeesawPixels.apply(logits, batch, log_count, self.p, self.q, self.eps,
                                       batch.per_valid_pixel(self.loss_weight))
        check_finite_loss(loss, self.name)
        return {"loss_sem_seg": loss}
