"""
The interface of the classifier heads: pooled features (N, D) -> class logits (N, C). Pure PyTorch
(no Detectron2 import), so that the RoI box predictor can share them. Each head is registered by its
name in ``CLASSIFIER_HEAD_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.HEAD``), one file per head,
and declares its own node ``MODEL.EQLOSSES.CLASSIFICATION.<NODE>`` in ``add_config``.
"""
from torch import nn

from ...losses.base import ConfiguredMethod
from ...registry import CLASSIFIER_HEAD_REGISTRY, lookup
from ..config import add_classification_config

__all__ = ["ClassifierHead", "build_head"]


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


def build_head(classification_cfg, in_features: int, num_classes: int) -> ClassifierHead:
    """The head ``MODEL.EQLOSSES.CLASSIFICATION.HEAD`` names, with its node's hyper-parameters."""
    cls = lookup(CLASSIFIER_HEAD_REGISTRY, classification_cfg.HEAD)
    return cls(in_features, num_classes, **cls.hparams_from_cfg(classification_cfg))
