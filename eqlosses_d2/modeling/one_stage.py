"""
One-stage detectors with the focal loss or EFL: Detectron2's RetinaNet and FCOS,
subclassed (registered in ``META_ARCH_REGISTRY`` as ``LongTailRetinaNet`` and
``LongTailFCOS``). What differs from Detectron2's own:

- ``losses``: the classification loss is the configured dense loss
  (``MODEL.EQLOSSES.ONE_STAGE.LOSS``: "focal" or "efl", :mod:`eqlosses_d2.losses.dense`)
  over all valid anchors of all levels; every loss is divided by the EFL authors'
  normalizer ``max(1, P) / W``, P the positive anchors of all W processes
  (:func:`positive_anchor_normalizer`), where Detectron2 divides by a per-process moving
  average of the positive count (not all-reduced, not checkpointed). The box (and FCOS's
  centerness) losses are Detectron2's.
- ``label_anchors``: optionally ATSS (``MODEL.EQLOSSES.ONE_STAGE.ASSIGNER`` "atss",
  :mod:`.atss`), else the detector's own.
- ``inference_single_image``: per level, each class's top k anchors above the score
  threshold (``TEST_TOPK_PER_CLASS``; Detectron2 keeps the top 1000 (anchor, class) pairs
  over all classes, which on LVIS leaves rare classes few candidates), per-class NMS, then
  ``TEST.DETECTIONS_PER_IMAGE`` per image (LVIS: 300; none under the Fixed-AP protocol), as
  the two-stage heads.
- per-class statistics (:class:`ClassStatsBuffers`, ``self.class_stats``) in buffers, read
  by the loss (EFL's per-group scalars) and carried by checkpoints; the loss's
  ``scalars()`` go to the EventStorage as ``<loss name>/<key>`` (``efl/gamma_r``, ...), with
  ``num_pos_anchors``, on logging steps only (:func:`.box_predictor.is_logging_step`: the
  reads cost host synchronizations); the normalizer stays on the device.

FCOS has neither a registry entry nor a ``from_config`` in Detectron2 (v0.6 or main):
``LongTailFCOS.from_config`` builds it from ``MODEL.RETINANET`` (classes, features, head
convolutions, norm, prior, test thresholds) and ``MODEL.EQLOSSES.ONE_STAGE``. The version
differences (FCOS's matching API, v0.6's GN probe in the head) are in
:mod:`eqlosses_d2.compat`.
"""
import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from .. import compat
from ..losses.dense import build_dense_loss_from_cfg, positive_anchor_normalizer
from .atss import atss_label_anchors
from .box_predictor import is_logging_step, put_loss_scalars
from .class_stats import ClassStatsBuffers

__all__ = ["LongTailFCOS", "LongTailRetinaNet"]


def _one_stage_kwargs(cfg, num_classes):
    node = cfg.MODEL.EQLOSSES.ONE_STAGE
    cls_loss = build_dense_loss_from_cfg(cfg.MODEL.EQLOSSES, num_classes)
    ret = {
        "cls_loss": cls_loss,
        "assigner": node.ASSIGNER,
        "atss_topk": node.ATSS_TOPK,
        "test_topk_per_class": node.TEST_TOPK_PER_CLASS,
        # the upstream attributes, for whoever reads them; our losses use cls_loss's own
        "focal_loss_alpha": cls_loss.alpha,
        "focal_loss_gamma": cls_loss.gamma,
        "max_iter": cfg.SOLVER.MAX_ITER,
    }
    if cfg.TEST.EQLOSSES.PROTOCOL == "fixed":
        ret["max_detections_per_image"] = -1  # Fixed AP: no per-image cap
    return ret


class _OneStageMixin:
    """What both detectors add to Detectron2's: the configured loss, normalizer, assigner,
    per-class inference and class statistics."""

    #: ATSS computes IoUs on the anchors enlarged by this factor about their centers
    atss_anchor_scale = 1.0

    def _setup_one_stage(self, cls_loss, assigner, atss_topk, test_topk_per_class, max_iter=0):
        if assigner not in ("default", "atss"):
            raise ValueError(f"unknown anchor assigner '{assigner}' (default, atss)")
        self.cls_loss = cls_loss
        self.max_iter = int(max_iter)  # SOLVER.MAX_ITER: the last iteration is a logging step
        self.assigner = assigner
        self.atss_topk = int(atss_topk)
        self.test_topk_per_class = int(test_topk_per_class)
        self.class_stats = ClassStatsBuffers(self.num_classes)
        object.__setattr__(cls_loss, "class_stats", self.class_stats)

    # ------------------------------------------------------------------ training
    def label_anchors(self, anchors, gt_instances):
        if self.assigner == "atss":
            return atss_label_anchors(anchors, gt_instances, self.num_classes, self.atss_topk, self.atss_anchor_scale)
        gt_labels, matched_boxes = super().label_anchors(anchors, gt_instances)
        return gt_labels, compat.matched_boxes_as_tensors(matched_boxes)

    def _classification_loss(self, pred_logits, gt_labels):
        """(labels (N, R), positive mask, normalizer, loss_cls) over the valid anchors."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)
        valid = gt_labels >= 0
        pos_mask = valid & (gt_labels != self.num_classes)
        num_pos = pos_mask.sum()
        normalizer = positive_anchor_normalizer(num_pos, device=gt_labels.device)  # a tensor: no host read
        logits = cat(pred_logits, dim=1)
        loss_cls = self.cls_loss(logits[valid], gt_labels[valid], normalizer=normalizer)["loss_cls"]
        if is_logging_step(self.max_iter):  # host reads: on logging steps only
            storage = get_event_storage()
            storage.put_scalar("num_pos_anchors", num_pos.item() / max(num_images, 1), smoothing_hint=False)
            put_loss_scalars(storage, self.cls_loss)
        return pos_mask, normalizer, loss_cls

    # ------------------------------------------------------------------ inference
    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        """Per level, each class's top ``test_topk_per_class`` anchors above the score
        threshold (or Detectron2's top candidates over all classes when it is 0), per-class
        NMS, then the best ``max_detections_per_image`` (all when < 0)."""
        if self.test_topk_per_class > 0:
            pred = Instances.cat(
                [
                    self._decode_per_class_topk(anchors_i, scores_i, deltas_i, image_size)
                    for anchors_i, scores_i, deltas_i in zip(anchors, box_cls, box_delta)
                ]
            )
        else:
            pred = self._decode_multi_level_predictions(
                anchors, box_cls, box_delta, self.test_score_thresh, self.test_topk_candidates, image_size
            )
        keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh)
        if self.max_detections_per_image >= 0:
            keep = keep[: self.max_detections_per_image]
        return pred[keep]

    def _decode_per_class_topk(self, anchors: Boxes, scores: torch.Tensor, deltas: torch.Tensor, image_size):
        """One level: (A, C) scores -> the top k anchors of each class with score > threshold."""
        k = min(self.test_topk_per_class, scores.shape[0])
        top_scores, top_anchors = scores.topk(k, dim=0)  # (k, C)
        keep = top_scores > self.test_score_thresh
        classes = torch.arange(scores.shape[1], device=scores.device).expand_as(top_anchors)[keep]
        anchor_idxs = top_anchors[keep]
        boxes = self.box2box_transform.apply_deltas(deltas[anchor_idxs], anchors.tensor[anchor_idxs])
        return Instances(image_size, pred_boxes=Boxes(boxes), scores=top_scores[keep], pred_classes=classes)


@META_ARCH_REGISTRY.register()
class LongTailRetinaNet(_OneStageMixin, RetinaNet):
    """Detectron2's :class:`RetinaNet` with the focal loss or EFL, optional ATSS, per-class
    top-k inference and per-class statistics."""

    @configurable
    def __init__(self, *, cls_loss, assigner="default", atss_topk=9, test_topk_per_class=100, max_iter=0, **kwargs):
        super().__init__(**kwargs)
        self._setup_one_stage(cls_loss, assigner, atss_topk, test_topk_per_class, max_iter)

    @classmethod
    def from_config(cls, cfg):
        norm = compat.dense_head_norm(cfg.MODEL.RETINANET.NORM)
        rebuild_head = norm is not cfg.MODEL.RETINANET.NORM  # this Detectron2 cannot build it from cfg
        if rebuild_head:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.RETINANET.NORM = ""
        ret = super().from_config(cfg)
        if rebuild_head:
            shapes = ret["backbone"].output_shape()
            head_args = RetinaNetHead.from_config(cfg, [shapes[f] for f in ret["head_in_features"]])
            ret["head"] = RetinaNetHead(**{**head_args, "norm": norm})
        ret.update(_one_stage_kwargs(cfg, ret["num_classes"]))
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        pos_mask, normalizer, loss_cls = self._classification_loss(pred_logits, gt_labels)
        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            compat.matched_boxes_as_tensors(gt_boxes),
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}


@META_ARCH_REGISTRY.register()
class LongTailFCOS(_OneStageMixin, FCOS):
    """Detectron2's :class:`FCOS` (GIoU box loss, centerness branch) with the focal loss or
    EFL, optional ATSS (on 8-stride squares, as the ATSS paper's FCOS), per-class top-k
    inference and per-class statistics."""

    atss_anchor_scale = 8.0

    @configurable
    def __init__(self, *, cls_loss, assigner="default", atss_topk=9, test_topk_per_class=100, max_iter=0, **kwargs):
        super().__init__(**kwargs)
        self._setup_one_stage(cls_loss, assigner, atss_topk, test_topk_per_class, max_iter)

    @classmethod
    def from_config(cls, cfg):
        retina = cfg.MODEL.RETINANET
        backbone = build_backbone(cfg)
        shapes = [backbone.output_shape()[f] for f in retina.IN_FEATURES]
        head = FCOSHead(
            input_shape=shapes,
            conv_dims=[shapes[0].channels] * retina.NUM_CONVS,
            num_classes=retina.NUM_CLASSES,
            norm=compat.dense_head_norm(retina.NORM),
            prior_prob=retina.PRIOR_PROB,
        )
        ret = {
            "backbone": backbone,
            "head": head,
            "head_in_features": retina.IN_FEATURES,
            "num_classes": retina.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.EQLOSSES.ONE_STAGE.FCOS_CENTER_SAMPLING_RADIUS,
            "test_score_thresh": retina.SCORE_THRESH_TEST,
            "test_topk_candidates": retina.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": retina.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
        ret.update(_one_stage_kwargs(cfg, retina.NUM_CLASSES))
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        pos_mask, normalizer, loss_cls = self._classification_loss(pred_logits, gt_labels)
        gt_boxes = compat.matched_boxes_as_tensors(gt_boxes)
        loss_box_reg = _dense_box_regression_loss(
            anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, pos_mask, box_reg_loss_type="giou"
        )
        centerness_targets = compat.fcos_centerness_targets(self, anchors, gt_boxes)  # (N, R)
        pred_centerness = torch.cat(pred_centerness, dim=1).squeeze(dim=2)
        loss_centerness = F.binary_cross_entropy_with_logits(
            pred_centerness[pos_mask], centerness_targets[pos_mask], reduction="sum"
        )
        return {
            "loss_fcos_cls": loss_cls,
            "loss_fcos_loc": loss_box_reg / normalizer,
            "loss_fcos_ctr": loss_centerness / normalizer,
        }
