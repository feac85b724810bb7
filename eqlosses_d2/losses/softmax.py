"""
Softmax cross-entropy: the baseline (Detectron2's default box classifier).

C + 1 logits, the last one background; ``L = CE(z, y)`` averaged over the N sampled
RoIs; inference ``p = softmax(z)``. No state.
"""
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss
from ..registry import ROI_CLS_LOSS_REGISTRY, register

__all__ = ["SoftmaxCrossEntropy"]


@register(ROI_CLS_LOSS_REGISTRY)
class SoftmaxCrossEntropy(ClassificationLoss):
    name = "softmax"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "softmax CE (Detectron2's default)"
    doc_ours = 'quickstart below'
    config_node = None
    extra_logits = 1

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if logits.numel() == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": F.cross_entropy(logits.float(), labels, reduction="mean")}

    softmax_logits = True

    def predict_probs(self, logits):
        return F.softmax(logits.float(), dim=-1)

    def activation_logits(self, logits):
        return logits.float()
