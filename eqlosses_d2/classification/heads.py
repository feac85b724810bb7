"""
Classifier heads: pooled features (N, D) -> class logits (N, C). Pure PyTorch (no Detectron2
import), so that the RoI box predictor can share them later. Each is registered by its name in
``CLASSIFIER_HEAD_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.HEAD``) and declares its own node.

- ``linear``: ``z = W x + b`` (``nn.Linear``; PyTorch's default initialisation).
- ``cosine``: ``z_j = s · <x/‖x‖, w_j/‖w_j‖>``, no bias, scale ``s``
  (``MODEL.EQLOSSES.CLASSIFICATION.COSINE.SCALE``, default 16, the scale of the decoupling
  authors' cosine classifier; Seesaw's LVIS recipe uses 20). Norms are clamped at 1e-12
  (``F.normalize``), so a zero feature gives zero logits.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..losses.base import ConfiguredMethod
from ..registry import CLASSIFIER_HEAD_REGISTRY, config_node, lookup, register
from .config import add_classification_config

__all__ = ["ClassifierHead", "LinearHead", "CosineHead", "build_head"]


class ClassifierHead(ConfiguredMethod, nn.Module):
    """A head: ``forward(features (N, D)) -> logits (N, C)``; ``config_node`` is under
    ``MODEL.EQLOSSES.CLASSIFICATION``."""

    name = "base"

    @classmethod
    def add_config(cls, cfg):
        add_classification_config(cfg)

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes


@register(CLASSIFIER_HEAD_REGISTRY)
class LinearHead(ClassifierHead):
    name = "linear"

    def __init__(self, in_features, num_classes):
        super().__init__(in_features, num_classes)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features):
        return self.fc(features)


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


def build_head(classification_cfg, in_features: int, num_classes: int) -> ClassifierHead:
    """The head ``MODEL.EQLOSSES.CLASSIFICATION.HEAD`` names, with its node's hyper-parameters."""
    cls = lookup(CLASSIFIER_HEAD_REGISTRY, classification_cfg.HEAD)
    return cls(in_features, num_classes, **cls.hparams_from_cfg(classification_cfg))
