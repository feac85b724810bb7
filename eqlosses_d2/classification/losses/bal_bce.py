"""
Bal-BCE of LiVT (Xu et al., "Learning Imbalanced Data with Vision Transformers", CVPR 2023),
as its authors' code runs it (XuZhengzhuo/LiVT, ``util/loss.py`` ``BCE_loss(type='Bal')``,
commit 68546ef1): sigmoid BCE on logits shifted by the log-odds of the class prior,

    z'_j = z_j + K · (log π_j − log(1 − π_j)),   π_j = n_j / Σ_k n_k,
    t_ij = s / C + (1 − s) · [j = y_i],
    L = C · mean_ij BCE(z'_ij, t_ij) = Σ_ij BCE(z'_ij, t_ij) / N,

with n_j the training images of class j. Their quirks, followed:
- the shift is the prior's *log-odds* ``log π − log(1 − π)`` (their ``_bal_sigmod_bias``), not
  log π, times ``self.K = 1``; their ``--bal_tau`` (default 1) reaches only ``Bal_CE``, never
  Bal-BCE, so K is fixed at 1 in their runs. TAU here is that K (default 1);
- targets: their ``_one_hot`` label smoothing, off value s/C, on value 1 − s + s/C, with
  s = ``--smoothing`` (0.1 in their ImageNet-LT and iNat18 recipes, ``script/finetune.py`` and
  ``exp/finetune/*/args.txt``; their argparse default 0.0). In their runs Bal-BCE exists only with
  mixup/cutmix on (timm's ``Mixup`` builds the same smoothed targets, then mixes images and
  targets); this pipeline has no mixup, so the targets are the smoothed one-hot of the labels;
- normaliser: ``C * binary_cross_entropy_with_logits(reduction='mean')``, i.e. the sum over
  classes averaged over the batch;
- scores: ``softmax(z)`` of the unshifted logits, as their ``evaluate_all_metric`` (their
  ``evaluate`` ranks the same logits); the prior shift is training-only.

Defaults (their ImageNet-LT recipe): TAU (K) 1.0, SMOOTHING 0.1. Config node
``MODEL.EQLOSSES.CLASSIFICATION.BAL_BCE``.

Differences from their code: π from counts clamped at 1 (a class without training images
would get log π = −inf and an infinite loss; their data have none); value and analytic gradient
``(σ(z') − t) / N`` in one pass, no (N, C) target matrix (:class:`_ShiftedSmoothedBCE`, the algebra
of :func:`.sigmoid.shifted_smoothed_bce` with ``Σ z'`` from the sum the finiteness check takes).
"""
import torch
from torch.nn import functional as F

from ...losses.base import scaled_stashed_grad
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import sigmoid_and_softplus_sums

__all__ = ["ImageBalancedBCE"]


class _ShiftedSmoothedBCE(torch.autograd.Function):
    """``Σ_ij BCE(z_ij + b_j, t_ij) / N`` for the smoothed one-hot t (``off`` off the label, ``on``
    on it) and its gradient ``(σ(z + b) − t) / N``, from one (N, C) buffer that becomes the
    gradient: ``Σ BCE(x, t) = Σ softplus(x) − off · Σ x − (on − off) · Σ_i x_iy``, with
    ``Σ x = Σ z + N · Σ b`` from ``logits_total`` (the sum the finiteness check took)."""

    @staticmethod
    def forward(ctx, logits, labels, shift, logits_total, off, on):
        num_rows = logits.shape[0]
        rows = labels[:, None]
        shifted = logits + shift
        grad = torch.empty_like(logits)
        shifted_y_sum = shifted.gather(1, rows).sum(dtype=torch.float64)
        total = sigmoid_and_softplus_sums(shifted, grad, overwrite_logits=True).double()
        del shifted  # overwritten
        if off:
            total -= off * (logits_total.double() + num_rows * shift.sum(dtype=torch.float64))
        total -= (on - off) * shifted_y_sum
        if off:  # (σ − off) / N in one pass: −off/N + σ · (1/N)
            torch.add(grad.new_tensor(-off / num_rows), grad, alpha=1.0 / num_rows, out=grad)
        else:
            grad.mul_(1.0 / num_rows)
        grad.scatter_(1, rows, -(on - off) / num_rows, reduce="add")
        ctx.grad = grad
        return (total / num_rows).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "Bal-BCE (classification)"), None, None, None, None, None


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageBalancedBCE(ImageClassificationLoss):
    name = "bal_bce"
    config_node = "BAL_BCE"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.BAL_BCE")
        # K of the shift K·(log π − log(1 − π)) (the authors' code: 1, not their --bal_tau)
        _C.TAU = 1.0
        # label smoothing s of the targets: off s/C, on 1 − s + s/C (the authors' recipes: 0.1)
        _C.SMOOTHING = 0.1

    def __init__(self, num_classes, class_stats=None, tau=1.0, smoothing=0.1):
        super().__init__(num_classes, class_stats)
        if tau < 0:
            raise ValueError(f"BAL_BCE.TAU must be >= 0, got {tau}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"BAL_BCE.SMOOTHING must be in [0, 1), got {smoothing}")
        self.tau = float(tau)
        self.smoothing = float(smoothing)
        self._shift_cache = None  # (counts tensor, its version, shift): not state, recomputed when they change

    def prior_shift(self) -> torch.Tensor:
        """(C,) float32 ``K · (log π − log(1 − π))`` from the training image counts (float64).
        Kept from the last call while the counts are the same tensor, unmodified (its version
        counter, which every in-place change such as a checkpoint load bumps, unchanged): about
        ten small operations fewer per iteration."""
        counts = self.require_image_counts()
        cached = self._shift_cache
        if cached is not None and cached[0] is counts and cached[1] == counts._version:
            return cached[2]
        counts_f64 = counts.double().clamp(min=1)
        prior = counts_f64 / counts_f64.sum()
        shift = (self.tau * (prior.log() - torch.log1p(-prior))).float()
        self._shift_cache = (counts, counts._version, shift)
        return shift

    def forward(self, logits, labels):
        # the finiteness check reads the sum of the logits that the loss needs anyway (one pass fewer)
        logits = logits.float().contiguous()
        logits_total = logits.sum()
        self._check(logits, labels, total=logits_total)
        shift = self.prior_shift().to(logits.device)
        if logits.shape[0] == 0:
            return {"loss_cls": logits.sum() * 0.0}
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = _ShiftedSmoothedBCE.apply(logits, labels.long(), shift, logits_total, off, on)
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return F.softmax(logits.float(), dim=1)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, tau={self.tau}, smoothing={self.smoothing}"
