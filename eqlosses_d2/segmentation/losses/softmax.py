"""Softmax cross-entropy per pixel, the baseline (Detectron2's ``SemSegFPNHead`` loss):
``L = mean over valid pixels of CE(z_p, y_p)``; no state. (A batch without a valid pixel: 0.)"""
from torch.nn import functional as F

from ...registry import PIXEL_LOSS_REGISTRY, register
from .base import PixelLoss

__all__ = ["PixelSoftmaxCE"]


@register(PIXEL_LOSS_REGISTRY)
class PixelSoftmaxCE(PixelLoss):
    name = "softmax"

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float()
        loss = F.cross_entropy(logits, targets.long(), ignore_index=self.ignore_value, reduction="sum")
        valid = (targets != self.ignore_value).sum()
        return {"loss_sem_seg": loss / valid.clamp(min=1)}
