"""
The fused sigmoid BCE of the box predictor's prior-shifted and margin losses (Balanced Softmax's
sigmoid form, Bal-BCE, ECM): for logits z (N, K) and labels in [0, K] (K: a row without a target
column, i.e. a background RoI of a head with C = K logits; every row has one when the head has a
background channel, K = C + 1),

    x_ij = a · z_ij + m_i · b_j,        t_ij = off + (on − off) · [j = y_i],
    L = Σ_ij w_j · BCE(x_ij, t_ij) / N,     ∂L/∂z_ij = a · w_j · (σ(x_ij) − t_ij) / N,

with a scalar scale ``a``, a per-class shift ``b`` applied to every row (m = 1) or to the rows of
a row mask m (Balanced Softmax: foreground RoIs only), column weights ``w`` (ECM) or 1, and
smoothed targets (Bal-BCE's ``off`` / ``on``; 0 / 1 otherwise).

Value and gradient from one (N, K) buffer that becomes the gradient, the algebra of the
classification Bal-BCE (:mod:`eqlosses_d2.classification.losses.bal_bce`) and its kernel
:func:`~eqlosses_d2.classification.losses.kernels.sigmoid_and_softplus_sums` (σ and Σ softplus from
one sigmoid and one log per 64 entries), imported, not copied:

    Σ_ij w_j BCE(x_ij, t_ij) = Σ_j w_j Σ_i softplus(x_ij) − off · Σ_ij w_j x_ij − (on − off) · Σ_i w_yi x_iyi,

the last sum over the rows with a target column. No host read (the rows without a target column
are masked arithmetically, not selected), no (N, K) target or weight matrix.
"""
import torch

from .base import scaled_stashed_grad

__all__ = ["shifted_bce"]


class _ShiftedBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shift, row_mask, scale, column_weight, off, on, who):
        # imported here: the classification package imports the detection config, which imports this module
        from ..classification.losses.kernels import sigmoid_and_softplus_sums

        num_rows, num_cols = logits.shape
        if row_mask is None:
            x = torch.add(shift, logits, alpha=scale) if scale != 1.0 else logits + shift
        else:
            x = torch.addcmul(logits * scale if scale != 1.0 else logits, row_mask[:, None], shift[None, :])
        has_target = labels < num_cols
        rows = labels.clamp(max=num_cols - 1)[:, None]
        on_weight = has_target.to(x.dtype) if column_weight is None else column_weight[rows[:, 0]] * has_target
        label_sum = (x.gather(1, rows)[:, 0] * on_weight).sum(dtype=torch.float64)
        if off:
            x_sum = x.sum(dtype=torch.float64) if column_weight is None else (
                x.sum(0, dtype=torch.float64) * column_weight.double()).sum()
        grad = torch.empty_like(x)
        if column_weight is None:
            total = sigmoid_and_softplus_sums(x, grad, overwrite_logits=True).double()
        else:
            total = (sigmoid_and_softplus_sums(x, grad, dim=0, overwrite_logits=True).double()
                     * column_weight.double()).sum()
        del x  # overwritten (scratch)
        if off:
            total = total - off * x_sum
        total = total - (on - off) * label_sum
        # (σ − off) · a w / N, then − (on − off) · a w_y / N at each row's target column
        if off:
            grad.sub_(off)
        grad.mul_(scale / num_rows if column_weight is None else column_weight * (scale / num_rows))
        grad.scatter_add_(1, rows, (on_weight * (-(on - off) * scale / num_rows))[:, None])
        ctx.grad = grad
        ctx.who = who
        return (total / num_rows).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad = scaled_stashed_grad(ctx, grad_loss, ctx.who)
        return grad, None, None, None, None, None, None, None, None


def shifted_bce(logits, labels, shift, row_mask=None, scale=1.0, column_weight=None, off=0.0, on=1.0,
                who="shifted BCE"):
    """``Σ_ij w_j BCE(a z_ij + m_i b_j, t_ij) / N`` (module docstring) as a float32 0-dim tensor
    with its analytic gradient. ``logits`` (N, K) with N > 0, ``labels`` (N,) int64 in [0, K],
    ``shift`` (K,), ``row_mask`` None or (N,) float (1: shifted), ``column_weight`` None or (K,),
    all float32 on the logits' device. Runs outside autocast, in float32."""
    logits = logits.float().contiguous()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _ShiftedBCE.apply(logits, labels, shift, row_mask, float(scale), column_weight, float(off),
                                 float(on), who)
