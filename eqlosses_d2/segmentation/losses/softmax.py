"""Softmax cross-entropy per pixel, the baseline (Detectron2's ``SemSegFPNHead`` loss):
``L = mean over valid pixels of CE(z_p, y_p)``, Detectron2's ``F.cross_entropy(logits, targets,
ignore_index=255, reduction="mean")``; no state. (A batch without a valid pixel: 0 with a zero
gradient, where Detectron2's CE gives NaN.)

Computed by the fused chunked kernel the other pixel losses use (:func:`.kernels.pixel_softmax_ce`):
the same value and gradient up to float32 rounding (relative differences around 1e-7), holding
one logit-sized buffer (the gradient) instead of ``F.cross_entropy``'s three (its saved log-softmax,
the NLL gradient and the input gradient): ``benchmarks/bench_seg_losses.py``."""
import torch

from ...registry import PIXEL_LOSS_REGISTRY, register
from .base import PixelLoss
from .kernels import AffinePixelCE, PixelBatch, check_finite_loss

__all__ = ["PixelSoftmaxCE"]


@register(PIXEL_LOSS_REGISTRY)
class PixelSoftmaxCE(PixelLoss):
    name = "softmax"

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = AffinePixelCE.apply(logits, batch, batch.per_valid_pixel(), None, None, "softmax CE (pixels)")
        check_finite_loss(loss, self.name)
        return {"loss_sem_seg": loss}
