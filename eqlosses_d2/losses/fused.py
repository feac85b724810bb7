"""
Building blocks of the fused loss computations: the losses that compute their value and
their analytic gradient in one forward pass (custom autograd functions) share them.

One chunking policy serves every fused kernel (:func:`row_ranges`), per device policy
(:data:`.base.DEVICE_POLICY`: the CPU's on the CPU, the GPU's elsewhere, or the GPU's
everywhere when forced):

- CPU: a full (N, K) logit matrix at LVIS scale (8192 x 1204 float32, 39 MB) does not stay
  in cache, so a computation of a few elementwise passes is bound by memory traffic, not
  arithmetic. The rows are walked in chunks whose buffers hold about :data:`CHUNK_ELEMENTS`
  entries together (2 MB of float32): every pass over a chunk after the first reads it
  from cache, and one pass writes the final gradient.
- GPU: few large kernels are best, but a kernel's chunk-sized temporaries must stay
  bounded (a LVIS RetinaNet batch has about 100k anchors x 1203 classes, 481 MB per float32
  copy). A chunk's buffers hold at most :data:`GPU_CHUNK_ELEMENTS` entries together
  (256 MB of float32), and at most one copy of the matrix: with the gradient buffer handed
  to autograd, a kernel's peak extra memory stays within two float32 copies of its logits.

The kernels that walk rows in chunks take them from :func:`row_ranges` and nowhere else:
the affine softmax CE here (IIF, LOCE), the weighted one-hot BCE here (EQL, Federated),
Softmax-EQL's, Gumbel's, PCB's soft-label CE and confusion update, the focal loss / EFL, and
the calibrations' row-wise softmax (``tests/test_fused.py`` checks that no other module sets a
chunk size of its own). EQLv2's weighted BCE and Seesaw's two cross-entropies work on the
whole matrix in one pass, with one logit-sized buffer that becomes the gradient: within the
same bound (two float32 copies of the logits), without chunks.

Pure PyTorch, no Detectron2 import.
"""
from typing import List, Optional, Tuple

import torch
from torch.nn import functional as F

from .base import gpu_policy, scaled_stashed_grad

__all__ = [
    "CHUNK_ELEMENTS",
    "GPU_CHUNK_ELEMENTS",
    "affine_into",
    "affine_softmax_cross_entropy",
    "weighted_sigmoid_bce",
    "row_chunks",
    "row_ranges",
    "rows_in_chunks",
    "softmax_",
]

#: CPU policy: entries of a chunk's buffers together (cache-sized; a module attribute, so
#: that tests can make it small and cross chunk boundaries)
CHUNK_ELEMENTS = 1 << 19
#: GPU policy: the most entries of a chunk's buffers together (256 MB of float32)
GPU_CHUNK_ELEMENTS = 1 << 26


def row_ranges(num_rows: int, num_cols: int, device, buffers: int = 1) -> List[Tuple[int, int]]:
    """
    ``[(start, stop), ...]`` covering ``num_rows`` rows of ``num_cols`` entries, for a kernel
    that works on ``buffers`` chunk-sized buffers per chunk (its temporaries, and the slice of
    the gradient it writes). CPU policy: ``CHUNK_ELEMENTS`` entries in all (cache-sized). GPU
    policy: at most ``GPU_CHUNK_ELEMENTS`` entries in all, and at most ``ceil(num_rows /
    buffers)`` rows, so that the buffers of a chunk never hold more than one copy of the
    matrix.
    """
    per_buffer = max(num_cols, 1) * max(buffers, 1)
    if gpu_policy(device):
        step = min(GPU_CHUNK_ELEMENTS // per_buffer, -(-num_rows // max(buffers, 1)))
    else:
        step = CHUNK_ELEMENTS // per_buffer
    step = max(1, step)
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def row_chunks(matrix: torch.Tensor, buffers: int = 1) -> List[Tuple[int, int]]:
    """:func:`row_ranges` of an (N, K) matrix."""
    return row_ranges(matrix.shape[0], matrix.shape[1], matrix.device, buffers)


def rows_in_chunks(sorted_rows: torch.Tensor, chunks: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """For ascending row indices ``sorted_rows``: per chunk ``(a, b)`` such that
    ``sorted_rows[a:b]`` are the rows inside it (one host read for all chunks: the CPU
    policy's; the GPU policy's kernels do without, see :func:`chunk_positions`)."""
    if not chunks:
        return []
    bounds = torch.tensor([start for start, _ in chunks] + [chunks[-1][1]], device=sorted_rows.device)
    first = torch.searchsorted(sorted_rows, bounds).tolist()
    return list(zip(first[:-1], first[1:]))


def chunk_positions(flat_positions: torch.Tensor, start: int, stop: int, num_cols: int, dummy: int) -> torch.Tensor:
    """For entries at ``flat_positions`` (row · num_cols + column) of the whole matrix: their
    flat positions inside the chunk of rows [start, stop), and ``dummy`` for those outside it
    (a spare slot of the chunk's buffer), without a host read."""
    local = flat_positions - start * num_cols
    inside = (local >= 0) & (local < (stop - start) * num_cols)
    return torch.where(inside, local, torch.full_like(local, dummy))


def softmax_(buffer: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: the rows of ``buffer`` (R, K), logits, become their softmax
    probabilities times ``scale``. Returns the (R,) log-sum-exp of the logits (stable:
    max-shifted, as ``log_softmax``)."""
    top = buffer.amax(dim=1, keepdim=True)
    torch.sub(buffer, top, out=buffer).exp_()
    normalizer = buffer.sum(dim=1, keepdim=True)
    buffer.mul_(normalizer.reciprocal().mul_(scale))
    return normalizer.log_().add_(top).squeeze(1)


def affine_into(z: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], out: torch.Tensor):
    """``out = z ⊙ scale + shift`` for per-column ``scale`` / ``shift`` (None: 1 / 0)."""
    if scale is not None and shift is not None:
        torch.addcmul(shift, z, scale, out=out)
    elif scale is not None:
        torch.mul(z, scale, out=out)
    elif shift is not None:
        torch.add(z, shift, out=out)
    else:
        out.copy_(z)
    return out


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
            affine_into(logits[start:stop], scale, shift, g)
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


class _OneHotWeightedSigmoidBCE(torch.autograd.Function):
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


def weighted_sigmoid_bce(logits, labels, bg_weight=None, fg_weight=None) -> torch.Tensor:
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
        return _OneHotWeightedSigmoidBCE.apply(logits, labels.long(), bg_weight, fg_weight)
