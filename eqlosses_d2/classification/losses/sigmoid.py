"""
Sigmoid binary cross-entropy over the C classes of an image classifier (one-vs-all), the
baseline of the sigmoid losses (EQLv2, Bal-BCE):

    L = Σ_ij BCE(z_ij, y_ij) / N,   y = onehot(label),   scores p_j = σ(z_j)

Normaliser: N, the batch size (``NORMALIZER: "batch"``, default), as the EQLv2 authors'
``torch.sum(cls_loss * weight) / self.n_i`` (tztztztztz/eqlv2, ``mmdet/models/losses/eqlv2.py``)
and LiVT's ``C * binary_cross_entropy_with_logits(..., reduction="mean")``; ``"elements"``
divides by N·C instead, torch's ``BCEWithLogitsLoss()`` mean, as United-Perception's
classification ``bce`` loss (ModelTC/United-Perception ``up/tasks/cls/models/losses/cls_loss.py``,
commit 52aaeb9e), which is the same loss at a learning rate C times smaller.

No state. The scores are one-vs-all probabilities: they do not sum to 1 over the classes.
The classifier head keeps its own bias initialisation (the detection sigmoid losses start the
bias from a prior π = 0.001; the classification heads have no such hook).

Computation: value and analytic gradient ``(σ(z) − y) / N`` in one autograd Function
(:func:`shifted_smoothed_bce`, shared with Bal-BCE), with softplus taken as
``softplus(z) = max(z, 0) − log(max(σ(z), 1 − σ(z)))`` from the sigmoid the gradient needs
(:func:`.kernels.sigmoid_and_softplus_sums`, shared with EQLv2), the logs of those numbers in [0.5, 1]
summed as the logs of products of 64 of them: exact up to float32 rounding (about 1e-7 absolute
per entry), and over 10x faster on the CPU than ``F.softplus``, whose ``log1p`` is not
vectorised there (9 ms for 512 x 1000 entries on one core, against about 1.2 ms for a whole
softmax CE forward and backward).
Config node ``MODEL.EQLOSSES.CLASSIFICATION.SIGMOID``.
"""
import torch

from ...losses.base import scaled_stashed_grad
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import sigmoid_and_softplus_sums

__all__ = ["ImageSigmoidBCE", "shifted_smoothed_bce"]


class _ShiftedSmoothedBCE(torch.autograd.Function):
    """``Σ_ij BCE(z_ij + b_j, t_ij) / N`` for the smoothed one-hot t (``off`` off the label,
    ``on`` on it) and its gradient ``(σ(z + b) − t) / N``, from one (N, C) buffer that becomes
    the gradient: ``Σ BCE(x, t) = Σ softplus(x) − off · Σ x − (on − off) · Σ_i x_iy``."""

    @staticmethod
    def forward(ctx, logits, labels, shift, off, on):
        num_rows = logits.shape[0]
        rows = labels[:, None]
        shifted = logits if shift is None else logits + shift
        grad = torch.empty_like(logits)
        total = sigmoid_and_softplus_sums(shifted, grad).double()
        if off:
            total -= off * shifted.sum().double()
        total -= (on - off) * shifted.gather(1, rows).sum().double()
        grad.mul_(1.0 / num_rows)
        if off:
            grad.sub_(off / num_rows)
        grad.scatter_add_(1, rows, grad.new_full(rows.shape, -(on - off) / num_rows))
        ctx.grad = grad
        return (total / num_rows).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "sigmoid BCE (classification)"), None, None, None, None


def shifted_smoothed_bce(logits, labels, shift=None, off: float = 0.0, on: float = 1.0) -> torch.Tensor:
    """``Σ_ij BCE(z_ij + shift_j, t_ij) / N`` of (N, C) logits, t = ``on`` at the label and ``off``
    elsewhere (one-hot: 1 and 0), with its analytic gradient; float32, outside autocast."""
    logits = logits.float().contiguous()
    shift = None if shift is None else shift.to(logits).contiguous()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _ShiftedSmoothedBCE.apply(logits, labels.long(), shift, float(off), float(on))

NORMALIZERS = ("batch", "elements")


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageSigmoidBCE(ImageClassificationLoss):
    name = "sigmoid"
    config_node = "SIGMOID"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.SIGMOID")
        # "batch": Σ BCE / N (EQLv2's and LiVT's authors); "elements": Σ BCE / (N·C) (torch's mean)
        _C.NORMALIZER = "batch"

    def __init__(self, num_classes, class_stats=None, normalizer="batch"):
        super().__init__(num_classes, class_stats)
        if normalizer not in NORMALIZERS:
            raise ValueError(f"SIGMOID.NORMALIZER must be one of {', '.join(NORMALIZERS)}; got '{normalizer}'")
        self.normalizer = normalizer

    def forward(self, logits, labels):
        self._check(logits, labels)
        if logits.shape[0] == 0:
            return {"loss_cls": logits.float().sum() * 0.0}
        loss = shifted_smoothed_bce(logits, labels)
        if self.normalizer == "elements":
            loss = loss / self.num_classes
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return torch.sigmoid(logits.float())

    def extra_repr(self):
        return f"num_classes={self.num_classes}, normalizer='{self.normalizer}'"
