"""
The interface of the classifier heads: pooled features (N, D) -> class logits (N, C). Pure PyTorch
(no Detectron2 import), so that the RoI box predictor can share them. Each head is registered by its
name in ``CLASSIFIER_HEAD_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.HEAD``), one file per head,
and declares its own node ``MODEL.EQLOSSES.CLASSIFICATION.<NODE>`` in ``add_config``.
"""
from torch import nn
from torch.nn import functional as F

from ...losses.base import ConfiguredMethod
from ...registry import CLASSIFIER_HEAD_REGISTRY, lookup
from ..config import add_classification_config
from ..decoupling import add_decoupling_config

__all__ = ["ClassifierHead", "FrozenLinearHead", "build_head"]


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


class FrozenLinearHead(ClassifierHead):
    """A second-stage head on the frozen stage-1 linear classifier (LWS, MARC): ``fc`` has the
    ``linear`` head's parameter names, so a stage-1 checkpoint loads into it, and is frozen
    (``requires_grad`` off, and detached in :meth:`frozen_logits`, so even a ``TRAINABLE_MODULES``
    that names it trains only the subclass's own parameters)."""

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        add_decoupling_config(cfg)

    def __init__(self, in_features, num_classes):
        super().__init__(in_features, num_classes)
        self.fc = nn.Linear(in_features, num_classes)
        self.fc.requires_grad_(False)

    def frozen_logits(self, features):
        """(logits ``W x + b``, ``W``) of the stage-1 classifier, detached."""
        weight = self.fc.weight.detach()
        return F.linear(features, weight, self.fc.bias.detach()), weight


def build_head(classification_cfg, in_features: int, num_classes: int) -> ClassifierHead:
    """The head ``MODEL.EQLOSSES.CLASSIFICATION.HEAD`` names, with its node's hyper-parameters."""
    cls = lookup(CLASSIFIER_HEAD_REGISTRY, classification_cfg.HEAD)
    return cls(in_features, num_classes, **cls.hparams_from_cfg(classification_cfg))
