"""
The interface of the classification losses of one-stage (dense) detectors, and their
builders (``MODEL.EQLOSSES.ONE_STAGE.LOSS`` names one of ``DENSE_CLS_LOSS_REGISTRY``).

The RoI-loss interface (:mod:`.base`) normalizes by the number of sampled RoIs and
returns C + 1 probability columns; a dense loss differs in both, so it has its own:

- ``forward(logits, labels, normalizer)``: logits (N, C) of the N valid anchors of all
  images and levels (ignored anchors already dropped), labels in [0, C] with C meaning
  background, and the normalizer the loss sum is divided by (the model computes it with
  :func:`positive_anchor_normalizer`); returns ``{"loss_cls": ...}``;
- ``predict_probs(logits)``: (N, C) per-class probabilities (one-vs-all sigmoid);
- ``scalars()``: numbers worth watching in TensorBoard (a host synchronization: the model
  asks for them on logging steps only);
- adaptive state in registered buffers, all-reduced before it is accumulated.

Pure PyTorch, no Detectron2 import.
"""
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from ..registry import DENSE_CLS_LOSS_REGISTRY, lookup
from .base import ConfiguredMethod, check_finite_logits, gpu_policy, nan_unless_finite_hook, sync_state

__all__ = [
    "DENSE_LOSS_REGISTRY",
    "DenseClassificationLoss",
    "build_dense_loss",
    "build_dense_loss_from_cfg",
    "positive_anchor_normalizer",
    "world_size",
]

#: the registry of the dense losses (Detectron2's ``Registry``, see :mod:`eqlosses_d2.registry`)
DENSE_LOSS_REGISTRY = DENSE_CLS_LOSS_REGISTRY


def build_dense_loss(name: str, num_classes: int, class_stats=None, **hparams):
    """The dense loss registered as ``name``."""
    return lookup(DENSE_CLS_LOSS_REGISTRY, name)(num_classes, class_stats=class_stats, **hparams)


def build_dense_loss_from_cfg(eqlosses_cfg, num_classes: int, class_stats=None):
    """The loss ``MODEL.EQLOSSES.ONE_STAGE.LOSS`` names, with the keys of its node under
    ``MODEL.EQLOSSES`` (its constructor's keyword arguments in upper case)."""
    cls = lookup(DENSE_CLS_LOSS_REGISTRY, eqlosses_cfg.ONE_STAGE.LOSS)
    return cls(num_classes, class_stats=class_stats, **cls.hparams_from_cfg(eqlosses_cfg))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def positive_anchor_normalizer(num_pos_anchors, device=None):
    """
    ``max(1, P) / W`` with P the number of positive anchors summed over the W processes
    (the EFL authors' ``get_ave_normalizer``). Each process divides its loss sum by it;
    DDP's gradient average over processes then makes the step exactly that of one process
    seeing all images, normalized by max(1, P). (Detectron2's RetinaNet and FCOS instead
    divide by a per-process moving average of the positive count, not all-reduced.)
    A collective: every process calls it every iteration. ``num_pos_anchors``: a number
    (returns a float), or a tensor (returns a 0-dim float32 tensor on its device, without a
    host read: what the models pass).
    """
    if torch.is_tensor(num_pos_anchors):
        (count,) = sync_state(num_pos_anchors.to(device=device).reshape(()), dtype=torch.float64)
        return (count.clamp(min=1.0) / world_size()).float()
    (count,) = sync_state(torch.as_tensor(float(num_pos_anchors), dtype=torch.float64, device=device))
    return max(float(count), 1.0) / world_size()


class DenseClassificationLoss(ConfiguredMethod, nn.Module):
    #: the name ``MODEL.EQLOSSES.ONE_STAGE.LOSS`` knows it by
    name = "dense"
    #: its hyper-parameter node under ``MODEL.EQLOSSES``
    config_node = None

    def __init__(self, num_classes: int, class_stats=None):
        super().__init__()
        self.num_classes = num_classes
        # not a submodule: the model owns the statistics (and saves them once)
        object.__setattr__(self, "class_stats", class_stats)
        #: GPU policy: whether the running forward's logits are finite (see ``ClassificationLoss``)
        self._finite = None
        self.register_forward_hook(nan_unless_finite_hook)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, normalizer: float = 1.0):
        raise NotImplementedError

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def scalars(self) -> Dict[str, float]:
        return {}

    def _check(self, logits: torch.Tensor, labels: torch.Tensor, normalizer):
        """Shapes, label range, normalizer and finite logits. Under the GPU policy the checks
        that read device values are left out (no host synchronization): the label range
        (the models' labels come from their anchor matching), a tensor normalizer (the
        models' ``positive_anchor_normalizer``, at least 1 / W) and the finite check, which
        becomes a flag (see :func:`.base.check_finite_logits`)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"loss '{self.name}' expects logits of shape (N, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"loss '{self.name}': {labels.shape[0]} labels for {logits.shape[0]} anchors")
        on_host = not gpu_policy(logits.device)
        if on_host and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"loss '{self.name}': labels must be in [0, {self.num_classes}] (ignored anchors dropped first)"
            )
        if (on_host or not torch.is_tensor(normalizer)) and not normalizer > 0:
            raise ValueError(f"loss '{self.name}': the normalizer must be > 0, got {normalizer}")
        self._finite = check_finite_logits(logits, f"loss '{self.name}'")
