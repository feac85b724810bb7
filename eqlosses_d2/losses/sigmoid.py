"""
Sigmoid binary cross-entropy over the C foreground classes.

C logits (no background logit: a background RoI has an all-zero target);
``L = Σ_ij BCE(z_ij, y_ij) / N``. The classifier bias starts from a prior π,
``b = -log((1 - π) / π)`` (EQL uses π = 0.001). Inference ``p_j = σ(z_j)``; the
background column returned for Detectron2 is ``1 - max_j p_j`` (unused by its
inference, which reads the foreground columns). Default π = 0.001, EQL's sigmoid baseline.
"""
import math

import torch
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["SigmoidCrossEntropy", "one_hot_foreground", "prior_bias", "with_background_column"]


def one_hot_foreground(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) float targets; background (label C) rows are all zero."""
    target = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    target[torch.arange(labels.shape[0], device=labels.device), labels] = 1.0
    return target[:, :num_classes]


def prior_bias(num_logits: int, prior_prob: float) -> torch.Tensor:
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"PRIOR_PROB must be in (0, 1), got {prior_prob}")
    return torch.full((num_logits,), -math.log((1.0 - prior_prob) / prior_prob))


def with_background_column(fg_probs: torch.Tensor) -> torch.Tensor:
    """Append the (N, 1) background column Detectron2's inference expects."""
    background = 1.0 - fg_probs.amax(dim=1, keepdim=True) if fg_probs.shape[1] else fg_probs.new_ones(
        fg_probs.shape[0], 1
    )
    return torch.cat([fg_probs, background], dim=1)


@register(ROI_CLS_LOSS_REGISTRY)
class SigmoidCrossEntropy(ClassificationLoss):
    name = "sigmoid"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'sigmoid BCE, bias prior 0.001'
    family = "sigmoid"
    config_node = "SIGMOID"
    extra_logits = 0

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.SIGMOID")
        # Prior probability pi of the classifier bias init, b = -log((1 - pi) / pi).
        _C.PRIOR_PROB = 0.001

    def __init__(self, num_classes, class_stats=None, prior_prob=0.001):
        super().__init__(num_classes, class_stats)
        self.prior_prob = prior_prob

    def classifier_bias_init(self):
        return prior_bias(self.num_logits, self.prior_prob)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if logits.numel() == 0:
            return {"loss_cls": empty_loss(logits)}
        target = one_hot_foreground(labels, self.num_classes)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
        return {"loss_cls": loss / logits.shape[0]}

    def predict_probs(self, logits):
        return with_background_column(torch.sigmoid(logits.float()))
