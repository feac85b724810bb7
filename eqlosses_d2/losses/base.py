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
saved in checkpoints and comes back on resume. What a step collected for it is summed
over processes with :func:`sync_state` (one call, one collective per dtype) before it is
accumulated (Detectron2's DDP wrapper uses ``broadcast_buffers=False``, so nothing else
would synchronize them).

Logged scalars: ``scalars()`` reads the numbers worth watching; what a loss must keep from
a step only to log it is kept when ``scalars_wanted`` is true (the box predictor sets it to
whether the step is a logging step; True outside a trainer).

Per-class statistics (image counts, frequency groups) come from the model's
``ClassStatsBuffers``, handed to the loss as ``class_stats`` (any object with the same
tensor attributes works, which keeps the losses testable on their own).

Host synchronizations: under the GPU policy (:data:`DEVICE_POLICY`) a loss's training
step reads no device value on the host (no ``.item()``, ``.tolist()``, ``float()``,
``bool()`` of a tensor; ``tests/test_host_syncs.py`` counts them). What is left are the
waits inside ops whose output size depends on the data (``torch.nonzero``, boolean
indexing, ``torch.unique``, ``torch.bincount``): the methods' row selections, as in
Detectron2's own heads. Explicit reads that remain, each in its method's docstring: PCB's
"has every class been seen" (once past its start, until true), Federated's count of the
classes left to draw from (only when fewer classes have images than it needs), and the
first use of the class statistics (cached until the buffers change). ``scalars()`` reads
values: the models call it on logging steps only. Under the CPU policy a few reads of CPU
tensors remain (the finite check, the backward's unit-gradient shortcut, the chunks'
positives, DropLoss's lazy draw, the dense losses' label range): they wait for no device.
"""
import math
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..registry import ROI_CLS_LOSS_REGISTRY, lookup

__all__ = [
    "DEVICE_POLICY",
    "ClassificationLoss",
    "ConfiguredMethod",
    "all_reduce_sum",
    "sync_state",
    "build_loss",
    "build_loss_from_cfg",
    "required_opts",
    "loss_hparams_from_cfg",
    "gpu_policy",
    "nan_unless",
    "check_finite_logits",
    "empty_loss",
    "tail_class_mask",
    "take_stashed_grad",
    "scaled_stashed_grad",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place when distributed); returns it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_state(*contributions: torch.Tensor, finite: Optional[torch.Tensor] = None, dtype=None):
    """
    What a head collected in a step for the state that must stay the same in every process
    (gradient statistics, counts, mean scores, confusion rows), summed over the processes in
    one call; the one way the losses synchronize their state.

    The contributions (any shapes) are packed into one flat buffer per dtype (``dtype``: cast
    all to it first, e.g. float64 for statistics kept in float64), all-reduced (one collective
    per dtype; a no-op in one process) and returned as new tensors of their shapes, in their
    order. ``finite``: None, or a 0-dim bool tensor (the GPU policy's finite check of the
    logits, :func:`check_finite_logits`): when false this process contributes zeros, without a
    host read. Every process must call it every step with the same shapes (a collective).
    In one process the (detached, cast) contributions themselves are returned, no copy.
    """
    tensors = [c.detach() if dtype is None else c.detach().to(dtype) for c in contributions]
    if not _distributed():  # one process: nothing to pack or reduce (the contributions come back as they are)
        return [keep_unless_nonfinite(finite, t) for t in tensors]
    out: list = [None] * len(tensors)
    by_dtype: Dict[torch.dtype, list] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        packed = torch.cat([tensors[i].reshape(-1) for i in indices])
        packed = all_reduce_sum(keep_unless_nonfinite(finite, packed))
        start = 0
        for i in indices:
            size = tensors[i].numel()
            out[i] = packed[start : start + size].view(tensors[i].shape)
            start += size
    return out


#: How the losses treat a device. "auto": the CPU policy on the CPU (cache-sized chunks, host reads
#: of CPU tensors, which cost no device synchronization), the GPU policy on any other device (large
#: but bounded chunks, no host read of a device value during the training step). "gpu": the GPU
#: policy on every device, so that tests and benchmarks on the CPU see what a GPU run does. Set it
#: here or with the environment variable ``EQLOSSES_DEVICE_POLICY``.
DEVICE_POLICY = os.environ.get("EQLOSSES_DEVICE_POLICY", "auto")
_POLICIES = ("auto", "gpu")


def gpu_policy(device) -> bool:
    """True when tensors on ``device`` are treated with the GPU policy (see :data:`DEVICE_POLICY`)."""
    if DEVICE_POLICY not in _POLICIES:
        raise ValueError(
            f"EQLOSSES_DEVICE_POLICY / losses.base.DEVICE_POLICY must be one of {', '.join(_POLICIES)}, "
            f"got '{DEVICE_POLICY}'"
        )
    return DEVICE_POLICY == "gpu" or torch.device(device).type != "cpu"


def check_finite_logits(logits: torch.Tensor, who: str, total: Optional[torch.Tensor] = None):
    """
    Reject NaN/inf logits before they poison a loss's statistics. ``total``: the sum of all of
    ``logits`` when a fused computation has already taken it (chunk by chunk, from cache),
    instead of a pass of its own over them.

    CPU policy (:func:`gpu_policy` false): raises ``FloatingPointError`` with one clear line
    at once (reading a CPU value costs no device synchronization) and returns None.
    GPU policy: no host synchronization; returns a 0-dim bool tensor, true when the sum is
    finite (logits so large that their float32 sum overflows, |z| ~ 1e30, count as non-finite
    there; the CPU policy tells them apart with a second pass). The loss then keeps its
    state unchanged when it is false and its returned losses are NaN (:func:`nan_unless`),
    so Detectron2's trainer, which checks the losses every iteration, raises
    ``FloatingPointError`` in the same iteration, before the optimizer step.
    """
    if logits.numel() == 0:
        return None
    if total is None:
        total = logits.sum(dtype=torch.float32)
    finite = torch.isfinite(total)
    if gpu_policy(logits.device):
        return finite
    if finite:
        return None  # fast path: one reduction
    bad = (~torch.isfinite(logits)).sum().item()
    if bad:
        raise FloatingPointError(
            f"{who}: {bad} of {logits.numel()} classification logits are NaN or inf "
            f"(diverged training? try a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS)"
        )
    return None


def nan_unless(finite: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``finite`` (a 0-dim bool tensor from :func:`check_finite_logits`) holds,
    else NaN; ``value`` itself when ``finite`` is None (checked already)."""
    if finite is None:
        return value
    return torch.where(finite, value, value.new_full((), math.nan))


def keep_unless_nonfinite(finite: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``finite`` holds, else zeros (a state contribution left out); ``value``
    itself when ``finite`` is None."""
    if finite is None:
        return value
    return torch.where(finite, value, torch.zeros_like(value))


def nan_unless_finite_hook(module, args, output):
    """A forward hook of the losses: under the GPU policy, the returned losses are NaN when the
    logits :meth:`ClassificationLoss._check` saw were not all finite (``module._finite``)."""
    finite, module._finite = getattr(module, "_finite", None), None
    if finite is None:
        return None
    return {key: nan_unless(finite, value) for key, value in output.items()}


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
    multiplication, a full pass over the logit-sized gradient; under the GPU policy reading
    the value would cost a synchronization, so the product is always taken there."""
    grad = take_stashed_grad(ctx, who)
    if not gpu_policy(grad_output.device) and grad_output.numel() == 1 and float(grad_output) == 1.0:
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


def loss_hparams_from_cfg(cls, eqlosses_cfg) -> dict:
    """The constructor kwargs of ``cls`` from its node under ``MODEL.EQLOSSES`` (a dict-like): the
    node's keys in lower case (none without a node)."""
    node = getattr(cls, "config_node", None)
    if not node:
        return {}
    return {key.lower(): value for key, value in eqlosses_cfg[node].items()}


class ConfiguredMethod:
    """What a registered loss declares about its config: its ``name`` (the value that selects
    it), its node under ``MODEL.EQLOSSES`` (``config_node``, whose keys are its constructor's
    keyword arguments in upper case) and that node's keys and defaults (``add_config``)."""

    #: the name its registry knows it by (the config value)
    name = "base"
    #: its hyper-parameter node under ``MODEL.EQLOSSES`` (None: no hyper-parameters)
    config_node = None
    #: its row of the README's method table (:mod:`eqlosses_d2.model_zoo.docs`): the method (a
    #: short name and the paper), what the paper reports, and what we measured
    doc_method = ""
    doc_paper = ""
    doc_ours = ""

    @classmethod
    def add_config(cls, cfg):
        """Add ``MODEL.EQLOSSES.<config_node>`` with every key, its default and a one-line
        comment to ``cfg`` (use :func:`eqlosses_d2.registry.config_node`). Nothing without a node."""

    @classmethod
    def hparams_from_cfg(cls, eqlosses_cfg) -> dict:
        """The constructor's keyword arguments from ``cfg.MODEL.EQLOSSES``."""
        return loss_hparams_from_cfg(cls, eqlosses_cfg)


def required_opts(name: str) -> list:
    """``[KEY, VALUE, ...]``: the command-line opts a training with RoI loss ``name`` needs besides
    ``MODEL.EQLOSSES.LOSS`` (its ``required_config``; [] for most)."""
    cls = lookup(ROI_CLS_LOSS_REGISTRY, name)
    return [str(item) for pair in getattr(cls, "required_config", ()) for item in pair]


def build_loss(name: str, num_classes: int, class_stats=None, **hparams):
    """The RoI classification loss registered as ``name`` (``ROI_CLS_LOSS_REGISTRY``)."""
    return lookup(ROI_CLS_LOSS_REGISTRY, name)(num_classes, class_stats=class_stats, **hparams)


def build_loss_from_cfg(eqlosses_cfg, num_classes: int, class_stats=None):
    """The loss ``MODEL.EQLOSSES.LOSS`` names, with the hyper-parameters of its node (a loss built
    on another, PCB, reads that one's node too: its own ``hparams_from_cfg``)."""
    cls = lookup(ROI_CLS_LOSS_REGISTRY, eqlosses_cfg.LOSS)
    return cls(num_classes, class_stats=class_stats, **cls.hparams_from_cfg(eqlosses_cfg))


class ClassificationLoss(ConfiguredMethod, nn.Module):
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
    #: whether this step's ``scalars()`` will be read: a loss keeps what it needs only for
    #: them when true (the box predictor sets it on every training step: its logging steps)
    scalars_wanted = True
    #: (config key, value) pairs a training with this loss needs besides ``MODEL.EQLOSSES.LOSS``
    #: (CDB-S: its sampler); a config check refuses a config without them
    required_config = ()

    def __init__(self, num_classes: int, class_stats=None):
        super().__init__()
        self.num_classes = num_classes
        # not a submodule of the loss: the model owns it (and saves it once)
        object.__setattr__(self, "class_stats", class_stats)
        #: GPU policy: whether the logits of the running forward are finite (a 0-dim device
        #: tensor from :meth:`_check`; None when checked on the host); state updates leave out
        #: a non-finite batch and the returned losses become NaN (a forward hook)
        self._finite = None
        self.register_forward_hook(nan_unless_finite_hook)

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
        scalars, logged by the box predictor under ``<loss name>/``). Reading them costs a
        host synchronization: the box predictor asks for them on logging steps only."""
        return {}

    def require_class_stats(self):
        """The class statistics, or a one-line error when there are none. Whether they are
        set is read from the device once per state of the ``is_set`` flag (its version
        counter changes when the buffer is written, e.g. by ``load_state_dict``), not every
        iteration."""
        stats = self.class_stats
        is_set = getattr(stats, "is_set", True)
        if torch.is_tensor(is_set):
            cached = getattr(self, "_class_stats_checked", None)
            if cached is not None and cached[0] is is_set and cached[1] == is_set._version:
                return stats
        if stats is None or not bool(is_set):
            raise RuntimeError(
                f"loss '{self.name}' needs per-class statistics (image counts), but the model "
                f"has none: train with a dataset that has an annotation file "
                f"(MODEL.EQLOSSES.CLASS_STATS_DATASET) or load an eqlosses_d2 checkpoint"
            )
        if torch.is_tensor(is_set):
            self._class_stats_checked = (is_set, is_set._version)
        return stats

    def _check(self, logits: torch.Tensor, labels: torch.Tensor, finite: bool = True):
        """Shapes, and (``finite``) no NaN/inf logit (:func:`check_finite_logits`; under the GPU
        policy without a host synchronization: the flag is kept in ``self._finite``); a loss
        whose fused computation sums the logits as it goes passes ``finite=False`` and checks
        that sum instead."""
        if logits.dim() != 2 or logits.shape[1] != self.num_logits:
            raise ValueError(
                f"loss '{self.name}' expects logits of shape (N, {self.num_logits}), got {tuple(logits.shape)}"
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"loss '{self.name}': {labels.shape[0]} labels for {logits.shape[0]} logits")
        if finite:
            self._finite = check_finite_logits(logits, f"loss '{self.name}'")


def empty_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph connected (no RoI in the batch)."""
    return logits.sum() * 0.0


def softmax_with_background_last(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=-1)
