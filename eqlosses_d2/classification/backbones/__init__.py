"""
Backbones of the long-tailed image classifier that Detectron2 lacks, registered in Detectron2's
``BACKBONE_REGISTRY`` (``MODEL.BACKBONE.NAME``); one file per backbone.
"""
from .resnet_cifar import CifarResNet, build_cifar_resnet_backbone  # registration: BACKBONE_REGISTRY

__all__ = ["CifarResNet", "build_cifar_resnet_backbone"]
