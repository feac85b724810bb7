"""
GOL: Gumbel activation and DropLoss (Alexandridis et al., "Long-tailed Instance
Segmentation using Gumbel Optimized Loss", ECCV 2022).

Gumbel activation ``p = exp(−exp(−z))``; training clamps z to [−4, 10] and applies BCE
on p; inference uses the unclamped activation. The classifier bias starts at −2.

- ``gumbel`` (Gumbel BCE alone, the authors' ``GumbelCE``): C + 1 channels, the last
  one a background channel whose target is 1 for a background RoI (mmdetection's
  one-hot over C + 1 channels); ``L = clamp(Σ_ij BCE(p_ij, y_ij) / N, 0, 20)`` (the
  *reduced* loss is clamped). Inference ``p_j`` for all C + 1 channels (the background
  column is the background channel's probability).
- ``gumbel_droploss`` (GOL, the authors' ``DropLoss`` with ``use_classif='gumbel'``):
  C channels (a background RoI has an all-zero target), DropLoss weights
  ``w_ij = 1 − T_ij·T_λ(f_j)·(1 − y_ij)``, ``L = Σ_ij w_ij·BCE(p_ij, y_ij) / N`` (no
  clamp). T_λ(f) = 1 for tail classes, image frequency f < λ (:func:`tail_class_mask`).
  T_ij = 1 for a foreground RoI (as EQL); for a background RoI, T_ij = 1 with
  probability 1 − ρ, drawn independently per (RoI, tail class), where ρ is the fraction
  of the batch's foreground RoIs whose class is a tail class. The draw: one Bernoulli
  matrix ``T = U > ρ`` (n_bg, C) (background RoIs in batch order; read on the tail
  columns) from :func:`exceeds_uniform` (seeded by torch's global generator).
  Inference ``p_j``, background column ``1 − max_j p_j``.

Defaults: bias_init = −2 (all channels), tail_threshold λ = 0.0011 (LVIS v1; 0.00177
for v0.5; read by ``gumbel_droploss`` only). Test NMS is a config matter
(``MODEL.ROI_HEADS.NMS_THRESH_TEST``), not the loss's: the authors' 2x GOL recipe tests at
0.3, their 1x Gumbel-only configs at mmdetection's LVIS default 0.5 (the shipped configs
follow each).

Differences from the authors' code:

- BCE is computed in closed form with its analytic gradient (a custom autograd
  function; see :class:`_GumbelBCESum`): ``ℓ = e`` for a positive, ``ℓ = log1p(r)`` with
  r = 1/expm1(e) for a negative, e = exp(−c), c = clamp(z, −4, 10), instead of
  ``binary_cross_entropy(exp(−exp(−c)), y)`` through autograd: equal up to rounding,
  and accurate where p → 1 (c near 10), where 1 − p loses most digits in float32 (the
  authors' BCE also clamps each log at −100; with c ≥ −4 no term comes near it). The
  gradient is 0 for z outside [−4, 10] as through the authors' clamp, and also exactly
  at the two bounds (a measure-zero difference).
- the random draw covers background RoIs only; the authors draw a uniform number for
  every (RoI, class) pair and use the same ``u > ρ`` rule, so the distribution of the
  weights is the same (on the CPU the uniform is read lazily, see
  :func:`exceeds_uniform`: the same Bernoulli probabilities from fewer random bits).
- a batch without foreground RoI: the authors' ρ is the mean of an empty tensor (NaN),
  ``u > NaN`` is false and nothing is dropped; here ρ = 1, with the same effect.
"""
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from .base import (
    ClassificationLoss,
    check_finite_logits,
    empty_loss,
    gpu_policy,
    nan_unless,
    scaled_stashed_grad,
    tail_class_mask,
)
from .fused import chunk_positions, row_chunks, rows_in_chunks
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .sigmoid import with_background_column

__all__ = ["GumbelCrossEntropy", "GumbelDropLoss", "RowDrop", "exceeds_uniform", "gumbel_activation", "gumbel_bce_sum"]

#: training clamp of the logits, as the authors'
LOGIT_MIN, LOGIT_MAX = -4.0, 10.0
#: bounds of the reduced loss of Gumbel BCE alone
LOSS_MIN, LOSS_MAX = 0.0, 20.0


def exceeds_uniform(rows: int, cols: int, threshold, device) -> torch.Tensor:
    """
    A (rows, cols) bool matrix of independent Bernoulli draws ``U > threshold`` with U
    uniform on [0, 1) (so each entry is true with probability 1 − threshold), determined by
    torch's global generator (``torch.manual_seed`` reproduces it; ``--resume``, which
    restores torch's RNG state, continues it).

    Under the GPU policy (:data:`.base.DEVICE_POLICY`; no host read):
    ``torch.rand(rows, cols) > threshold``. On the CPU, where drawing a float per
    entry is the most expensive part of DropLoss at LVIS scale, U is read lazily, a byte at
    a time: a NumPy PCG64 stream is seeded by one int64 from torch's generator; its first
    ``ceil(rows·cols/8)`` 64-bit words, as little-endian bytes in row-major order, are the
    first base-256 digits b of the U's. With R = floor(threshold·2^72), b > R >> 64 decides
    "true", b < R >> 64 "false"; for the entries where b equals R >> 64 (1 in 256), the next
    64-bit words of the stream (one per tie, in row-major order) are U's remaining digits L
    and the entry is ``L > R mod 2^64``. This is exactly ``U > threshold`` for a U with
    2^-72 resolution, from about 8 random bits per entry instead of 32.
    """
    device = torch.device(device)
    if gpu_policy(device):
        return torch.rand(rows, cols, device=device) > threshold
    threshold = float(threshold)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    if rows * cols == 0:
        return torch.zeros((rows, cols), dtype=torch.bool)
    bound = math.floor(Fraction(min(max(threshold, 0.0), 1.0)) * 2**72)
    high, low = bound >> 64, bound & (2**64 - 1)
    if high > 255:  # threshold 1: U > 1 never
        return torch.zeros((rows, cols), dtype=torch.bool)
    bit_generator = np.random.PCG64(seed)
    n = rows * cols
    digits = bit_generator.random_raw((n + 7) // 8).astype("<u8", copy=False).view(np.uint8)[:n]
    result = digits > np.uint8(high)
    ties = np.flatnonzero(digits == np.uint8(high))
    if ties.size:
        result[ties] = bit_generator.random_raw(ties.size) > np.uint64(low)
    return torch.from_numpy(result.reshape(rows, cols))


def gumbel_activation(logits: torch.Tensor) -> torch.Tensor:
    """``exp(−exp(−z))``, unclamped (inference)."""
    return torch.exp(-torch.exp(-logits))


class RowDrop(NamedTuple):
    """
    A drop mask in compact form: row i of the (N, K) mask is ``table[row_index[i]]``, with
    ``table`` (M, K) bool and ``row_index`` (N,) int64. DropLoss's mask has one table row
    per background RoI (a random subset of the tail classes) and a last one, the tail
    classes, shared by every foreground RoI.
    """

    table: torch.Tensor
    row_index: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (N, K) bool mask."""
        return self.table.index_select(0, self.row_index)


class _GumbelBCESum(torch.autograd.Function):
    """
    ``scale · Σ_kept BCE(exp(−exp(−clamp(z, −4, 10))), y)`` and its analytic gradient over
    the (N, K) logits. ``y`` is given sparsely by the positions of its ones (``pos_rows``
    ascending, ``pos_cols``); ``drop`` (bool (N, K), a :class:`RowDrop`, or None) marks
    the negative terms left out (DropLoss's w = 0; a positive marked there is kept).

    With c the clamped logit, e = exp(−c), p = exp(−e), q = 1 − p and r = p/q =
    1/expm1(e): a positive term is ``ℓ = e, dℓ/dc = −e``; a negative term is
    ``ℓ = −log q = log1p(r), dℓ/dc = e·r``. Every quantity is accurate to float32 rounding,
    also where p → 1 (c near 10, tiny e), where 1 − p would lose most digits; a dropped
    term gets r = 0, so exactly zero loss and gradient. The rows are processed in chunks
    (:mod:`.fused`); under the GPU policy the positives of a chunk are found without a host
    read (:func:`.fused.chunk_positions`), and non-finite logits make the loss NaN instead of
    raising (:func:`.base.check_finite_logits`).
    """

    @staticmethod
    def forward(ctx, logits, pos_rows, pos_cols, drop, scale, who):
        num_rows, num_cols = logits.shape
        grad = torch.empty_like(logits)
        chunks = row_chunks(logits)
        on_host = not gpu_policy(logits.device)
        compact = isinstance(drop, RowDrop)
        # per-chunk buffers, allocated once (bool arithmetic is slow on the CPU: the drop
        # mask goes through uint8 to float, and r ← r − r·drop)
        rows = chunks[0][1] if chunks else 0
        e_buf = torch.empty((rows, num_cols), dtype=logits.dtype, device=logits.device)
        # r's buffer has a spare last slot, where the GPU policy's positives outside a chunk go
        r_store = torch.empty(rows * num_cols + 1, dtype=logits.dtype, device=logits.device)
        r_buf = r_store[: rows * num_cols].view(rows, num_cols)
        if on_host:
            positives = rows_in_chunks(pos_rows, chunks)
        else:
            pos_flat = pos_rows * num_cols + pos_cols
        if drop is not None:
            drop_float = torch.empty_like(e_buf)
        if compact:
            drop_bytes = torch.empty((rows, num_cols), dtype=torch.uint8, device=logits.device)
            table_bytes = drop.table.view(torch.uint8)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        logit_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        for k, (start, stop) in enumerate(chunks):
            z = logits[start:stop]
            logit_sum += z.sum()  # the finite check, the chunk's first read (the rest hits the cache)
            e = torch.clamp(z, LOGIT_MIN, LOGIT_MAX, out=e_buf[: stop - start]).neg_().exp_()
            r = torch.expm1(e, out=r_buf[: stop - start]).reciprocal_()
            if compact:  # a row gather (a scatter of bool rows is much slower on the CPU)
                chunk_drop = torch.index_select(
                    table_bytes, 0, drop.row_index[start:stop], out=drop_bytes[: stop - start]
                )
            elif drop is not None:
                chunk_drop = drop[start:stop].view(torch.uint8)
            if drop is not None:
                r.addcmul_(r, drop_float[: stop - start].copy_(chunk_drop), value=-1.0)
            # the positives' negative-form terms are left out here and added below
            if on_host:
                first, last = positives[k]
                r[pos_rows[first:last] - start, pos_cols[first:last]] = 0.0
            else:
                r_store.index_fill_(0, chunk_positions(pos_flat, start, stop, num_cols, r_store.numel() - 1), 0.0)
            g = torch.mul(e, r, out=grad[start:stop])
            total += torch.log1p_(r).sum()
            # the clamp: no gradient outside (LOGIT_MIN, LOGIT_MAX)
            torch.ops.aten.hardtanh_backward.grad_input(g, z, LOGIT_MIN, LOGIT_MAX, grad_input=g)
            if scale != 1.0:
                g.mul_(scale)
        finite = check_finite_logits(logits, who, total=logit_sum)
        z_pos = logits[pos_rows, pos_cols]
        e_pos = z_pos.clamp(LOGIT_MIN, LOGIT_MAX).neg_().exp_()
        total += e_pos.sum()
        inside = (z_pos > LOGIT_MIN) & (z_pos < LOGIT_MAX)
        grad[pos_rows, pos_cols] = torch.where(inside, e_pos.mul_(-scale), 0.0)
        ctx.grad = grad  # handed to autograd (not copied) in backward
        return nan_unless(finite, (total * scale).to(logits.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        return scaled_stashed_grad(ctx, grad_output, "Gumbel BCE"), None, None, None, None, None


def gumbel_bce_sum(
    logits: torch.Tensor, labels: torch.Tensor, drop=None, scale: float = 1.0, who: str = "Gumbel BCE"
) -> torch.Tensor:
    """
    ``scale`` times the Σ of Gumbel BCE terms over an (N, K) float32 logit matrix, the
    logits clamped to [−4, 10] as in training (no gradient outside). ``labels`` (N,): the
    column of each row's positive; a label ≥ K (background when K = C) means an
    all-negative row. ``drop``: optional bool (N, K) or :class:`RowDrop` of terms to leave
    out. NaN/inf logits raise ``FloatingPointError`` (``who`` names the caller), checked on
    the way (no pass of its own).
    """
    logits = logits.float().contiguous()
    num_columns = logits.shape[1]
    pos_rows = torch.nonzero(labels < num_columns, as_tuple=True)[0]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _GumbelBCESum.apply(logits, pos_rows, labels[pos_rows], drop, float(scale), who)


class _GumbelBase(ClassificationLoss):
    config_node = "GUMBEL"
    family = "sigmoid"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.GUMBEL")
        # Classifier bias of all channels ("gumbel" and "gumbel_droploss").
        _C.BIAS_INIT = -2.0
        # DropLoss λ (LVIS v1 0.0011, v0.5 0.00177); "gumbel_droploss" only.
        _C.TAIL_THRESHOLD = 0.0011

    def __init__(self, num_classes, class_stats=None, bias_init=-2.0, tail_threshold=0.0011):
        super().__init__(num_classes, class_stats)
        self.bias_init = float(bias_init)
        self.tail_threshold = float(tail_threshold)

    def classifier_bias_init(self):
        return torch.full((self.num_logits,), self.bias_init)


@register(ROI_CLS_LOSS_REGISTRY)
class GumbelCrossEntropy(_GumbelBase):
    name = "gumbel"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "Gumbel activation (GOL paper's ablation)"
    doc_paper = '1x random: mask AP 19.0 (APr 4.9)'
    extra_logits = 1

    def forward(self, logits, labels, **context):
        self._check(logits, labels, finite=False)  # checked by gumbel_bce_sum on the way
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        loss = gumbel_bce_sum(logits, labels, scale=1.0 / logits.shape[0], who=f"loss '{self.name}'")
        return {"loss_cls": loss.clamp(LOSS_MIN, LOSS_MAX)}

    def predict_probs(self, logits):
        return gumbel_activation(logits.float())

    def extra_repr(self):
        return f"num_classes={self.num_classes}, bias_init={self.bias_init}"


@register(ROI_CLS_LOSS_REGISTRY)
class GumbelDropLoss(_GumbelBase):
    name = "gumbel_droploss"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'GOL: Gumbel + DropLoss (Alexandridis et al., ECCV 2022)'
    doc_paper = '2x RFS, normalized mask predictor: 27.7 (APr 21.4)'
    extra_logits = 0

    def __init__(self, num_classes, class_stats=None, bias_init=-2.0, tail_threshold=0.0011):
        super().__init__(num_classes, class_stats, bias_init=bias_init, tail_threshold=tail_threshold)
        self._last = None

    @torch.no_grad()
    def drop_terms(self, labels: torch.Tensor, tail: torch.Tensor) -> RowDrop:
        """
        The terms DropLoss leaves out (w = 0), i.e. ``T·T_λ·(1 − y)`` = 1, as a
        :class:`RowDrop`: a foreground RoI's row is T_λ itself (its own class, a positive,
        is always kept by :func:`gumbel_bce_sum`); a background RoI drops each tail class
        with probability 1 − ρ: one :func:`exceeds_uniform` (n_bg, C), ``U > ρ``.
        """
        num_classes = self.num_classes
        fg = labels < num_classes
        fg_labels = labels[fg]
        if fg_labels.numel():
            tail_fraction = tail[fg_labels].float().mean()
        else:  # the authors' ρ is NaN here and u > NaN is false: nothing dropped
            tail_fraction = torch.ones((), device=labels.device)
        self._last = tail_fraction
        bg_rows = torch.nonzero(~fg, as_tuple=True)[0]
        num_bg = bg_rows.numel()
        table = torch.empty((num_bg + 1, num_classes), dtype=torch.bool, device=labels.device)
        if num_bg:  # one draw per (background RoI, class), used on the tail columns only
            above = exceeds_uniform(num_bg, num_classes, tail_fraction, labels.device).to(labels.device)
            torch.logical_and(above, tail[None, :], out=table[:num_bg])
        table[num_bg] = tail
        row_index = torch.full(labels.shape, num_bg, dtype=torch.long, device=labels.device)
        row_index[bg_rows] = torch.arange(num_bg, device=labels.device)
        return RowDrop(table, row_index)

    def drop_mask(self, labels: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """(N, C) bool: :meth:`drop_terms` as a dense mask."""
        return self.drop_terms(labels, tail).dense()

    def forward(self, logits, labels, **context):
        self._check(logits, labels, finite=False)  # checked by gumbel_bce_sum on the way (no state)
        tail = tail_class_mask(self.require_class_stats(), self.tail_threshold).to(labels.device)
        self._last = None
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        drop = self.drop_terms(labels, tail)
        loss = gumbel_bce_sum(logits, labels, drop, scale=1.0 / logits.shape[0], who=f"loss '{self.name}'")
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return with_background_column(gumbel_activation(logits.float()))

    def scalars(self):
        if self._last is None:
            return {}
        return {"tail_fraction": self._last.item()}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, bias_init={self.bias_init}, tail_threshold={self.tail_threshold}"
