"""
The interface of the per-pixel losses of the semantic segmentation heads: pure PyTorch
``nn.Module``s (no Detectron2 import), one logit per class, registered by name in
``PIXEL_LOSS_REGISTRY`` (``MODEL.EQLOSSES.SEM_SEG.LOSS``), each declaring its node
``MODEL.EQLOSSES.SEM_SEG.<NODE>`` in ``add_config``.

- ``forward(logits (N, C, H, W), targets (N, H, W) int64, pixels equal to ``ignore_value``
  ignored) -> {"loss_sem_seg": 0-dim}``: the mean over the valid pixels (Detectron2's
  ``F.cross_entropy(..., ignore_index=255, reduction="mean")``), unless the method says
  otherwise; a batch without a valid pixel gives 0 with a zero gradient (Detectron2's CE gives
  NaN there);
- ``predict(logits (N, C, H, W)) -> (N, C, H, W)`` the scores whose per-pixel argmax is the
  prediction (default: the logits themselves, as Detectron2's heads return them);
- adaptive state in buffers (saved in checkpoints, summed over processes with
  :func:`eqlosses_d2.losses.base.sync_state`, updated in training mode only);
- per-class statistics from the model's ``SemSegClassStatsBuffers`` (``class_stats``:
  ``pixel_count``, ``image_count``).
"""
import torch
from torch import nn

from ...losses.base import ConfiguredMethod
from ...registry import PIXEL_LOSS_REGISTRY, lookup
from ..config import add_sem_seg_config

__all__ = ["PixelLoss", "build_pixel_loss"]


class PixelLoss(ConfiguredMethod, nn.Module):
    name = "base"

    @classmethod
    def add_config(cls, cfg):
        add_sem_seg_config(cfg)

    def __init__(self, num_classes: int, class_stats=None, ignore_value: int = 255):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_value = int(ignore_value)
        # not a submodule: the head owns the statistics (and saves them once)
        object.__setattr__(self, "class_stats", class_stats)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _check(self, logits, targets):
        """Shapes: logits (N, C, H, W) with C = num_classes, targets (N, H, W)."""
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"pixel loss '{self.name}' expects logits of shape (N, {self.num_classes}, H, W), "
                             f"got {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"pixel loss '{self.name}': targets of shape {tuple(targets.shape)} for logits of "
                             f"shape {tuple(logits.shape)}")


def build_pixel_loss(sem_seg_cfg, num_classes: int, class_stats=None, ignore_value: int = 255) -> PixelLoss:
    """The loss ``MODEL.EQLOSSES.SEM_SEG.LOSS`` names, with its node's hyper-parameters."""
    cls = lookup(PIXEL_LOSS_REGISTRY, sem_seg_cfg.LOSS)
    return cls(num_classes, class_stats=class_stats, ignore_value=ignore_value, **cls.hparams_from_cfg(sem_seg_cfg))
