"""
``linear``: ``z = W x + b`` (``nn.Linear``; PyTorch's default initialisation).
"""
from torch import nn

from ...registry import CLASSIFIER_HEAD_REGISTRY, register
from .base import ClassifierHead

__all__ = ["LinearHead"]


@register(CLASSIFIER_HEAD_REGISTRY)
class LinearHead(ClassifierHead):
    name = "linear"

    def __init__(self, in_features, num_classes):
        super().__init__(in_features, num_classes)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features):
        return self.fc(features)
