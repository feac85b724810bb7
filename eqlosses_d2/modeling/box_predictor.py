"""
The box predictor: the one place where Detectron2 and the losses meet.

:class:`LongTailOutputLayers` is Detectron2's ``FastRCNNOutputLayers`` with

- a classifier sized for the configured loss (``MODEL.EQLOSSES.LOSS``: C + 1 logits for
  softmax, C for sigmoid-family losses, C + 2 for Seesaw, ...), optionally a cosine
  classifier (``MODEL.EQLOSSES.COSINE_SCALE`` > 0: ``s · x/‖x‖ · W/‖W‖``, as Seesaw's
  and GOL's LVIS recipes use), its bias initialised as the loss asks; decoupling's stage 2
  (``MODEL.EQLOSSES.DECOUPLING``, :mod:`.decoupling`): LWS scales on the frozen classifier, or
  cRT's classifier left out of a stage-1 checkpoint; or TDE's causal-norm classifier
  (``DECOUPLING.CLASSIFIER tde``, :mod:`.tde`), its foreground direction updated in ``losses``; or
  vMF-OP's classifier (``DECOUPLING.CLASSIFIER vmf``, :mod:`.vmf`), its ``loss_icd`` added in ``losses``;
- the classification loss computed by the loss module, the box regression loss by
  Detectron2's own ``box_reg_loss``;
- ``predict_probs`` from the loss's own activation, so inference (and the cascade head's
  averaged stage scores) sees each method's probabilities, then the post-hoc calibration
  of ``TEST.EQLOSSES.CALIBRATION`` (:class:`eqlosses_d2.calibration.ScoreCalibration`).

The per-class statistics the losses read are the RoI head's ``ClassStatsBuffers``,
linked in by the head (not a submodule here, so a checkpoint stores them once).

Logging: reading a number for the EventStorage costs a host synchronization, so the
predictor logs on the iterations after which Detectron2's writers write (:func:`is_logging_step`:
every :data:`LOG_PERIOD` = 20 iterations, the period of ``DefaultTrainer``'s
``PeriodicWriter``, and the last one) and computes nothing for logging on the others:
Detectron2's ``fast_rcnn/cls_accuracy``, ``fast_rcnn/fg_cls_accuracy`` and
``fast_rcnn/false_negative`` (from the argmax of the loss's own probabilities, background
last), ``fast_rcnn/fg_fraction`` and the loss's ``scalars()`` under ``<loss name>/``, all
in one host read. They are put without Detectron2's smoothing hint: the value logged is the
one of that iteration (a median over the writer's 20-iteration window would mix in the
values of earlier logging steps).
"""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.utils.events import get_event_storage

from ..calibration import ScoreCalibration, calibration_from_cfg
from ..losses import build_loss_from_cfg
from ..losses.base import ClassificationLoss
from ..losses.equilibrium import instance_mean_scores
from .decoupling import RETRAINED_CLASSIFIER_BUFFER, retrained_classifier_marker, skip_stage1_classifier
from .lws import LearnableWeightScaling
from .tde import CausalNormClassifier, tde_classifier_from_cfg
from .vmf import VMFHead, vmf_classifier_from_cfg

__all__ = [
    "LOG_PERIOD",
    "LongTailOutputLayers",
    "CosineClassifier",
    "is_logging_step",
    "matched_instance_ids",
    "put_loss_scalars",
]

#: the iterations after which Detectron2's ``DefaultTrainer`` writes its metrics (its
#: ``PeriodicWriter(period=20)``); a trainer with another period sets this to match
LOG_PERIOD = 20


def is_logging_step(max_iter: int = 0, period: int = None) -> bool:
    """
    Whether the metrics put in the EventStorage at this iteration reach the writers:
    ``(iter + 1) % period == 0`` or the last iteration (``iter == max_iter − 1``, when
    ``max_iter`` > 0), as Detectron2's ``PeriodicWriter`` decides. False outside a trainer
    (no EventStorage).
    """
    try:
        storage = get_event_storage()
    except (AssertionError, IndexError):
        return False
    period = LOG_PERIOD if period is None else period
    return (storage.iter + 1) % period == 0 or (max_iter > 0 and storage.iter >= max_iter - 1)


def put_loss_scalars(storage, loss, prefix: str = ""):
    """A loss's ``scalars()`` into the EventStorage under ``<prefix><loss name>/``, unsmoothed
    (the value of this iteration): the one way the heads log a loss's scalars, on logging
    steps only (:func:`is_logging_step`)."""
    for key, value in loss.scalars().items():
        storage.put_scalar(f"{prefix}{loss.name}/{key}", value, smoothing_hint=False)


def matched_instance_ids(proposals, num_classes: int) -> torch.Tensor:
    """
    (R,) for the sampled RoIs of all images: an id per ground-truth instance a positive RoI
    is matched to (RoIs of one image with the same matched box and class share it), −1
    for background RoIs. Detectron2's sampled proposals carry the matched ``gt_boxes`` and
    ``gt_classes``, not the instance index; two instances of one class with identical boxes
    would share an id. The ids are not consecutive across images (each image's start after
    the previous image's largest possible id), which the callers' grouping does not need;
    no host read.
    """
    ids, offset = [], 0
    for p in proposals:
        if p.has("loce_entry_ids"):  # LOCE's memory samples: their own grouping
            entry = p.loce_entry_ids
            _, inverse = torch.unique(entry, return_inverse=True)
            ids.append(inverse + offset)
            offset += entry.numel()
            continue
        classes = p.gt_classes
        instance = torch.full_like(classes, -1)
        if p.has("gt_boxes"):
            positive = (classes >= 0) & (classes < num_classes)
            keys = torch.cat([p.gt_boxes.tensor[positive], classes[positive, None].to(p.gt_boxes.tensor)], dim=1)
            _, inverse = torch.unique(keys, dim=0, return_inverse=True)
            instance[positive] = inverse + offset
        offset += classes.numel()
        ids.append(instance)
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


class CosineClassifier(nn.Module):
    """``scale · <x/‖x‖, w_j/‖w_j‖>`` (+ bias, zero unless the loss asks otherwise)."""

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x):
        x = F.normalize(x, dim=1, eps=1e-6)
        w = F.normalize(self.weight, dim=1, eps=1e-6)
        return self.scale * F.linear(x, w) + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class LongTailOutputLayers(FastRCNNOutputLayers):
    @configurable
    def __init__(self, input_shape, *, cls_loss, cosine_scale: float = 0.0, calibration=None, max_iter: int = 0,
                 classifier: str = "default", retrain_classifier: bool = False, tde_classifier=None, vmf_classifier=None,
                 **kwargs):
        super().__init__(input_shape, **kwargs)
        self.cls_loss = cls_loss
        #: SOLVER.MAX_ITER: the training progress handed to the loss is iteration / max_iter
        self.max_iter = max_iter
        self.calibration = calibration or ScoreCalibration()
        self.calibration.check_head(cls_loss, cosine_scale > 0)
        #: set by the cascade head: leave a probability-space calibration to the average
        self.defer_calibration = False
        in_features = self.cls_score.in_features
        if cosine_scale > 0:
            self.cls_score = CosineClassifier(in_features, cls_loss.num_logits, cosine_scale)
        elif self.cls_score.out_features != cls_loss.num_logits:
            self.cls_score = nn.Linear(in_features, cls_loss.num_logits)
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.constant_(self.cls_score.bias, 0.0)
        bias = cls_loss.classifier_bias_init()
        if bias is not None:
            with torch.no_grad():
                self.cls_score.bias.copy_(bias)
        # decoupling (eqlosses_d2/modeling/decoupling.py): LWS scales, cRT's stage-1 classifier left unloaded
        if classifier == "lws":
            if cosine_scale > 0:
                raise ValueError("MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'lws' needs a linear classifier (COSINE_SCALE 0)")
            self.cls_score = LearnableWeightScaling.from_linear(self.cls_score)
        elif classifier == "tde":  # eqlosses_d2/modeling/tde.py: the direction is updated in losses()
            if cosine_scale > 0 or cls_loss.num_logits != self.num_classes + 1:
                raise ValueError("MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'tde' needs softmax's C + 1 logits and COSINE_SCALE 0")
            self.cls_score = tde_classifier or CausalNormClassifier(in_features, cls_loss.num_logits)
        elif classifier == "vmf":  # eqlosses_d2/modeling/vmf.py: loss_icd added in losses()
            if cosine_scale > 0 or cls_loss.num_logits != self.num_classes + 1:
                raise ValueError("MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'vmf' needs softmax's C + 1 logits and COSINE_SCALE 0")
            self.cls_score = vmf_classifier or VMFHead(in_features, cls_loss.num_logits, cfc_weight=0.0)
        elif classifier != "default":
            raise ValueError(f"MODEL.EQLOSSES.DECOUPLING.CLASSIFIER: unknown '{classifier}' (known: default, lws, tde, vmf)")
        if retrain_classifier:
            self.register_buffer(RETRAINED_CLASSIFIER_BUFFER, retrained_classifier_marker())
            self.register_load_state_dict_pre_hook(skip_stage1_classifier)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cls_loss"] = build_loss_from_cfg(cfg.MODEL.EQLOSSES, ret["num_classes"])
        ret["cosine_scale"] = cfg.MODEL.EQLOSSES.COSINE_SCALE
        ret["calibration"] = calibration_from_cfg(cfg)
        ret["max_iter"] = cfg.SOLVER.MAX_ITER
        ret["classifier"] = cfg.MODEL.EQLOSSES.DECOUPLING.CLASSIFIER
        ret["retrain_classifier"] = cfg.MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER
        in_features = input_shape.channels * (input_shape.height or 1) * (input_shape.width or 1)
        if ret["classifier"] == "tde":
            ret["tde_classifier"] = tde_classifier_from_cfg(cfg, in_features, ret["cls_loss"].num_logits)
        elif ret["classifier"] == "vmf":
            ret["vmf_classifier"] = vmf_classifier_from_cfg(cfg, in_features, ret["cls_loss"].num_logits)
        if cfg.TEST.EQLOSSES.PROTOCOL == "fixed":
            ret["test_topk_per_image"] = -1  # Fixed AP: no per-image cap
        return ret

    def link_class_stats(self, class_stats):
        for module in self.cls_loss.modules():  # a loss built on another (PCB's base) too
            if isinstance(module, ClassificationLoss):
                object.__setattr__(module, "class_stats", class_stats)

    def losses(self, predictions, proposals, **context):
        """Detectron2's losses; ``context`` (e.g. the iterative head's ``pass_index``,
        ``num_passes``) goes to the classification loss with the training progress."""
        scores, proposal_deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if len(proposals) else torch.empty(
            0, dtype=torch.long, device=scores.device
        )
        if len(proposals):
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # all-background images have no gt_boxes; their boxes are not used by box_reg_loss
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0
            )
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        if getattr(self.cls_loss, "needs_instance_scores", False):
            context["instance_labels"], context["instance_means"] = instance_mean_scores(
                scores, gt_classes, matched_instance_ids(proposals, self.num_classes), self.num_classes
            )
        logging = is_logging_step(self.max_iter)
        self.cls_loss.scalars_wanted = logging  # what the loss keeps only for its scalars
        if isinstance(self.cls_score, CausalNormClassifier):
            self.cls_score.update_direction(gt_classes)  # TDE: c <- μ c + the foreground mean feature
        losses = dict(self.cls_loss(scores, gt_classes, progress=self._training_progress(), **context))
        if isinstance(self.cls_score, VMFHead):  # vMF-OP: loss_icd (a function of the classifier's parameters)
            losses.update(self.cls_score.auxiliary_losses(None, gt_classes, self._training_progress()))
        if logging:
            self._log_scalars(scores, gt_classes)
        losses["loss_box_reg"] = self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _training_progress(self):
        """iteration / SOLVER.MAX_ITER of the running trainer (None outside one)."""
        try:
            storage = get_event_storage()
        except (AssertionError, IndexError):
            return None
        return storage.iter / self.max_iter if self.max_iter > 0 else None

    def _log_scalars(self, scores, gt_classes):
        """On logging steps: Detectron2's classification metrics (``_log_classification_stats``
        of ``FastRCNNOutputLayers``, computed from the loss's own probabilities: a loss's
        logits need not have a background column last), the foreground fraction and the
        loss's scalars (see the module docstring)."""
        storage = get_event_storage()
        num_rois = gt_classes.numel()
        if num_rois:
            with torch.no_grad():
                predicted = self.cls_loss.predict_probs(scores.detach()).argmax(dim=1)
            background = self.num_classes
            fg = (gt_classes >= 0) & (gt_classes < background)
            correct = predicted == gt_classes
            num_fg, num_correct, num_fg_correct, num_false_negative = torch.stack(
                [fg.sum(), correct.sum(), (correct & fg).sum(), ((predicted == background) & fg).sum()]
            ).tolist()  # one host read
            storage.put_scalar("fast_rcnn/cls_accuracy", num_correct / num_rois, smoothing_hint=False)
            if num_fg:
                storage.put_scalar("fast_rcnn/fg_cls_accuracy", num_fg_correct / num_fg, smoothing_hint=False)
                storage.put_scalar("fast_rcnn/false_negative", num_false_negative / num_fg, smoothing_hint=False)
            storage.put_scalar("fast_rcnn/fg_fraction", num_fg / num_rois, smoothing_hint=False)
        put_loss_scalars(storage, self.cls_loss)

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        num_inst_per_image = [len(p) for p in proposals]
        probs = self.calibration.probs_from_logits(
            scores, self.cls_loss, classifier=self.cls_score, defer=self.defer_calibration
        )
        return probs.split(num_inst_per_image, dim=0)
