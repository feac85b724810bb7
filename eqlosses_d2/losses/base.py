"""
The interface every classification loss of the RoI box predictor implements.

A loss is a pure-PyTorch ``nn.Module`` (no Detectron2 import). It knows

- how many logits it needs for C foreground classes (:attr:`num_logits`: C + 1 for
  softmax with a background logit, C for plain sigmoid, C + 2 for Seesaw, ...);
- how to turn ``(logits, labels)`` into a dict of named losses (:meth:`forward`); labels
  are in ``[0, C]``, C meaning background, as in Detectron2;
- how to turn logits into per-class probabilities for inference (:meth:`predict_probs`),
  always shaped ``(N, C + 1)`` with the background in the last column, which is what
  Detectron2's ``fast_rcnn_inference`` and the cascade head's score averaging expect;
- what bias its classifier starts from (:meth:`classifier_bias_init`).

Adaptive state (gradient statistics, counts, ...) lives in registered buffers: it is
saved in checkpoints and comes back on resume. Per-iteration contributions are summed
over processes with :func:`all_reduce_sum` before they are accumulated (Detectron2's
DDP wrapper uses ``broadcast_buffers=False``, so nothing else would synchronize them).

Per-class statistics (image counts, frequency groups) come from the model's
``ClassStatsBuffers``, handed to the loss as ``class_stats`` (any object with the same
tensor attributes works, which keeps the losses testable on their own).
"""
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ClassificationLoss",
    "all_reduce_sum",
    "check_finite_logits",
    "empty_loss",
    "tail_class_mask",
    "take_stashed_grad",
    "scaled_stashed_grad",
]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place when distributed); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_finite_logits(logits: torch.Tensor, who: str, total: Optional[torch.Tensor] = None):
    """Reject NaN/inf logits with one clear line, before they poison the statistics.
    ``total``: the sum of all of ``logits`` when a fused computation has already taken it
    (chunk by chunk, from cache), instead of a pass of its own over them."""
    if logits.numel() == 0:
        return
    if total is None:
        total = logits.sum(dtype=torch.float32)
    if torch.isfinite(total):
        return  # fast path: one reduction (a float32 sum of finite values may still overflow)
    bad = (~torch.isfinite(logits)).sum().item()
    if bad:
        raise FloatingPointError(
            f"{who}: {bad} of {logits.numel()} classification logits are NaN or inf "
            f"(diverged training? try a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS)"
        )


def take_stashed_grad(ctx, who: str) -> torch.Tensor:
    """For autograd Functions that compute their gradient in ``forward`` and stash it on
    ``ctx.grad`` (no copy): hand it over once, and refuse a second backward clearly."""
    grad = getattr(ctx, "grad", None)
    if grad is None:
        raise RuntimeError(f"{who}: backward through the same graph twice is not supported")
    del ctx.grad
    return grad


def scaled_stashed_grad(ctx, grad_output: torch.Tensor, who: str) -> torch.Tensor:
    """:func:`take_stashed_grad` times ``grad_output``, in place. On the CPU an output
    gradient of exactly 1 (a loss summed with weight 1, the usual case) skips the
    multiplication, a full pass over the logit-sized gradient; on other devices reading
    the value would cost a synchronization, so the product is always taken there."""
    grad = take_stashed_grad(ctx, who)
    if grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0:
        return grad
    return grad.mul_(grad_output)


def tail_class_mask(class_stats, lam: float) -> torch.Tensor:
    """
    (C,) bool: classes whose training-image frequency ``image_count / images with at least
    one annotation`` is below ``lam`` (EQL's and DropLoss's T_λ). On LVIS v1 λ = 0.0011
    selects 815 classes (all 337 rare, all 461 common and 17 frequent).
    """
    frequency = class_stats.image_count.double() / class_stats.num_images_with_annotations.clamp(min=1).double()
    return frequency < lam


class ClassificationLoss(nn.Module):
    #: logits beyond the C class logits
    extra_logits = 1
    #: the name the loss registry knows it by
    name = "base"
    #: "softmax" or "sigmoid": the plain loss this one is measured against (benchmarks), and
    #: the kind of probabilities ``predict_probs`` gives (competing, or one-vs-all), which
    #: post-hoc calibration follows
    family = "softmax"
    #: True when ``predict_probs`` is a plain softmax of ``activation_logits`` (C + 1 columns,
    #: background last): what logit-space calibration (IIF, NorCal on logits) needs
    softmax_logits = False

    def __init__(self, num_classes: int, class_stats=None):
        super().__init__()
        self.num_classes = num_classes
        # not a submodule of the loss: the model owns it (and saves it once)
        object.__setattr__(self, "class_stats", class_stats)

    @property
    def num_logits(self) -> int:
        return self.num_classes + self.extra_logits

    def classifier_bias_init(self) -> Optional[torch.Tensor]:
        """Initial bias of the classifier's ``num_logits`` outputs (None: zeros)."""
        return None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, **context) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def activation_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """For ``softmax_logits`` losses: the (N, C + 1) float32 logits whose softmax is
        ``predict_probs`` (the raw logits, or IIF's weighted ones)."""
        raise NotImplementedError(f"loss '{self.name}' has no plain-softmax activation")

    def scalars(self) -> Dict[str, float]:
        """Numbers worth watching in TensorBoard after a training step (EventStorage
        scalars, logged by the box predictor under ``<loss name>/``)."""
        return {}

    def require_class_stats(self):
        stats = self.class_stats
        if stats is None or not bool(getattr(stats, "is_set", True)):
            raise RuntimeError(
                f"loss '{self.name}' needs per-class statistics (image counts), but the model "
                f"has none: train with a dataset that has an annotation file "
                f"(MODEL.EQLOSSES.CLASS_STATS_DATASET) or load an eqlosses_d2 checkpoint"
            )
        return stats

    def _check(self, logits: torch.Tensor, labels: torch.Tensor, finite: bool = True):
        """Shapes, and (``finite``) no NaN/inf logit; a loss whose fused computation sums the
        logits as it goes passes ``finite=False`` and checks that sum instead."""
        if logits.dim() != 2 or logits.shape[1] != self.num_logits:
            raise ValueError(
                f"loss '{self.name}' expects logits of shape (N, {self.num_logits}), got {tuple(logits.shape)}"
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"loss '{self.name}': {labels.shape[0]} labels for {logits.shape[0]} logits")
        if finite:
            check_finite_logits(logits, f"loss '{self.name}'")


def empty_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph connected (no RoI in the batch)."""
    return logits.sum() * 0.0


def softmax_with_background_last(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=-1)
