"""
The fused per-pixel softmax cross-entropy the pixel losses share: value and analytic gradient in
one walk over the (N, C, H, W) logits, chunk of pixels by chunk of pixels, writing only the
gradient (one logit-sized buffer, handed to autograd without a copy), as the classification
kernels (:mod:`eqlosses_d2.classification.losses.kernels`) and the detection ones
(:mod:`eqlosses_d2.losses.fused`) do. Pure PyTorch, float32 in and out, no Detectron2 import.

Layout: the logits are viewed as (N, C, P) (P = H·W pixels per image); a chunk is the pixels
[start, stop) of one image, a (C, L) view whose C rows are contiguous runs of L pixels, so the
softmax over the classes is a reduction over the outer dimension, vectorised across the pixels.
The chunks come from :func:`eqlosses_d2.losses.fused.row_ranges` (its CPU policy: cache-sized
chunks, every pass after the first reads from cache; its GPU policy: at most
``GPU_CHUNK_ELEMENTS`` entries per chunk, e.g. one chunk per 512 x 512 image at 150 classes), and
nowhere else. Nothing (N, C, H, W)-sized is allocated but the gradient; the other buffers are
per-pixel vectors (labels, factors, losses, label probabilities: N·P entries each, 1/C of the
logits) and a method's chunk-sized temporaries (Seesaw's one).

Per chunk, with x̃ = the method's adjusted logits written into the gradient's chunk, f the
per-pixel factor (0 for an ignored pixel, e.g. 1 / valid pixels otherwise) and w optional
per-class factors (IIF's weights, which multiply the logits too):

    lse = max x̃ + log Σ_j exp(x̃_j − max x̃),   loss_pixel = lse − x̃_y,
    grad = f · w ⊙ (softmax(x̃) − onehot(y)),

the loss from the log-sum-exp and the label's logit (no log of a probability, so exact where the
label's probability underflows), the exponentials as ``exp2`` (:func:`exp_shifted`), the per-pixel
losses summed in float64.

An ignored pixel's label is read as class 0 (its factor is 0: it adds nothing to the loss, the
gradient or the statistics). Under the GPU policy (:func:`eqlosses_d2.losses.base.gpu_policy`)
nothing here reads a device value on the host.
"""
from typing import Callable, List, Optional, Tuple

import torch

from ...losses import fused
from ...losses.base import gpu_policy, scaled_stashed_grad

__all__ = [
    "AffinePixelCE",
    "LOG2E",
    "PixelBatch",
    "check_finite_loss",
    "exp_shifted",
    "pixel_chunks",
    "pixel_softmax_ce",
    "require_counts",
]


class PixelBatch:
    """The labels of a batch in the kernels' layout: ``labels`` (N, P) int64 with ignored pixels
    read as 0, ``valid`` (N, P) bool and ``num_valid`` (0-dim int64 tensor, on the logits'
    device). On the CPU policy the labels' range is checked (one
    clear line naming the bad value); under the GPU policy it is not (no host read), and an out of
    range label fails in the gather, as in Detectron2's cross-entropy."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, who: str):
        num_images, num_classes = logits.shape[:2]
        targets = targets.reshape(num_images, -1)
        self.valid = targets != ignore_value
        if not gpu_policy(logits.device):
            bad = self.valid & ((targets < 0) | (targets >= num_classes))
            if bool(bad.any()):
                value = int(targets[bad][0])
                raise ValueError(f"pixel loss '{who}': label {value} is neither in [0, {num_classes}) nor the "
                                 f"ignore value {ignore_value} (MODEL.SEM_SEG_HEAD.NUM_CLASSES / IGNORE_VALUE)")
        zero = torch.zeros((), dtype=targets.dtype, device=targets.device)
        self.labels = torch.where(self.valid, targets, zero).long()
        self.num_valid = self.valid.sum()
        self.num_images, self.num_classes = num_images, num_classes
        self.num_pixels = self.labels.shape[1]

    def per_valid_pixel(self, weight: float = 1.0) -> torch.Tensor:
        """(N, P) float32: ``weight / max(valid pixels, 1)`` at valid pixels, 0 at ignored ones
        (the factor of a loss averaged over the valid pixels; no host read)."""
        scale = weight / self.num_valid.clamp(min=1).to(torch.float32)
        return self.valid.to(torch.float32) * scale


def pixel_chunks(logits: torch.Tensor, buffers: int = 1) -> List[Tuple[int, int, int]]:
    """``[(image, start, stop), ...]``: the pixels of each image in :func:`fused.row_ranges` chunks
    (a pixel is a row of C entries; ``buffers``: the chunk-sized buffers a kernel uses per chunk)."""
    num_images, num_classes = logits.shape[:2]
    num_pixels = logits[0, 0].numel() if num_images else 0
    ranges = fused.row_ranges(num_pixels, num_classes, logits.device, buffers)
    return [(n, start, stop) for n in range(num_images) for start, stop in ranges]


#: a callback building a chunk's adjusted logits: ``adjust(x, out, labels, image, start, stop)``, x
#: and out (C, L) views, labels (1, L). It either writes x̃ into ``out`` and returns ``(x̃_y, False)``,
#: or writes positive weights W ∝ exp(x̃) (any per-pixel factor) into ``out`` and returns
#: ``(log W_y, True)`` (Seesaw's probability domain); x̃_y and log W_y are (1, L)
Adjust = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int], Tuple[torch.Tensor, bool]]

#: log2(e): exp(t) is computed as exp2(t · log2 e), which the CPU kernels vectorise about 3x faster
#: than exp (the relative error of a softmax entry grows to |t| · 6e-8 for an entry e^t below the top)
LOG2E = 1.4426950408889634


def exp_shifted(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = exp(source − max over dim 0)`` for (C, L) chunks (``out`` may be ``source``), in
    two passes (one fused shift-and-scale, one ``exp2``) after the max; returns the (1, L) max."""
    top = source.amax(dim=0, keepdim=True)
    torch.add(top * -LOG2E, source, alpha=LOG2E, out=out).exp2_()
    return top


def pixel_softmax_ce(
    logits: torch.Tensor,
    batch: PixelBatch,
    factor: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    adjust: Optional[Adjust] = None,
    buffers: int = 1,
    label_prob: bool = False,
    column_sums: bool = False,
):
    """
    The fused softmax CE of (N, C, H, W) float32 contiguous ``logits`` (module docstring).
    The adjusted logits x̃ are ``scale ⊙ z + shift`` per class (``scale``, ``shift``: (C,) float32
    or None) or what ``adjust`` builds (then ``buffers`` counts its temporaries plus the gradient).
    ``factor``: (N, P) float32 per-pixel factors f (0 at ignored pixels). The gradient is
    ``f · scale ⊙ (softmax(x̃) − onehot)`` (``scale`` of the logits is also the gradient's
    per-class factor, the chain rule of x̃ = scale ⊙ z).

    Returns a dict: ``grad`` (N, C, H, W), ``loss_pixel`` (N, P) float32 ``lse(x̃) − x̃_y`` (every
    pixel, ignored ones too: read it with ``factor``), ``loss`` (0-dim float64, Σ f · loss_pixel);
    with ``label_prob``: ``prob_y`` (N, P) softmax(x̃)_y; with ``column_sums``: ``column_sums`` (C,)
    float64, Σ over pixels of f · softmax(x̃) (the label entries included).
    """
    num_images, num_classes = logits.shape[:2]
    grad = torch.empty_like(logits)
    x_all = logits.view(num_images, num_classes, -1)
    g_all = grad.view(num_images, num_classes, -1)
    loss_pixel = torch.empty(num_images, batch.num_pixels, dtype=torch.float32, device=logits.device)
    prob_y = torch.empty_like(loss_pixel) if label_prob else None
    sums = torch.zeros(num_classes, dtype=torch.float64, device=logits.device) if column_sums else None
    shift_col = None if shift is None else shift[:, None]
    scale_col = None if scale is None else scale[:, None]
    for image, start, stop in pixel_chunks(logits, buffers):
        x, g = x_all[image, :, start:stop], g_all[image, :, start:stop]
        rows = batch.labels[image, None, start:stop]  # (1, L)
        f = factor[image, None, start:stop]
        exponentiated = False
        if adjust is not None:
            value_y, exponentiated = adjust(x, g, rows, image, start, stop)
            source = g
        elif scale_col is None and shift_col is None:
            value_y, source = x.gather(0, rows), x
        else:
            fused.affine_into(x, scale_col, shift_col, g)
            value_y, source = g.gather(0, rows), g
        if exponentiated:  # g holds W ∝ exp(x̃), value_y = log W_y
            total = g.sum(dim=0, keepdim=True)
            loss_pixel[image, None, start:stop] = total.log().sub_(value_y)
        else:
            top = exp_shifted(source, g)
            total = g.sum(dim=0, keepdim=True)
            loss_pixel[image, None, start:stop] = total.log().add_(top).sub_(value_y)
        if prob_y is not None:  # softmax(x̃)_y from the same exponentials (0 where it underflows)
            torch.div(g.gather(0, rows), total, out=prob_y[image, None, start:stop])
        g.mul_(f / total)  # f · softmax(x̃)
        if sums is not None:
            sums += g.sum(dim=1).double()
        if scale_col is None:
            g.scatter_add_(0, rows, -f)
        else:
            g.mul_(scale_col)
            g.scatter_add_(0, rows, -f * scale[rows])
    loss = (loss_pixel.double() * factor).sum() if num_images else logits.new_zeros((), dtype=torch.float64)
    out = {"grad": grad, "loss_pixel": loss_pixel, "loss": loss}
    if prob_y is not None:
        out["prob_y"] = prob_y
    if sums is not None:
        out["column_sums"] = sums
    return out


def check_finite_loss(loss: torch.Tensor, who: str):
    """The fused loss is a sum over the valid pixels' lse − x̃_y: NaN or inf when a logit is (a
    NaN or +inf logit anywhere in a chunk's pixel reaches it). CPU policy: one clear line at once
    (reading a CPU value costs no device synchronization), returns None. GPU policy: a 0-dim bool
    tensor (no host read), for :func:`eqlosses_d2.losses.base.sync_state`'s ``finite`` (a state
    update leaves the batch out; the NaN loss stops Detectron2's trainer before the step)."""
    finite = torch.isfinite(loss)
    if gpu_policy(loss.device):
        return finite
    if not bool(finite):
        raise FloatingPointError(f"pixel loss '{who}': the loss is {float(loss)}: NaN or inf segmentation logits "
                                 f"(diverged training? try a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS)")
    return None


def require_counts(loss, attribute: str) -> torch.Tensor:
    """The model's per-class statistic ``attribute`` (``image_count``, ``pixel_count``) for ``loss``,
    or a one-line error when the model has none. Whether they are set is read once per state of
    the ``is_set`` flag (its version counter changes when a checkpoint loads into it), not every
    iteration (a host read under the GPU policy otherwise)."""
    stats = loss.class_stats
    is_set = getattr(stats, "is_set", True)
    cached = getattr(loss, "_stats_checked", None)
    if stats is not None and torch.is_tensor(is_set) and cached == (id(is_set), is_set._version):
        return getattr(stats, attribute)
    if stats is None or not bool(is_set) or getattr(stats, attribute, None) is None:
        raise RuntimeError(
            f"pixel loss '{loss.name}' needs the training set's per-class {attribute.replace('_', ' ')}s, but the "
            f"model has none: train on a registered semantic segmentation dataset or load an eqlosses_d2 checkpoint"
        )
    if torch.is_tensor(is_set):
        object.__setattr__(loss, "_stats_checked", (id(is_set), is_set._version))
    return getattr(stats, attribute)


class AffinePixelCE(torch.autograd.Function):
    """``Σ_p f_p CE(scale ⊙ z_p + shift, y_p)`` and its gradient ``f ⊙ scale ⊙ (softmax(scale ⊙ z +
    shift) − onehot)`` (:func:`pixel_softmax_ce` without its extras; ``shift`` / ``scale``: (C,) or None):
    plain CE, Balanced Softmax's prior shift, IIF's logit weights. ``who`` names the loss in errors."""

    @staticmethod
    def forward(ctx, logits, batch, factor, shift, scale, who):
        out = pixel_softmax_ce(logits, batch, factor, shift=shift, scale=scale)
        ctx.grad, ctx.who = out["grad"], who
        return out["loss"].to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, ctx.who), None, None, None, None, None
