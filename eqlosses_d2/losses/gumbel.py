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
  of the batch's foreground RoIs whose class is a tail class. The draw: one uniform
  float32 matrix u (n_bg, C) (background RoIs in batch order), ``T = u > ρ`` (read on
  the tail columns), from :func:`uniform_draw` (seeded by torch's global generator).
  Inference ``p_j``, background column ``1 − max_j p_j``.

Defaults: bias_init = −2 (all channels), tail_threshold λ = 0.0011 (LVIS v1; 0.00177
for v0.5; read by ``gumbel_droploss`` only). The paper tests with NMS 0.3
(``MODEL.ROI_HEADS.NMS_THRESH_TEST``: a config matter, not the loss's).

Differences from the authors' code:

- BCE is computed in closed form, ``ℓ = y·e − (1 − y)·log(−expm1(−e))``, e = exp(−c),
  c = clamp(z, −4, 10), with its analytic gradient (a custom autograd function, a
  handful of passes instead of autograd through exp/exp/BCE), instead of
  ``binary_cross_entropy(exp(−exp(−c)), y)``: equal up to rounding, and accurate where
  p → 1 (c near 10), where 1 − p loses most digits in float32 (the authors' BCE also
  clamps each log at −100; with c ≥ −4 no term comes near it). The gradient is 0 for
  z outside [−4, 10] as through the authors' clamp, and also exactly at the two
  bounds (a measure-zero difference).
- the random draw covers background RoIs only; the authors draw a uniform number for
  every (RoI, class) pair and use the same ``u > ρ`` rule, so the distribution of the
  weights is the same.
- a batch without foreground RoI: the authors' ρ is the mean of an empty tensor (NaN),
  ``u > NaN`` is false and nothing is dropped; here ρ = 1, with the same effect.
"""
import numpy as np
import torch

from .base import ClassificationLoss, empty_loss, tail_class_mask, take_stashed_grad
from .registry import register_loss
from .sigmoid import with_background_column

__all__ = ["GumbelCrossEntropy", "GumbelDropLoss", "gumbel_activation", "gumbel_bce_sum", "uniform_draw"]

#: training clamp of the logits, as the authors'
LOGIT_MIN, LOGIT_MAX = -4.0, 10.0
#: e = exp(−z) of a term DropLoss leaves out (any e > 104 zeroes its loss and gradient in float32)
_DROPPED_E = 1e4
#: bounds of the reduced loss of Gumbel BCE alone
LOSS_MIN, LOSS_MAX = 0.0, 20.0


def gumbel_activation(logits: torch.Tensor) -> torch.Tensor:
    """``exp(−exp(−z))``, unclamped (inference)."""
    return torch.exp(-torch.exp(-logits))


def uniform_draw(rows: int, cols: int, device) -> torch.Tensor:
    """
    A (rows, cols) float32 matrix of U[0, 1) numbers, determined by torch's global
    generator (so ``torch.manual_seed`` reproduces it and ``--resume``, which restores
    torch's RNG state, continues it). On a GPU: ``torch.rand``. On the CPU: a NumPy PCG64
    stream seeded by one int64 drawn from torch's generator, twice as fast as torch's
    mt19937 at LVIS scale (6k background RoIs × 1.1k tail classes each iteration), with the
    same float32 resolution.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.rand(rows, cols, device=device)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    return torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).random((rows, cols), dtype=np.float32))


class _GumbelBCESum(torch.autograd.Function):
    """
    ``Σ_kept BCE(exp(−exp(−clamp(z, −4, 10))), y)`` and its analytic gradient in one pass
    over the (N, K) logits. ``y`` is given sparsely by the positions of its ones
    (``pos_rows``, ``pos_cols``); ``drop`` (bool (N, K) or None) marks the negative
    terms left out (DropLoss's w = 0; a positive marked there is kept). With e = exp(−c), p = exp(−e), q = 1 − p:
    ``ℓ = e, dℓ/dc = −e`` for y = 1; ``ℓ = −log q, dℓ/dc = e·p/q`` for y = 0.
    """

    @staticmethod
    def forward(ctx, logits, pos_rows, pos_cols, drop):
        # two (N, K) buffers, everything else in place (on CPU the allocations cost as
        # much as the arithmetic); every quantity in a form accurate to float32 rounding
        e = logits.clamp(LOGIT_MIN, LOGIT_MAX).neg_().exp_()
        e_pos = e[pos_rows, pos_cols]
        if drop is not None:
            # a dropped negative term gets e = 1e4: exp(−e) underflows to 0, so its −log q
            # is exactly 0 and its gradient e/(exp(e) − 1) is exactly 0 (one pass, where
            # zeroing the loss and the gradient terms would take two)
            e.masked_fill_(drop, _DROPPED_E)
        # q = 1 − p = −expm1(−e), accurate for small e
        log_q = torch.neg(e).expm1_().neg_().log_()
        # every term counted as a negative, then the positives corrected: −log q → e
        total = log_q.sum().neg_() + (e_pos + log_q[pos_rows, pos_cols]).sum()
        # the negative terms' gradient e·p/q = e/(exp(e) − 1), in log_q's buffer, then
        # the positive terms' −e
        grad = e.div_(torch.expm1(e, out=log_q))
        grad[pos_rows, pos_cols] = e_pos.neg_()
        # the clamp: no gradient outside (LOGIT_MIN, LOGIT_MAX)
        torch.ops.aten.hardtanh_backward.grad_input(grad, logits, LOGIT_MIN, LOGIT_MAX, grad_input=grad)
        ctx.grad = grad  # an intermediate: handed to autograd (not copied) in backward
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return take_stashed_grad(ctx, "Gumbel BCE").mul_(grad_output), None, None, None


def gumbel_bce_sum(logits: torch.Tensor, labels: torch.Tensor, drop=None) -> torch.Tensor:
    """
    Σ of Gumbel BCE terms over an (N, K) float32 logit matrix, the logits clamped to
    [−4, 10] as in training (no gradient outside). ``labels`` (N,): the column of each
    row's positive; a label ≥ K (background when K = C) means an all-negative row.
    ``drop``: optional bool (N, K) of terms to leave out.
    """
    logits = logits.float()
    num_columns = logits.shape[1]
    pos_rows = torch.nonzero(labels < num_columns, as_tuple=True)[0]
    return _GumbelBCESum.apply(logits, pos_rows, labels[pos_rows], drop)


class _GumbelBase(ClassificationLoss):
    config_node = "GUMBEL"
    family = "sigmoid"

    def __init__(self, num_classes, class_stats=None, bias_init=-2.0, tail_threshold=0.0011):
        super().__init__(num_classes, class_stats)
        self.bias_init = float(bias_init)
        self.tail_threshold = float(tail_threshold)

    def classifier_bias_init(self):
        return torch.full((self.num_logits,), self.bias_init)


@register_loss
class GumbelCrossEntropy(_GumbelBase):
    name = "gumbel"
    extra_logits = 1

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        loss = gumbel_bce_sum(logits, labels) / logits.shape[0]
        return {"loss_cls": loss.clamp(LOSS_MIN, LOSS_MAX)}

    def predict_probs(self, logits):
        return gumbel_activation(logits.float())

    def extra_repr(self):
        return f"num_classes={self.num_classes}, bias_init={self.bias_init}"


@register_loss
class GumbelDropLoss(_GumbelBase):
    name = "gumbel_droploss"
    extra_logits = 0

    def __init__(self, num_classes, class_stats=None, bias_init=-2.0, tail_threshold=0.0011):
        super().__init__(num_classes, class_stats, bias_init=bias_init, tail_threshold=tail_threshold)
        self._last = None

    @torch.no_grad()
    def drop_mask(self, labels: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """
        (N, C) bool: the terms DropLoss leaves out (w = 0), i.e. ``T·T_λ·(1 − y)`` = 1.
        A foreground RoI's row is T_λ itself (its own class, a positive, is always kept by
        :func:`gumbel_bce_sum`); a background RoI drops each tail class with probability
        1 − ρ: one :func:`uniform_draw` (n_bg, C), ``u > ρ``.
        """
        num_classes = self.num_classes
        fg = labels < num_classes
        fg_labels = labels[fg]
        if fg_labels.numel():
            tail_fraction = tail[fg_labels].float().mean()
        else:  # the authors' ρ is NaN here and u > NaN is false: nothing dropped
            tail_fraction = torch.ones((), device=labels.device)
        self._last = tail_fraction
        drop = tail[None, :].expand(labels.shape[0], num_classes).clone()  # the foreground RoIs' rows
        bg_rows = torch.nonzero(~fg, as_tuple=True)[0]
        if bg_rows.numel():
            # one number per (background RoI, class), used on the tail columns only:
            # elementwise, no scatter into the tail columns
            u = uniform_draw(bg_rows.numel(), num_classes, labels.device)
            drop.index_copy_(0, bg_rows, (u > tail_fraction).logical_and_(tail[None, :]))
        return drop

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        tail = tail_class_mask(self.require_class_stats(), self.tail_threshold).to(labels.device)
        self._last = None
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        drop = self.drop_mask(labels, tail)
        loss = gumbel_bce_sum(logits, labels, drop) / logits.shape[0]
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return with_background_column(gumbel_activation(logits.float()))

    def scalars(self):
        if self._last is None:
            return {}
        return {"tail_fraction": float(self._last)}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, bias_init={self.bias_init}, tail_threshold={self.tail_threshold}"
