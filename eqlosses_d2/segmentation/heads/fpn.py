"""
``LongTailSemSegFPNHead``: Detectron2's ``SemSegFPNHead`` (Panoptic FPN's semantic branch: each
FPN level through 3x3 convs and x2 upsamplings to ``COMMON_STRIDE``, summed, a 1x1 predictor)
with its per-pixel loss taken from ``PIXEL_LOSS_REGISTRY`` (``MODEL.EQLOSSES.SEM_SEG.LOSS``)
instead of plain cross-entropy, and the training set's per-class statistics in its buffers.

Subclassed, not copied: the layers, the weight init and the bilinear upsampling of the
logits to the input resolution are Detectron2's. What differs:

- training: ``losses`` upsamples the logits exactly as Detectron2's does (float32, bilinear,
  ``align_corners=False``, by ``COMMON_STRIDE``) and hands them to the registry loss, whose
  ``loss_sem_seg`` is multiplied by ``LOSS_WEIGHT``. Pixels equal to ``IGNORE_VALUE`` (255 in
  Detectron2's semantic datasets, and where ``ImageList`` pads the targets) are ignored;
  a batch without a valid pixel gives 0 (Detectron2's mean CE gives NaN there);
- inference: the upsampled logits go through the loss's ``predict`` (the identity for softmax
  CE; a method with a test-time adjustment, e.g. logit adjustment, applies it there), so the
  per-pixel argmax the evaluator takes is the method's prediction;
- ``class_stats`` (:class:`~eqlosses_d2.segmentation.SemSegClassStatsBuffers`): per-class
  pixel and image counts of the training set, owned by the head so that a checkpoint carries
  them (``sem_seg_head.class_stats.*``); the loss reads them (it holds a reference, not a copy).
  ``train_net.py`` fills them when training starts.
"""
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from .common import LongTailPixelLossMixin

__all__ = ["LongTailSemSegFPNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class LongTailSemSegFPNHead(LongTailPixelLossMixin, SemSegFPNHead):
    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, loss, class_stats, **kwargs):
        """
        Args:
            input_shape, kwargs: as Detectron2's :class:`SemSegFPNHead` (``num_classes``,
                ``conv_dims``, ``common_stride``, ``loss_weight``, ``norm``, ``ignore_value``).
            loss: a :class:`~eqlosses_d2.segmentation.PixelLoss` for ``num_classes`` classes.
            class_stats: the :class:`~eqlosses_d2.segmentation.SemSegClassStatsBuffers` ``loss`` reads.
        """
        super().__init__(input_shape, **kwargs)
        self._init_pixel_loss(loss, class_stats)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret.update(cls.pixel_loss_from_config(cfg, ret["num_classes"], ret["ignore_value"]))
        return ret
