"""
RoI heads of eqlosses_d2: Detectron2's own heads, subclassed, plus the training
set's per-class statistics (:class:`ClassStatsBuffers`) that the long-tail losses
and the post-hoc calibration read, so a checkpoint carries them.
"""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from .class_stats import ClassStatsBuffers

__all__ = ["LongTailStandardROIHeads"]


@ROI_HEADS_REGISTRY.register()
class LongTailStandardROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` with per-class statistics in buffers (``self.class_stats``)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.class_stats = ClassStatsBuffers(self.num_classes)
