"""
Softmax-EQL per pixel (Tan et al., "The Equalization Losses: Gradient-Driven Training for
Long-tailed Object Recognition", arXiv 2210.05566): the classification form
(:mod:`eqlosses_d2.classification.losses.softmax_eql`, after ModelTC/United-Perception's
``SoftmaxEQLLoss``, ``up/tasks/cls/models/losses/cls_loss.py``) with every valid pixel a sample.
The paper reports long-tailed semantic segmentation on ADE20K too, but the authors' released code
has no segmentation form that we found: United-Perception's segmentation losses
(``up/tasks/seg/models/losses/seg_loss.py``, every stored version) are CE and OHEM only, and we
could not read the paper's segmentation section; so this is their classification loss applied per
pixel, with the pixel as the sample (how their segmentation runs counted pixels is not known to us).

With G the indicator's accumulated gradient statistics, a valid pixel of label y is trained on

    z'_j = z_j + τ · log(max(G_j, ε) / max(G_y, ε))  for j ≠ y  (z'_y = z_y),
    L = loss_weight · (1 / V) Σ_{valid pixels} CE(z'_p, y_p),

V the valid pixels of the batch on this process (Detectron2's ``F.cross_entropy(...,
ignore_index=255)`` mean), and predicted from the raw logits (``predict``: the classification
form scores ``softmax(z)``; the argmax is the same).

Statistics: ``g = |∂L/∂z| = loss_weight · |softmax(z') − onehot| / V``, the gradient the loss
hands back, so every valid pixel counts once, each with weight 1 / V (the number of valid pixels
in its process's batch, as the loss is normalised); ignored pixels count nothing.
``pos_grad[c] += Σ_{valid p, y_p = c} g_pc``, ``neg_grad[c] += Σ_{valid p, y_p ≠ c} g_pc``, both
summed over processes (:func:`~eqlosses_d2.losses.base.sync_state`, one collective) before they
are added; ``pos_neg = pos_grad / (neg_grad + 1e-10)``. A step's margins use the statistics from
BEFORE it (the authors' hook runs in the backward pass that follows the forward that used them);
its own gradients are added after its loss is computed. Float64 buffers, saved in checkpoints,
updated in training mode only. Under the GPU policy a batch whose loss is not finite (NaN/inf
logits) contributes nothing, without a host read; on the CPU it raises at once.

Indicators, as in their code: ``"pos"`` G = pos_grad (default), ``"neg"`` G = neg_grad,
``"pos_and_neg"`` G = pos_neg + neg_grad (their code's quirk, kept; see the classification module).
Defaults (theirs): τ = 1, ε = 1e-4, indicator "pos", loss_weight 1. Config node
``MODEL.EQLOSSES.SEM_SEG.SOFTMAX_EQL``.

Computation: per-row constants change neither CE nor its gradient, so the margins are the per-class
shift ``τ log max(G, ε)``; one autograd Function (:class:`_SoftmaxEQLPixels`) computes the loss,
the gradient and the statistics in one chunked walk (:func:`.kernels.pixel_softmax_ce`), holding
only the gradient: ``pos_c = Σ_{y=c} f (1 − p_y)``, ``neg_c = Σ_p f p_c − Σ_{y=c} f p_y`` with
f = loss_weight / V at valid pixels (the column sums of the chunk's f ⊙ softmax, before the
one-hot is subtracted).

Differences from their code: per pixel instead of per image (the point of this module); the
gradient computed analytically, not read by a hook (identical in fp32; under mixed precision
theirs would see the loss-scaled gradient); float64 buffers; updates in training mode only.
"""
import torch

from ...classification.losses.softmax_eql import SoftmaxEQLStatistics
from ...losses.base import scaled_stashed_grad
from ...registry import PIXEL_LOSS_REGISTRY, config_node, register
from .base import PixelLoss
from .kernels import PixelBatch, check_finite_loss, pixel_softmax_ce

__all__ = ["PixelSoftmaxEQL"]


class _SoftmaxEQLPixels(torch.autograd.Function):
    """``Σ_p f_p CE(z_p + a, y_p)``, its gradient ``f ⊙ (softmax(z + a) − onehot)`` and the (C,)
    float64 sums ``pos`` and ``neg`` of the gradient's absolute value (module docstring)."""

    @staticmethod
    def forward(ctx, logits, batch, shift, factor):
        out = pixel_softmax_ce(logits, batch, factor, shift=shift, label_prob=True, column_sums=True)
        num_classes = logits.shape[1]
        labels = batch.labels.reshape(-1)
        weighted_prob_y = (out["prob_y"] * factor).reshape(-1).double()
        label_factor = factor.reshape(-1).double()
        # Σ_{y=c} f p_y and Σ_{y=c} f in one index_add (ignored pixels: f = 0)
        by_label = torch.zeros(2, num_classes, dtype=torch.float64, device=logits.device)
        by_label.index_add_(1, labels, torch.stack([weighted_prob_y, label_factor]))
        pos = by_label[1] - by_label[0]
        neg = out["column_sums"] - by_label[0]
        ctx.grad = out["grad"]
        ctx.mark_non_differentiable(pos, neg)
        return out["loss"].to(logits.dtype), pos, neg

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "Softmax-EQL (pixels)"), None, None, None


@register(PIXEL_LOSS_REGISTRY)
class PixelSoftmaxEQL(SoftmaxEQLStatistics, PixelLoss):
    name = "softmax_eql"
    config_node = "SOFTMAX_EQL"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        cls.add_statistics_config(config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.SOFTMAX_EQL"))

    def __init__(self, num_classes, class_stats=None, ignore_value=255, tau=1.0, eps=1e-4, indicator="pos",
                 loss_weight=1.0):
        super().__init__(num_classes, class_stats, ignore_value)
        self.init_statistics(num_classes, "SEM_SEG.SOFTMAX_EQL", tau, eps, indicator, loss_weight)

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        shift = self.log_margin(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss, pos, neg = _SoftmaxEQLPixels.apply(logits, batch, shift, batch.per_valid_pixel(self.loss_weight))
        finite = check_finite_loss(loss, self.name)
        if self.training:  # every process, every step (a collective), after the loss that used the old G
            self.accumulate(pos, neg, finite=finite)
        return {"loss_sem_seg": loss}
