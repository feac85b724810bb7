"""
RoI heads of eqlosses_d2: Detectron2's standard and cascade heads, subclassed. Each

- swaps its box predictor(s) for :class:`LongTailOutputLayers` by overriding the
  classmethod ``_init_box_head`` (the house pattern; no Detectron2 code is copied), so the
  classification loss and inference activation are chosen by ``MODEL.EQLOSSES.LOSS``;
- optionally normalizes its mask predictor (``MODEL.EQLOSSES.MASK_PREDICTOR_SCALE``, by
  overriding ``_init_mask_head``);
- at inference, drops detections scored below ``test_score_floor[class]`` (set by the
  Fixed-AP evaluator: the K-th best score of each class so far) before its mask head, and
  runs the mask head on at most ``mask_inference_chunk`` detections at a time (the same
  masks as one call: without a per-image cap, as under Fixed AP, one call would hold
  C x 28 x 28 float32 mask logits, 3.8 MB at LVIS's 1203 classes, for every detection);
- owns the training set's per-class statistics (:class:`ClassStatsBuffers`,
  ``self.class_stats``), which the losses and the calibration read and a checkpoint carries;
- splits box inference into :meth:`box_outputs` (the network: pooling, box head(s),
  predictor(s)) and :meth:`instances_from_box_outputs` (scores, calibration, boxes,
  NMS), so the calibration sweep runs the network once for many settings. The cascade
  head's inference uses the two directly: the calibration of its averaged stage scores
  happens between the average and Detectron2's ``fast_rcnn_inference``.
"""
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances

from .box_predictor import LongTailOutputLayers
from .class_stats import ClassStatsBuffers
from .mask_predictor import normalize_mask_predictor
from .memory import FeatureMemory

__all__ = ["LongTailStandardROIHeads", "LongTailCascadeROIHeads", "LongTailIterativeROIHeads", "LongTailLOCEROIHeads"]


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
    #: Inference: most detections per mask-head call (<= 0: all in one call). 300, LVIS's
    #: per-image cap, keeps the standard protocol at one call per image and bounds Fixed AP's
    #: mask logits at what the standard protocol holds (300 x C x 28 x 28 float32).
    mask_inference_chunk = 300

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

    def _forward_mask(self, features, instances):
        chunk = self.mask_inference_chunk
        if self.training or not self.mask_on or chunk <= 0 or sum(len(x) for x in instances) <= chunk:
            return super()._forward_mask(features, instances)
        # One image at a time (its slice of the feature maps), in near-equal chunks of at most
        # `chunk` detections. Pooling and the mask head treat each box on its own, so the
        # masks are those of one call up to float rounding: convolution kernels may round
        # differently for another batch size (1 ulp seen on the CPU, as between an image
        # with 1 and with 2 detections in one call); equal chunks avoid a batch of 1.
        out = []
        for index, image_instances in enumerate(instances):
            image_features = {name: value[index : index + 1] for name, value in features.items()}
            num = len(image_instances)
            num_chunks = max(1, -(-num // chunk))
            bounds = [num * k // num_chunks for k in range(num_chunks + 1)]
            pieces = [
                super(_LongTailHeadsMixin, self)._forward_mask(image_features, [image_instances[start:stop]])[0]
                for start, stop in zip(bounds[:-1], bounds[1:])
            ]
            out.append(pieces[0] if len(pieces) == 1 else Instances.cat(pieces))
        return out

    def instances_from_box_outputs(self, head_outputs, image_sizes, calibration=None):
        """
        Detections from :meth:`box_outputs`: each stage's probabilities (with the
        logit-space part of the calibration), averaged over the stages as Detectron2's
        cascade does, the probability-space part of the calibration applied to the
        average, the last stage's boxes, then ``fast_rcnn_inference``. ``calibration``:
        a :class:`ScoreCalibration` (default: the predictor's, from the config).
        """
        last, last_predictions, last_proposals = head_outputs[-1]
        calibration = calibration if calibration is not None else last.calibration
        scores_per_stage = []
        for predictor, predictions, proposals in head_outputs:
            probs = calibration.probs_from_logits(
                predictions[0], predictor.cls_loss, classifier=predictor.cls_score, defer=True
            )
            scores_per_stage.append(probs.split([len(p) for p in proposals], dim=0))
        scores = [
            calibration.finish(sum(list(per_image)) * (1.0 / len(head_outputs)), last.cls_loss)
            for per_image in zip(*scores_per_stage)
        ]
        boxes = last.predict_boxes(last_predictions, last_proposals)
        instances, _ = fast_rcnn_inference(
            boxes, scores, image_sizes, last.test_score_thresh, last.test_nms_thresh, last.test_topk_per_image
        )
        return instances

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

    def box_outputs(self, features, proposals):
        """Inference: ``[(box_predictor, predictions, proposals)]``, as ``_forward_box`` computes them."""
        features = [features[f] for f in self.box_in_features]
        box_features = self.box_head(self.box_pooler(features, [x.proposal_boxes for x in proposals]))
        return [(self.box_predictor, self.box_predictor(box_features), proposals)]


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(_LongTailHeadsMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` (three stages) with the configured loss in every stage.

    Inference averages the stages' ``predict_probs``, which is each method's own
    activation, so the averaged scores are probabilities of the same kind."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for predictor in self.box_predictor:
            predictor.defer_calibration = True  # applied once, to the stages' average

    def box_outputs(self, features, proposals):
        """Inference: ``[(box_predictor[k], predictions, proposals)]`` of the three stages,
        each stage's proposals being the previous stage's boxes (``_forward_box``'s loop)."""
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        head_outputs = []
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(head_outputs[-1][3], image_sizes)
            predictions = self._run_stage(features, proposals, k)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            head_outputs.append((self.box_predictor[k], predictions, proposals, boxes))
        return [h[:3] for h in head_outputs]

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        image_sizes = [x.image_size for x in proposals]
        return self.instances_from_box_outputs(self.box_outputs(features, proposals), image_sizes)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            LongTailOutputLayers(cfg, head.output_shape, box2box_transform=stock.box2box_transform)
            for head, stock in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret


def _mlp(in_features: int, hidden: int, out_features: int, num_layers: int, layer_norm: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (optionally a LayerNorm on the input)."""
    dims = [in_features] + [hidden] * (num_layers - 1) + [out_features]
    layers = [nn.LayerNorm(in_features)] if layer_norm else []
    for k in range(num_layers):
        layers.append(nn.Linear(dims[k], dims[k + 1]))
        if k < num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@ROI_HEADS_REGISTRY.register()
class LongTailIterativeROIHeads(LongTailStandardROIHeads):
    """
    PCB's iterative box head (He et al., CVPR 2022; the authors' ``IterativeRoIHead``):
    the box head and predictor run ``passes`` times on the pooled RoI features; after each
    pass the features are modulated by the predictions,
    ``x ← x · spatial(deltas) + channel(scores)``, ``channel``: an MLP from the
    classifier's outputs to one bias per feature channel, ``spatial``: an MLP from the box
    deltas to one factor per pooled position (hidden width 512, ``MLP_LAYERS`` layers).
    Training: the loss of pass i is weighted by ``LOSS_WEIGHTS[i]`` and the classification
    loss is told ``pass_index``/``num_passes`` (PCB scales its α by them); the box
    regression loss is the one of pass ``REG_PASS`` alone, unweighted (−1: weighted like
    the others). Inference: the last pass's predictions. Keys:
    ``MODEL.EQLOSSES.ITERATIVE_HEAD.*``; the authors' LVIS recipes: 3 passes, weights
    0.2/0.2/0.6, REG_PASS 2, LayerNorm only with EQLv2.
    """

    @configurable
    def __init__(self, *, pooled_shape, passes=3, loss_weights=(0.2, 0.2, 0.6), reg_pass=2, mlp_layers=2,
                 layer_norm=False, **kwargs):
        super().__init__(**kwargs)
        if passes < 1 or len(loss_weights) != passes:
            raise ValueError(
                f"MODEL.EQLOSSES.ITERATIVE_HEAD: LOSS_WEIGHTS needs one weight per pass ({passes}), got {list(loss_weights)}"
            )
        if not -1 <= reg_pass < passes:
            raise ValueError(f"MODEL.EQLOSSES.ITERATIVE_HEAD.REG_PASS must be -1 or a pass index < {passes}, got {reg_pass}")
        self.passes, self.loss_weights, self.reg_pass = passes, tuple(float(w) for w in loss_weights), reg_pass
        channels, height, width = pooled_shape
        predictor = self.box_predictor
        self.channel_refine = _mlp(predictor.cls_score.out_features, 512, channels, mlp_layers, layer_norm)
        self.spatial_refine = _mlp(predictor.bbox_pred.out_features, 512, height * width, mlp_layers, False)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        node = cfg.MODEL.EQLOSSES.ITERATIVE_HEAD
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
        ret.update(pooled_shape=(channels, resolution, resolution), passes=node.PASSES,
                   loss_weights=tuple(node.LOSS_WEIGHTS), reg_pass=node.REG_PASS, mlp_layers=node.MLP_LAYERS,
                   layer_norm=node.LAYER_NORM)
        return ret

    def _pass_predictions(self, features, proposals):
        """The ``passes`` (scores, deltas) predictions, each pass on the modulated features."""
        features = [features[f] for f in self.box_in_features]
        x = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        predictions = []
        for k in range(self.passes):
            scores, deltas = self.box_predictor(self.box_head(x))
            predictions.append((scores, deltas))
            if k < self.passes - 1:  # the last pass's modulation would be unused
                channel = self.channel_refine(scores).view(x.shape[0], -1, 1, 1)
                spatial = self.spatial_refine(deltas).view(x.shape[0], 1, x.shape[2], x.shape[3])
                x = x * spatial + channel
        return predictions

    def box_outputs(self, features, proposals):
        return [(self.box_predictor, self._pass_predictions(features, proposals)[-1], proposals)]

    def _forward_box(self, features, proposals):
        if not self.training:
            image_sizes = [p.image_size for p in proposals]
            return self.instances_from_box_outputs(self.box_outputs(features, proposals), image_sizes)
        losses = {}
        for k, predictions in enumerate(self._pass_predictions(features, proposals)):
            pass_losses = self.box_predictor.losses(predictions, proposals, pass_index=k, num_passes=self.passes)
            for name, value in pass_losses.items():
                if name == "loss_box_reg" and self.reg_pass >= 0:
                    if k == self.reg_pass:
                        losses[name] = value
                    continue
                losses[name] = losses.get(name, 0.0) + value * self.loss_weights[k]
        return losses


_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@ROI_HEADS_REGISTRY.register()
class LongTailLOCEROIHeads(LongTailStandardROIHeads):
    """
    LOCE's RoI head (Feng et al., ICCV 2021): the standard head with memory-augmented
    feature sampling (:mod:`eqlosses_d2.modeling.memory`). In training, every iteration
    enqueues the RoI features of 16 jitters of each ground-truth box, draws
    ``SAMPLED_CLASSES`` classes ∝ 1 / mean score and ``SAMPLED_FEATURES`` features of each
    from the queues, and appends them to the box head's batch with their labels and
    regression targets (one mean-score entry per drawn class, as the authors). Needs
    ``MODEL.EQLOSSES.LOSS "equilibrium"`` (its mean scores). Inference: the standard head.
    Keys: ``MODEL.EQLOSSES.MFS.*``; the pre-fill pass: :func:`eqlosses_d2.modeling.prefill_feature_memory`.
    """

    @configurable
    def __init__(
        self, *, queue_size=80, sampled_classes=8, sampled_features=4, storage_dtype="float16",
        checkpoint_queues=True, **kwargs
    ):
        super().__init__(**kwargs)
        self.checkpoint_queues = bool(checkpoint_queues)
        if not hasattr(self.box_predictor.cls_loss, "mean_score"):
            raise ValueError(
                "MODEL.ROI_HEADS.NAME LongTailLOCEROIHeads needs MODEL.EQLOSSES.LOSS 'equilibrium' "
                f"(its mean scores drive the sampling), not '{self.box_predictor.cls_loss.name}'"
            )
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(
                f"MODEL.EQLOSSES.MFS.STORAGE_DTYPE must be one of {', '.join(_STORAGE_DTYPES)}, got '{storage_dtype}'"
            )
        self.sampled_classes, self.sampled_features = sampled_classes, sampled_features
        self.memory = FeatureMemory(self.num_classes, queue_size, _STORAGE_DTYPES[storage_dtype])
        self._gt_instances = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        node = cfg.MODEL.EQLOSSES.MFS
        ret.update(queue_size=node.QUEUE_SIZE, sampled_classes=node.SAMPLED_CLASSES,
                   sampled_features=node.SAMPLED_FEATURES, storage_dtype=node.STORAGE_DTYPE,
                   checkpoint_queues=node.CHECKPOINT_QUEUES)
        return ret

    def rank_state_dict(self):
        """This process's feature queues, for its per-rank resume state (``{}`` without
        ``MFS.CHECKPOINT_QUEUES``)."""
        return {"memory": self.memory.state_dict()} if self.checkpoint_queues else {}

    def load_rank_state_dict(self, state):
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])

    def forward(self, images, features, proposals, targets=None):
        self._gt_instances = targets if self.training else None  # the boxes MFS enqueues
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._gt_instances = None

    @torch.no_grad()
    def update_memory(self, features, gt_instances):
        """Enqueue the (detached) RoI features of 16 jitters of every ground-truth box (only
        the jitters the queues keep are pooled)."""
        jittered, labels, jittered_boxes, gt_boxes = self.memory.jitters_to_enqueue(gt_instances)
        if labels.numel() == 0:
            return
        pooled = self.box_pooler(features, jittered)
        self.memory.enqueue(pooled, labels, jittered_boxes, gt_boxes)

    def _forward_box(self, features, proposals):
        if not self.training:
            return super()._forward_box(features, proposals)
        features = [features[f] for f in self.box_in_features]
        if self._gt_instances is not None:
            self.update_memory(features, self._gt_instances)
        sampled, labels, sampled_boxes, sampled_gt = self.memory.sample(
            self.box_predictor.cls_loss.mean_score, self.sampled_classes, self.sampled_features
        )
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        extra = []
        if labels.numel():
            device = box_features.device
            box_features = torch.cat([box_features, sampled.to(device=device, dtype=box_features.dtype)])
            memory_rois = Instances(proposals[0].image_size)
            memory_rois.proposal_boxes = Boxes(sampled_boxes.to(device))
            memory_rois.gt_boxes = Boxes(sampled_gt.to(device))
            memory_rois.gt_classes = labels.to(device)
            memory_rois.loce_entry_ids = labels.to(device)  # one mean-score entry per drawn class
            extra = [memory_rois]
        predictions = self.box_predictor(self.box_head(box_features))
        return self.box_predictor.losses(predictions, list(proposals) + extra)
