"""
The fused computations of the image-classification losses: value and analytic gradient from
as few passes over the (N, C) logits as possible, each pass a vectorised kernel (on the CPU,
``F.softplus``, ``torch.logsumexp`` and ``torch.max(dim)`` are several times slower than
``torch.sigmoid``, ``torch.softmax`` and ``torch.amax``, and a plain softmax CE forward and
backward costs about two softmax passes). Pure PyTorch; float32 in, float32 out.

- :func:`softmax_ce_rows_and_grad`: Σ_i CE(x_i, y_i) and ``(softmax(x) − onehot)``, optionally
  times per-column weights, from one ``torch.softmax`` (IIF, Seesaw, Softmax-EQL);
- :func:`sigmoid_and_softplus_sums`: σ(z) and Σ softplus(z) from one ``torch.sigmoid`` and one
  log per 64 entries (sigmoid BCE, Bal-BCE, EQLv2).
"""
import torch

from ...losses.base import gpu_policy

__all__ = ["softmax_ce_rows_and_grad", "sigmoid_and_softplus_sums"]


def softmax_ce_rows_and_grad(adjusted: torch.Tensor, labels: torch.Tensor, scale: float, column_weight=None):
    """
    For adjusted logits x (N, C) and labels (N,): ``(Σ_i CE(x_i, y_i) · scale`` as a float64
    0-dim tensor, ``scale · w ⊙ (softmax(x) − onehot(y))`` (N, C)), w = ``column_weight`` (C,) or 1.
    The per-row loss is ``−log softmax(x)_iy`` while every label probability is above
    :data:`TINY_PROBABILITY` (its float32 rounding, a few ulps relative, is then ~1e-7 absolute in
    the log); otherwise, for every row, ``max_j x_ij − x_iy − log max_j softmax(x)_ij`` (the largest
    probability is 1 / Σ_j exp(x_ij − max x_i), never below 1/C), exact to float32 rounding even
    where the label's probability underflows. One ``torch.softmax`` pass, and the two row-max
    passes only in that rare case (and always under the GPU policy, which reads nothing back).
    """
    rows = labels[:, None]
    prob = torch.softmax(adjusted, dim=1)
    prob_y = prob.gather(1, rows)
    if not gpu_policy(adjusted.device) and bool(prob_y.min() > TINY_PROBABILITY):  # a host read: CPU only
        loss = prob_y.log().sum(dtype=torch.float64) * -scale
    else:
        top = adjusted.amax(dim=1, keepdim=True)
        loss = (top - adjusted.gather(1, rows) - prob.amax(dim=1, keepdim=True).log_()).sum(dtype=torch.float64) * scale
    if column_weight is None:
        grad = prob.mul_(scale)
        grad.scatter_add_(1, rows, grad.new_full(rows.shape, -scale))
    else:
        grad = prob.mul_(column_weight * scale)
        grad.scatter_add_(1, rows, (column_weight[labels] * -scale)[:, None])
    return loss, grad


#: label probabilities above this give the row loss as −log p_y (float32's normal range starts at 1.2e-38)
TINY_PROBABILITY = 1e-30


def sigmoid_and_softplus_sums(logits: torch.Tensor, out: torch.Tensor, dim=None, overwrite_logits: bool = False) -> torch.Tensor:
    """``out`` (the shape of ``logits``) becomes ``σ(logits)``; returns ``Σ softplus(logits)``
    over ``dim`` (None: all entries), float32, from that sigmoid: ``softplus(z) = max(z, 0) −
    log max(σ(z), 1 − σ(z))`` (the log of a number in [0.5, 1], accurate to float32 rounding).
    ``overwrite_logits``: ``logits`` is a temporary of the caller's, used as the scratch buffer
    (its values are lost), one (N, C) buffer fewer."""
    torch.sigmoid(logits, out=out)
    if overwrite_logits:
        scratch = logits.clamp_(min=0.0)
        positive_sums = scratch.sum() if dim is None else scratch.sum(dim)
        torch.sub(out.new_ones(()), out, out=scratch)  # 1 − σ
    else:
        scratch = torch.rsub(out, 1.0)
    log_sums = _sum_of_logs(torch.maximum(out, scratch, out=scratch), dim)
    if not overwrite_logits:
        torch.clamp(logits, min=0.0, out=scratch)
        positive_sums = scratch.sum() if dim is None else scratch.sum(dim)
    return positive_sums - log_sums


#: entries multiplied together before one log (all in [0.5, 1]: the product stays above 0.5^64 ≈ 5e-20,
#: far from float32's underflow, and its rounding, 64 · 2^-24 relative, is 6e-8 per entry)
_LOG_GROUP = 64


def _sum_of_logs(values: torch.Tensor, dim=None) -> torch.Tensor:
    """``Σ log(values)`` over ``dim`` (None: all; 0: per column) of a contiguous (N, C) tensor with
    entries in [0.5, 1], as the logs of products of ``_LOG_GROUP`` entries: one log per group
    instead of per entry (the log is the costly pass on the CPU)."""
    if dim is None:
        flat = values.view(-1)
        whole = flat.numel() // _LOG_GROUP * _LOG_GROUP
        grouped = flat[:whole].view(-1, _LOG_GROUP).prod(1).log_().sum()
        return grouped if whole == flat.numel() else grouped + flat[whole:].log().sum()
    if dim != 0:
        raise ValueError("_sum_of_logs: dim must be None or 0")
    whole = values.shape[0] // _LOG_GROUP * _LOG_GROUP
    # rows i, i + R, i + 2R, ... (R = whole / 64) in one group: a product over the outer dimension,
    # contiguous slabs multiplied elementwise
    grouped = values[:whole].view(_LOG_GROUP, -1, values.shape[1]).prod(0).log_().sum(0)
    return grouped if whole == values.shape[0] else grouped + values[whole:].log().sum(0)


