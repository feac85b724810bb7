"""
``cosine``: ``z_j = s · <x/‖x‖, w_j/‖w_j‖>``, no bias, scale ``s``
(``MODEL.EQLOSSES.CLASSIFICATION.COSINE.SCALE``, default 16, the scale of the decoupling
authors' cosine classifier; Seesaw's LVIS recipe uses 20). Norms are clamped at 1e-12
(``F.normalize``), so a zero feature gives zero logits.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ...registry import CLASSIFIER_HEAD_REGISTRY, config_node, register
from .base import ClassifierHead

__all__ = ["CosineHead"]


@register(CLASSIFIER_HEAD_REGISTRY)
class CosineHead(ClassifierHead):
    name = "cosine"
    config_node = "COSINE"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.COSINE")
        # s of s · cos(x, w_j)
        _C.SCALE = 16.0

    def __init__(self, in_features, num_classes, scale=16.0):
        super().__init__(in_features, num_classes)
        if not scale > 0:
            raise ValueError(f"COSINE.SCALE must be > 0, got {scale}")
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, features):
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self):
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}"
