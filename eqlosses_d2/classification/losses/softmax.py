"""Softmax cross-entropy, the baseline: ``L = mean_i CE(z_i, y_i)``; scores ``softmax(z)``. No state."""
from torch.nn import functional as F

from ...registry import IMAGE_CLS_LOSS_REGISTRY, register
from .base import ImageClassificationLoss

__all__ = ["ImageSoftmaxCE"]


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageSoftmaxCE(ImageClassificationLoss):
    name = "softmax"

    def forward(self, logits, labels):
        self._check(logits, labels)
        return {"loss_cls": F.cross_entropy(logits.float(), labels.long())}
