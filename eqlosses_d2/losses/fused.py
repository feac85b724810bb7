"""
Building blocks of the fused loss computations: the losses that compute their value and
their analytic gradient in one forward pass (custom autograd functions) share them.

On the CPU a full (N, K) logit matrix at LVIS scale (8192 x 1204 float32, 39 MB) does not
stay in cache, so a computation of a few elementwise passes is bound by memory traffic,
not arithmetic. The fused losses therefore walk the rows in chunks of about
:data:`CHUNK_ELEMENTS` entries (2 MB of float32): every pass over a chunk after the first
reads it from cache, and one pass writes the final gradient. On a GPU the whole matrix
is one chunk (a few large kernels are best there).

Pure PyTorch, no Detectron2 import.
"""
from typing import List, Tuple

import torch
from torch.nn import functional as F

from .base import scaled_stashed_grad

__all__ = ["CHUNK_ELEMENTS", "affine_softmax_cross_entropy", "masked_sigmoid_bce", "row_chunks", "row_ranges", "rows_in_chunks", "softmax_"]

#: entries of the logit matrix processed at once on the CPU (a module attribute, so that
#: tests can make it small and cross chunk boundaries)
CHUNK_ELEMENTS = 1 << 19


def row_ranges(num_rows: int, num_cols: int, device) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``num_rows`` rows of ``num_cols`` entries:
    cache-sized on the CPU, all rows at once on other devices."""
    if torch.device(device).type != "cpu":
        step = max(num_rows, 1)
    else:
        step = max(1, CHUNK_ELEMENTS // max(num_cols, 1))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def row_chunks(matrix: torch.Tensor) -> List[Tuple[int, int]]:
    """:func:`row_ranges` of an (N, K) matrix."""
    return row_ranges(matrix.shape[0], matrix.shape[1], matrix.device)


def rows_in_chunks(sorted_rows: torch.Tensor, chunks: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """For ascending row indices ``sorted_rows``: per chunk ``(a, b)`` such that
    ``sorted_rows[a:b]`` are the rows inside it (one host sync for all chunks)."""
    if not chunks:
        return []
    bounds = torch.tensor([start for start, _ in chunks] + [chunks[-1][1]], device=sorted_rows.device)
    first = torch.searchsorted(sorted_rows, bounds).tolist()
    return list(zip(first[:-1], first[1:]))


def softmax_(buffer: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: the rows of ``buffer`` (R, K), logits, become their softmax
    probabilities times ``scale``. Returns the (R,) log-sum-exp of the logits (stable:
    max-shifted, as ``log_softmax``)."""
    top = buffer.amax(dim=1, keepdim=True)
    torch.sub(buffer, top, out=buffer).exp_()
    normalizer = buffer.sum(dim=1, keepdim=True)
    buffer.mul_(normalizer.reciprocal().mul_(scale))
    return normalizer.log_().add_(top).squeeze(1)


class _AffineSoftmaxCE(torch.autograd.Function):
    """
    ``Σ_i CE(w ⊙ z_i + b, y_i) / N`` for per-column factors ``w`` and shifts ``b`` (K,)
    (None: 1 and 0), with its analytic gradient ``w ⊙ (softmax(w ⊙ z + b) − onehot(y)) / N``
    computed in the same pass, in row chunks, into the buffer handed to autograd.
    """

    @staticmethod
    def forward(ctx, logits, labels, scale, shift):
        num_rows = logits.shape[0]
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start, stop in row_chunks(logits):
            g, rows = grad[start:stop], labels[start:stop, None]
            z = logits[start:stop]
            if scale is not None and shift is not None:
                torch.addcmul(shift, z, scale, out=g)
            elif scale is not None:
                torch.mul(z, scale, out=g)
            elif shift is not None:
                torch.add(z, shift, out=g)
            else:
                g.copy_(z)
            adjusted_y = g.gather(1, rows).squeeze(1)
            total += (softmax_(g, 1.0 / num_rows) - adjusted_y).sum()
            g.scatter_add_(1, rows, g.new_full(rows.shape, -1.0 / num_rows))
            if scale is not None:
                g.mul_(scale)
        ctx.grad = grad
        return (total / num_rows).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return scaled_stashed_grad(ctx, grad_output, "softmax cross-entropy"), None, None, None


def affine_softmax_cross_entropy(logits, labels, scale=None, shift=None) -> torch.Tensor:
    """
    The mean softmax cross-entropy of the (N, K) logits adjusted per column,
    ``CE(scale ⊙ z + shift, y)`` (``scale``, ``shift``: (K,) or None), with the gradient
    computed in the same pass (IIF's weights, the equilibrium loss's log mean scores).
    Float32, outside autocast.
    """
    logits = logits.float().contiguous()
    scale = None if scale is None else scale.to(logits).contiguous()
    shift = None if shift is None else shift.to(logits).contiguous()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _AffineSoftmaxCE.apply(logits, labels.long(), scale, shift)


class _MaskedSigmoidBCE(torch.autograd.Function):
    """
    ``Σ_ij w_ij · BCE(z_ij, y_ij) / N`` for one-hot targets (y_ij = 1 iff j = label_i; a
    label ≥ K means an all-negative row), where a positive has weight 1 and a negative
    ``bg_weight_j`` in a background row, ``fg_weight_j`` in a foreground row; its gradient
    ``w_ij (σ(z_ij) − y_ij) / N`` is computed in the same pass (and handed over, not
    copied, in backward).

    Every entry is first taken as a negative: ``Σ_j w_ij softplus(z_ij)`` per row is a
    matrix-vector product of the softplus chunk with the row's weight vector; the at most
    one positive per row is then corrected from its own logit (softplus(−z) = BCE(z, 1)).
    The weight vectors must be contiguous (a strided vector broadcast over the rows is
    several times slower on the CPU).
    """

    @staticmethod
    def forward(ctx, logits, labels, bg_weight, fg_weight):
        num_rows, num_cols = logits.shape
        is_fg = labels < num_cols
        foreground = is_fg.to(logits.dtype)
        # the gradient's weights w / N = bg_w / N + fg_i (fg_w - bg_w) / N, one outer product
        base, delta = (bg_weight / num_rows)[None, :], (fg_weight - bg_weight) / num_rows
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start, stop in row_chunks(logits):
            z, g, fg = logits[start:stop], grad[start:stop], foreground[start:stop]
            softplus = F.softplus(z)  # BCE(z, 0)
            # the rows' weighted negative terms (matrix-vector products: one read each)
            total += torch.where(is_fg[start:stop], softplus.mv(fg_weight), softplus.mv(bg_weight)).sum()
            torch.sigmoid(z, out=g).mul_(torch.addr(base, fg, delta))
        rows = torch.nonzero(is_fg, as_tuple=True)[0]
        if rows.numel():
            cols = labels[rows]
            z_pos = logits[rows, cols]
            # a positive's term is BCE(z, 1) with weight 1, not fg_w · BCE(z, 0)
            total += (F.softplus(-z_pos) - fg_weight[cols] * F.softplus(z_pos)).sum()
            grad[rows, cols] = (torch.sigmoid(z_pos) - 1.0) / num_rows
        ctx.grad = grad
        return (total / num_rows).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return scaled_stashed_grad(ctx, grad_output, "sigmoid BCE"), None, None, None


def masked_sigmoid_bce(logits, labels, bg_weight=None, fg_weight=None) -> torch.Tensor:
    """
    The N-normalized sigmoid BCE of (N, K) logits against the one-hot of ``labels`` (a
    label ≥ K: no positive in the row), the negatives weighted per column: by
    ``bg_weight`` (K,) in background rows and ``fg_weight`` (K,) in the others (None: 1);
    positives have weight 1. Float32, outside autocast.
    """
    logits = logits.float().contiguous()
    ones = None
    if bg_weight is None or fg_weight is None:
        ones = logits.new_ones(logits.shape[1])
    bg_weight = ones if bg_weight is None else bg_weight.to(logits).contiguous()
    fg_weight = ones if fg_weight is None else fg_weight.to(logits).contiguous()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _MaskedSigmoidBCE.apply(logits, labels.long(), bg_weight, fg_weight)
