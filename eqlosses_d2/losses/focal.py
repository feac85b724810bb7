"""
Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), the
one-stage baseline, and the fused computation EFL shares.

For anchor i and class j with p = σ(z_ij), y_ij = 1 if label_i = j (a background anchor,
label C, has an all-zero target), p_t = p if y = 1 else 1 − p, α_t = α if y = 1 else 1 − α:

    L = Σ_ij α_t · w_j · (1 − p_t)^{γ_j} · (−log p_t) / normalizer

The plain focal loss has γ_j = γ and w_j = 1 (``fvcore.nn.sigmoid_focal_loss`` summed,
divided by the normalizer); EFL (:mod:`.efl`) sets both per class. α < 0 means α_t = 1.

The gradient is analytic: with u = 1 − p_t and s = +1 for y = 1, −1 for y = 0,

    ∂L/∂z_ij = −s · α_t · w_j · u^{γ_j} · (u − γ_j · p_t · log p_t) / normalizer

and is computed in the forward pass, together with the per-class sums of its absolute
value over positives (y = 1) and negatives (y = 0), which EFL's gradient statistics need.
The whole (N, C) matrix is treated as negatives in row chunks (one softplus and one or two
exps per entry; :func:`.fused.row_ranges`, the chunking of every fused kernel: cache-sized
on the CPU, bounded on a GPU); the at most one positive entry per row is then corrected
from its own logit. Memory: the gradient handed to autograd (one float32 copy of the
logits) and three chunk-sized temporaries, at most one copy under the GPU policy: the
peak extra memory stays within two float32 copies of the logits (``bench_one_stage.py``
measures it). Defaults α = 0.25, γ = 2 (Detectron2's and the paper's).
Pure PyTorch, no Detectron2 import.
"""
import torch
from torch.nn import functional as F

from .base import empty_loss, scaled_stashed_grad
from ..registry import DENSE_CLS_LOSS_REGISTRY, config_node, register
from .dense import DenseClassificationLoss
from .fused import row_chunks

__all__ = ["SigmoidFocalLoss", "focal_loss_sum"]

#: chunk-sized buffers of the kernel (:func:`.fused.row_ranges`): three temporaries (softplus,
#: log p then p^γ, p) and the slice of the gradient it writes
_CHUNK_BUFFERS = 4


def _as_columns(value, num_classes, like):
    """A Python float, or a (C,) tensor on ``like``'s device and dtype."""
    if torch.is_tensor(value):
        if value.shape != (num_classes,):
            raise ValueError(f"per-class factors of shape {tuple(value.shape)} for {num_classes} classes")
        return value.to(device=like.device, dtype=like.dtype)
    return float(value)


class _FocalLossSum(torch.autograd.Function):
    """``(L, pos_grad, neg_grad)``: the normalized loss, and per class Σ|∂L/∂z| over the
    positives and over the negatives, times ``stats_scale``. The gradient is stashed, not
    saved: backward scales it in place and hands it over."""

    @staticmethod
    def forward(ctx, logits, labels, gamma, weight, alpha, scale, stats_scale, with_stats):
        num_anchors, num_classes = logits.shape
        if alpha >= 0:
            pos_alpha, neg_alpha = alpha, 1.0 - alpha
        else:
            pos_alpha = neg_alpha = 1.0
        # per-column factors of the negatives' loss and gradient
        neg_weight = weight * neg_alpha
        neg_scale = neg_weight * scale
        square = not torch.is_tensor(gamma) and gamma == 2.0

        grad = torch.empty_like(logits)
        loss_columns = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        neg_columns = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        for start, stop in row_chunks(logits, _CHUNK_BUFFERS):
            x, out = logits[start:stop], grad[start:stop]
            softplus = F.softplus(x)  # −log(1 − p) = −log p_t of a negative
            log_p = torch.sub(x, softplus)
            p = torch.exp(log_p)  # = 1 − p_t of a negative
            p_gamma = torch.mul(p, p, out=log_p) if square else log_p.mul_(gamma).exp_()
            # the gradient's slice is scratch until its value is written
            loss_columns += torch.mul(p_gamma, softplus, out=out).sum(dim=0)
            # u^γ (u + γ (1 − u) softplus) with u = p
            factor = softplus.addcmul_(softplus, p, value=-1.0).mul_(gamma).add_(p).mul_(p_gamma)
            torch.mul(factor, neg_scale, out=out)
            del softplus, log_p, p, p_gamma, factor  # before the next chunk's are allocated
            if with_stats:
                neg_columns += out.sum(dim=0)
        loss_columns *= neg_weight if not torch.is_tensor(neg_weight) else neg_weight.double()
        loss = loss_columns.sum()

        pos_columns = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        rows_pos = torch.nonzero(labels < num_classes).squeeze(1)
        if rows_pos.numel():
            cols_pos = labels[rows_pos]
            x = logits[rows_pos, cols_pos]
            gamma_pos = gamma[cols_pos] if torch.is_tensor(gamma) else gamma
            weight_pos = weight[cols_pos] if torch.is_tensor(weight) else weight
            # take out the negative terms the dense pass put at these entries
            softplus = F.softplus(x)  # −log(1 − p)
            log_p = x - softplus
            p_gamma = torch.exp(log_p * gamma_pos)
            loss = loss - (neg_alpha * weight_pos * p_gamma * softplus).double().sum()
            if with_stats:
                neg_columns.index_add_(0, cols_pos, -grad[rows_pos, cols_pos].double())
            # and put in the positive terms: u = 1 − p, −log p_t = softplus(−z)
            neg_log_p = F.softplus(-x)
            u = torch.exp(-softplus)
            u_gamma = torch.exp(-softplus * gamma_pos)
            loss = loss + (pos_alpha * weight_pos * u_gamma * neg_log_p).double().sum()
            magnitude = (pos_alpha * scale) * weight_pos * u_gamma * (u + gamma_pos * torch.exp(-neg_log_p) * neg_log_p)
            grad[rows_pos, cols_pos] = -magnitude
            if with_stats:
                pos_columns.index_add_(0, cols_pos, magnitude.double())
        ctx.grad = grad
        pos_columns *= stats_scale
        neg_columns *= stats_scale
        ctx.mark_non_differentiable(pos_columns, neg_columns)
        return (loss * scale).to(logits.dtype), pos_columns, neg_columns

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "focal loss"), None, None, None, None, None, None, None


def focal_loss_sum(logits, labels, gamma=2.0, weight=1.0, alpha=0.25, normalizer=1.0, stats_scale=1.0,
                   with_stats=True):
    """
    The focal loss of (N, C) logits and labels in [0, C] (C: background), with per-class
    focusing factors ``gamma`` and weights ``weight`` (floats or (C,) tensors), divided by
    ``normalizer``; and the (C,) float64 sums of |∂L/∂z| over positives and negatives,
    times ``stats_scale`` (zeros when ``with_stats`` is False). Float32, outside autocast.
    ``normalizer``: a number, or a 0-dim tensor (the model's, without a host read).
    """
    logits = logits.float().contiguous()
    labels = labels.long()
    num_classes = logits.shape[1]
    gamma = _as_columns(gamma, num_classes, logits)
    weight = _as_columns(weight, num_classes, logits)
    if torch.is_tensor(normalizer):
        scale = normalizer.detach().to(device=logits.device, dtype=logits.dtype).reciprocal()
    else:
        scale = 1.0 / float(normalizer)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _FocalLossSum.apply(
            logits, labels, gamma, weight, float(alpha), scale, float(stats_scale), bool(with_stats)
        )


@register(DENSE_CLS_LOSS_REGISTRY)
class SigmoidFocalLoss(DenseClassificationLoss):
    """The plain sigmoid focal loss; no state."""

    name = "focal"
    config_node = "FOCAL"

    @classmethod
    def add_config(cls, cfg):
        # Sigmoid focal loss of the one-stage models (read instead of MODEL.RETINANET.FOCAL_LOSS_*).
        _C = config_node(cfg, "MODEL.EQLOSSES.FOCAL")
        # α: weight of the positives' terms, 1 - α of the negatives' (< 0: no α weighting).
        _C.ALPHA = 0.25
        # γ: focusing factor (1 - p_t)^γ.
        _C.GAMMA = 2.0

    def __init__(self, num_classes, class_stats=None, alpha=0.25, gamma=2.0):
        super().__init__(num_classes, class_stats)
        if gamma < 0:
            raise ValueError(f"FOCAL.GAMMA must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"FOCAL.ALPHA must be <= 1 (< 0: no α weighting), got {alpha}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits, labels, normalizer=1.0):
        self._check(logits, labels, normalizer)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        loss, _, _ = focal_loss_sum(
            logits, labels, self.gamma, 1.0, self.alpha, normalizer, with_stats=False
        )
        return {"loss_cls": loss}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, alpha={self.alpha}, gamma={self.gamma}"
