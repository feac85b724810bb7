"""
Row-chunked kernels shared by the calibrations: at inference a box head's score matrix
is large (8,192 RoIs x 1,204 scores: 39 MB of float32), and each extra full-size
temporary costs a fresh allocation (page faults on the CPU) and a pass over memory.
These kernels write their result into one output tensor, walking the rows in the
chunks of :func:`eqlosses_d2.losses.fused.row_chunks` through one chunk-sized scratch
buffer, so that every pass after the first reads from cache.
"""
from typing import Optional

import torch

from ..losses.fused import affine_into, row_chunks

__all__ = ["affine_softmax", "column_scale"]


def column_scale(factors: torch.Tensor, num_cols: int, like: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """(num_cols,) row of ``like``'s dtype and device: ``factors`` for the first
    ``factors.numel()`` columns, ``fill`` for the rest (background / objectness)."""
    row = torch.full((num_cols,), fill, dtype=like.dtype, device=like.device)
    row[: factors.numel()] = factors.to(device=like.device, dtype=like.dtype)
    return row


def affine_softmax(logits: torch.Tensor, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(logits ⊙ scale + shift, dim=1)`` for (K,) ``scale`` / ``shift`` (None: 1 / 0)
    of an (N, K) matrix, in float32, into one new (N, K) tensor."""
    logits = logits.float()
    out = torch.empty_like(logits)
    chunks = row_chunks(logits)
    if not chunks:
        return out
    scratch = logits.new_empty(chunks[0][1] - chunks[0][0], logits.shape[1])
    for start, stop in chunks:
        buffer = affine_into(logits[start:stop], scale, shift, scratch[: stop - start])
        _softmax_into(buffer, out[start:stop])
    return out


_SOFTMAX_OUT = [True]  # torch.softmax(..., out=) exists (torch >= 2.0)


def _softmax_into(buffer: torch.Tensor, out: torch.Tensor):
    if _SOFTMAX_OUT[0]:
        try:
            torch.softmax(buffer, dim=1, out=out)
            return
        except TypeError:
            _SOFTMAX_OUT[0] = False
    out.copy_(torch.softmax(buffer, dim=1))
