"""
``marc``: margin calibration (MARC) of Wang et al., "Margin Calibration for Long-Tailed Visual
Recognition" (ACML 2022), on a frozen stage-1 linear classifier:

    z'_j = ω_j · z_j + β_j · ‖w_j‖,     z_j = <w_j, x> + b_j,   ω initialised to 1, β to 0

as its authors' ``MARCLinear`` (microsoft/robustlearn, commit 31580cd19572, ``marc/models/MARCClassifier.py``:
``a = ones(1, C)``, ``b = zeros(1, C)``, the logits and ``‖fc.weight‖`` (row norms) computed under
``torch.no_grad()``; we name ``a``, ``b`` ``omega``, ``beta`` after the paper, and the frozen part is
detached, as their ``no_grad``, with ``requires_grad`` off as well). Parameters ``fc.weight``,
``fc.bias`` (loaded from the stage-1 checkpoint, the ``linear`` head's names), ``omega``, ``beta``.
At initialisation the head equals the stage-1 classifier.

Stage 2 (``configs/*/marc_*.yaml``), the authors' ImageNet-LT ``MARC.yaml``: 10 epochs,
instance-balanced sampling (``sampler: null``), the GRW re-weighted cross-entropy with exponent 1.2
(loss ``grw``), SGD lr 0.05 at batch 256, momentum 0.9, weight decay 5e-4 (on ω, β), cosine to 0,
backbone frozen. No hyper-parameters, no config node of its own.
"""
import torch
from torch import nn

from ...registry import CLASSIFIER_HEAD_REGISTRY, register
from .base import FrozenLinearHead

__all__ = ["MarginCalibrationHead"]


@register(CLASSIFIER_HEAD_REGISTRY)
class MarginCalibrationHead(FrozenLinearHead):
    name = "marc"

    def __init__(self, in_features, num_classes):
        super().__init__(in_features, num_classes)
        self.omega = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features):
        logits, weight = self.frozen_logits(features)
        return self.omega * logits + self.beta * weight.norm(dim=1)
