"""
Semantic segmentation heads, registered in Detectron2's ``SEM_SEG_HEADS_REGISTRY``
(``MODEL.SEM_SEG_HEAD.NAME``), their per-pixel loss from ``PIXEL_LOSS_REGISTRY``
(``MODEL.EQLOSSES.SEM_SEG.LOSS``) and the training set's class statistics in their buffers.
One file per head.
"""
from .common import LongTailPixelLossMixin
from .fpn import LongTailSemSegFPNHead  # registration: SEM_SEG_HEADS_REGISTRY
from .deeplab import LongTailDeepLabV3PlusHead  # registration: SEM_SEG_HEADS_REGISTRY

__all__ = ["LongTailPixelLossMixin", "LongTailSemSegFPNHead", "LongTailDeepLabV3PlusHead"]
