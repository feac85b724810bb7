"""
OHEM cross-entropy per pixel (online hard example mining; Shrivastava et al., CVPR 2016, for
segmentation as in Wu et al. "High-performance Semantic Segmentation Using Very Deep Fully
Convolutional Networks", 2016), as mmsegmentation runs it: its ``OHEMPixelSampler``
(``mmseg/structures/sampler/ohem_pixel_sampler.py``, formerly ``mmseg/core/seg/sampler/``, read
at commit 230246f5) with ``thresh`` set, followed by its ``CrossEntropyLoss`` with the sampler's
weights. Their documented OHEM recipe (``docs/en/advanced_guides/training_tricks.md``: PSPNet
R-50 on Cityscapes with ``sampler=dict(type='OHEMPixelSampler', thresh=0.7, min_kept=100000)``)
gives our defaults.

Selection, once per batch over all its images (as theirs; under DDP each process selects in its
own batch, as their sampler does per GPU: nothing is synchronised), on the softmax probability of
the label p_y of each valid pixel (ignored pixels are never kept):

    k = min(min_kept · N, V − 1)          (N images in the batch, V valid pixels in it)
    t = max(p_(k), thresh)                (p_(k): the k-th smallest p_y, counting from 0)
    kept = valid pixels with p_y < t      (strictly)

so the batch keeps every pixel whose label probability is below ``thresh``, and at least the
``min_kept · N`` hardest ones (lowest p_y, ties aside) when fewer are below it. ``min_kept`` is per
image: their ``batch_kept = min_kept * batch_size``. A quirk of theirs, kept: when the batch has at
most ``min_kept · N`` valid pixels, k = V − 1 and t is the largest p_y, so the easiest pixel (and
its ties) is dropped unless it is below ``thresh``. The selection is made without gradient
(their ``torch.no_grad``) on the probabilities of the same forward pass.

Loss: ``L = loss_weight · Σ_{kept} CE(z_p, y_p) / D`` with the normaliser D (``NORMALIZER``):

- ``"valid"`` (default): the valid pixels of the batch, V: mmsegmentation's ``CrossEntropyLoss``
  with ``avg_non_ignore=True`` (the flag its warning recommends) and Detectron2's CE convention,
  so that OHEM keeping every pixel is plain CE;
- ``"all"``: all N·H·W pixels, ignored ones included: mmsegmentation's default
  ``avg_non_ignore=False`` (``weight_reduce_loss``: the weighted per-pixel losses averaged over
  every element), which their documented recipe gets (it sets no ``avg_non_ignore``);
- ``"kept"``: the kept pixels (United-Perception's and HRNet's ``OhemCrossEntropy``, which mark the
  others ignored before a mean CE).

A batch without a valid pixel gives 0 with a zero gradient. Predicted from the raw logits.
Config node ``MODEL.EQLOSSES.SEM_SEG.OHEM``.

Not implemented: their ``thresh=None`` mode (keep exactly the ``min_kept · N`` pixels of the largest
loss; with a plain CE loss the same order as the lowest p_y, so ``THRESH`` near 0 is close to it
but for ties and the quirk above); their multi-loss sampling context (the loss here is CE).

Computation: one chunked walk (:func:`.kernels.pixel_softmax_ce`) computes each pixel's CE, its
label probability and the full CE gradient ``valid ⊙ (softmax(z) − onehot)`` into the one
logit-sized buffer autograd receives; the threshold comes from the (N·H·W,) probabilities (CPU
policy: a count below ``thresh`` and, only when needed, ``torch.kthvalue``; GPU policy: a sort and
a gather at a device index, no host read); one more pass multiplies the gradient by the per-pixel
weights ``kept / D``. No logit-sized temporary besides the gradient.
"""
import torch

from ...losses.base import gpu_policy, scaled_stashed_grad
from ...registry import PIXEL_LOSS_REGISTRY, config_node, register
from .base import PixelLoss
from .kernels import PixelBatch, check_finite_loss, pixel_softmax_ce

__all__ = ["PixelOHEMCrossEntropy", "NORMALIZERS", "ohem_threshold"]

NORMALIZERS = ("valid", "all", "kept")
#: the label probability given to ignored pixels when sorting (above every probability)
_ABOVE_ALL = 2.0


def ohem_threshold(prob_y: torch.Tensor, valid: torch.Tensor, num_valid: torch.Tensor, thresh: float,
                   batch_kept: int) -> torch.Tensor:
    """The 0-dim float32 threshold t (module docstring) of the label probabilities ``prob_y`` at the
    ``valid`` pixels (both (N, P); ``num_valid`` their 0-dim count)."""
    probs = torch.where(valid, prob_y, prob_y.new_full((), _ABOVE_ALL)).reshape(-1)
    if gpu_policy(probs.device):
        ranked = probs.sort().values  # the valid ones first
        index = (num_valid - 1).clamp(min=0, max=batch_kept).reshape(1)
        return ranked.gather(0, index).squeeze(0).clamp(min=thresh)
    count = int(num_valid)
    threshold = probs.new_full((), thresh)
    if count == 0:
        return threshold
    index = min(batch_kept, count - 1)
    if int((probs < thresh).sum()) > index:  # the index-th smallest is below thresh: t = thresh
        return threshold
    return torch.maximum(probs.kthvalue(index + 1).values, threshold)


class _OHEMPixelCE(torch.autograd.Function):
    """``loss_weight · Σ_{kept} CE(z_p, y_p) / D`` and its gradient (module docstring); also returns
    the number of kept pixels (0-dim int64, not differentiable)."""

    @staticmethod
    def forward(ctx, logits, batch, thresh, batch_kept, normalizer, loss_weight):
        valid = batch.valid
        out = pixel_softmax_ce(logits, batch, valid.to(torch.float32), label_prob=True)
        with torch.no_grad():
            threshold = ohem_threshold(out["prob_y"], valid, batch.num_valid, thresh, batch_kept)
            kept = valid & (out["prob_y"] < threshold)
            num_kept = kept.sum()
            if normalizer == "valid":
                denominator = batch.num_valid.clamp(min=1).to(torch.float32)
            elif normalizer == "kept":
                denominator = num_kept.clamp(min=1).to(torch.float32)
            else:
                denominator = logits.new_full((), float(max(valid.numel(), 1)))
            weight = kept.to(torch.float32).mul_(loss_weight / denominator)  # (N, P)
        grad = out["grad"]
        grad.view(logits.shape[0], logits.shape[1], -1).mul_(weight[:, None, :])
        ctx.grad = grad
        ctx.mark_non_differentiable(num_kept)
        loss = (out["loss_pixel"].double() * weight).sum()
        return loss.to(logits.dtype), num_kept

    @staticmethod
    def backward(ctx, grad_loss, _grad_kept):
        return scaled_stashed_grad(ctx, grad_loss, "OHEM CE (pixels)"), None, None, None, None, None


@register(PIXEL_LOSS_REGISTRY)
class PixelOHEMCrossEntropy(PixelLoss):
    name = "ohem"
    config_node = "OHEM"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.OHEM")
        # keep the valid pixels whose label probability is below THRESH (mmsegmentation's OHEM configs: 0.7) ...
        _C.THRESH = 0.7
        # ... and at least MIN_KEPT x (images in the batch) of the hardest ones (theirs: 100000 per image)
        _C.MIN_KEPT = 100000
        # divide the kept pixels' CE sum by: "valid" pixels, "all" pixels (mmseg's default), or "kept" pixels
        _C.NORMALIZER = "valid"
        # weight of the loss
        _C.LOSS_WEIGHT = 1.0

    def __init__(self, num_classes, class_stats=None, ignore_value=255, thresh=0.7, min_kept=100000,
                 normalizer="valid", loss_weight=1.0):
        super().__init__(num_classes, class_stats, ignore_value)
        if not 0 < thresh <= 1:
            raise ValueError(f"SEM_SEG.OHEM.THRESH must be in (0, 1], got {thresh}")
        if int(min_kept) != min_kept or min_kept < 1:
            raise ValueError(f"SEM_SEG.OHEM.MIN_KEPT must be an integer >= 1, got {min_kept}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"SEM_SEG.OHEM.NORMALIZER must be one of {', '.join(NORMALIZERS)}; got '{normalizer}'")
        if not loss_weight > 0:
            raise ValueError(f"SEM_SEG.OHEM.LOSS_WEIGHT must be > 0, got {loss_weight}")
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        self.normalizer = normalizer
        self.loss_weight = float(loss_weight)
        #: pixels kept in the last forward (0-dim tensor; read it on logging steps only)
        self.last_num_kept = None

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss, self.last_num_kept = _OHEMPixelCE.apply(logits, batch, self.thresh, self.min_kept * logits.shape[0],
                                                          self.normalizer, self.loss_weight)
        check_finite_loss(loss, self.name)
        return {"loss_sem_seg": loss}

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, thresh={self.thresh}, min_kept={self.min_kept}, "
                f"normalizer='{self.normalizer}', loss_weight={self.loss_weight}")
