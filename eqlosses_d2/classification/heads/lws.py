"""
``lws``: learnable weight scaling (LWS) of Kang et al., "Decoupling Representation and Classifier
for Long-Tailed Recognition" (ICLR 2020):

    z_j = f_j · (<w_j, x> + b_j),      f initialised to 1, W and b the frozen stage-1 classifier

as the authors' ``models/TauNormClassifier.py`` (facebookresearch/classifier-balancing, commit
f162adef63fd: ``x = self.fc(x); x *= self.scales`` with ``scales = ones(num_classes)`` and
``fc``'s parameters ``requires_grad = False``): the scale multiplies the bias too (the paper writes
``f_i · w_i`` without a bias). Parameters ``fc.weight``, ``fc.bias`` (loaded from the stage-1
checkpoint, as the ``linear`` head names them) and ``scales`` (the only trained one). ``fc`` is
frozen twice: ``requires_grad`` off and detached in ``forward``, so no ``TRAINABLE_MODULES`` can
train it.

Stage 2 (``configs/*/lws_*.yaml``): the authors' ImageNet-LT ``cls_lws.yaml`` trains 5 epochs,
class-aware sampling, SGD lr 0.2 (batch 512), momentum 0.9, weight decay 5e-4 (on the scales too),
cosine to 0, backbone frozen. No hyper-parameters, no config node of its own.
"""
import torch
from torch import nn

from ...registry import CLASSIFIER_HEAD_REGISTRY, register
from .base import FrozenLinearHead

__all__ = ["LearnableWeightScalingHead"]


@register(CLASSIFIER_HEAD_REGISTRY)
class LearnableWeightScalingHead(FrozenLinearHead):
    name = "lws"

    def __init__(self, in_features, num_classes):
        super().__init__(in_features, num_classes)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, features):
        return self.frozen_logits(features)[0] * self.scales
