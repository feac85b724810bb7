"""
RoI heads of eqlosses_d2: Detectron2's standard and cascade heads, subclassed. Each

- swaps its box predictor(s) for :class:`LongTailOutputLayers` by overriding the
  classmethod ``_init_box_head`` (the house pattern; no Detectron2 code is copied), so the
  classification loss and inference activation are chosen by ``MODEL.EQLOSSES.LOSS``;
- optionally normalizes its mask predictor (``MODEL.EQLOSSES.MASK_PREDICTOR_SCALE``, by
  overriding ``_init_mask_head``);
- at inference, drops detections scored below ``test_score_floor[class]`` (set by the
  Fixed-AP evaluator: the K-th best score of each class so far) before its mask head;
- owns the training set's per-class statistics (:class:`ClassStatsBuffers`,
  ``self.class_stats``), which the losses and the calibration read and a checkpoint carries.
"""
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads

from .box_predictor import LongTailOutputLayers
from .class_stats import ClassStatsBuffers
from .mask_predictor import normalize_mask_predictor

__all__ = ["LongTailStandardROIHeads", "LongTailCascadeROIHeads"]


def _box_predictors(heads):
    """The standard head's predictor, or the cascade head's (an nn.ModuleList)."""
    predictor = heads.box_predictor
    return list(predictor) if isinstance(predictor, nn.ModuleList) else [predictor]


class _LongTailHeadsMixin:
    """What both heads add: the per-class statistics, linked into the box predictor(s),
    the optional normalized mask predictor and the Fixed-AP score floor."""

    #: (C,) per-class score below which inference drops a detection before the mask
    #: head, or None; set by ``eqlosses_d2.evaluation.LVISEvaluator`` for Fixed AP.
    test_score_floor = None

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.class_stats = ClassStatsBuffers(self.num_classes)
        for predictor in _box_predictors(self):
            predictor.link_class_stats(self.class_stats)

    def forward_with_given_boxes(self, features, instances):
        floor = self.test_score_floor
        if floor is not None and not self.training:
            floor = floor.to(instances[0].scores.device) if instances else floor
            instances = [x[x.scores >= floor[x.pred_classes]] for x in instances]
        return super().forward_with_given_boxes(features, instances)

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        scale = cfg.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE
        if scale > 0 and ret.get("mask_head") is not None:
            normalize_mask_predictor(ret["mask_head"], scale)
        return ret


@ROI_HEADS_REGISTRY.register()
class LongTailStandardROIHeads(_LongTailHeadsMixin, StandardROIHeads):
    """:class:`StandardROIHeads` with the configured loss and per-class statistics."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(_LongTailHeadsMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` (three stages) with the configured loss in every stage.

    Inference averages the stages' ``predict_probs``, which is each method's own
    activation, so the averaged scores are probabilities of the same kind."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            LongTailOutputLayers(cfg, head.output_shape, box2box_transform=stock.box2box_transform)
            for head, stock in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret
