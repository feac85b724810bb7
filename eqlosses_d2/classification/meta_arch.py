"""
``LongTailImageClassifier`` (Detectron2's ``META_ARCH_REGISTRY``): a Detectron2 backbone
(``build_backbone``: ResNet from scratch, or ImageNet weights via ``MODEL.WEIGHTS``), global
average pooling of one of its outputs (``MODEL.EQLOSSES.CLASSIFICATION.IN_FEATURE``, "" = the
last), a classifier head (``CLASSIFIER_HEAD_REGISTRY``) and a loss (``IMAGE_CLS_LOSS_REGISTRY``).

Inputs: ``[{"image": (C, H, W) uint8 in INPUT.FORMAT, "label": int}, ...]`` (the
classification mapper's). Training returns the loss's dict; inference returns one
``{"scores": (C,) class probabilities}`` per image (the loss's ``predict_probs``). The training
set's per-class statistics are in ``class_stats`` (:class:`~eqlosses_d2.modeling.ClassStatsBuffers`,
filled by ``train_net.py`` from the class-statistics dataset, saved in checkpoints). A head with a
``training_step(features, labels, progress, learning_rate) -> (logits, losses)`` (TDE, vMF) is
trained through it: its extra losses join the loss's dict; ``progress`` is iteration /
SOLVER.MAX_ITER and ``learning_rate`` the trainer's last ``lr`` scalar (None outside a trainer).
"""
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from ..modeling.class_stats import ClassStatsBuffers
from .decoupling import RETRAINED_HEAD_BUFFER, retrained_head_marker, skip_stage1_head
from .heads import build_head
from .losses import build_image_loss

__all__ = ["LongTailImageClassifier"]


@META_ARCH_REGISTRY.register()
class LongTailImageClassifier(nn.Module):
    @configurable
    def __init__(self, *, backbone, in_feature: str, head, loss, class_stats, pixel_mean, pixel_std, max_iter: int = 0,
                 retrain_head: bool = False):
        super().__init__()
        self.max_iter = max_iter
        self.backbone = backbone
        self.in_feature = in_feature
        self.head = head
        self.loss = loss
        self.class_stats = class_stats
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if retrain_head:  # cRT: a stage-1 checkpoint (without this buffer) does not load the head
            self.register_buffer(RETRAINED_HEAD_BUFFER, retrained_head_marker())
            self.register_load_state_dict_pre_hook(skip_stage1_head)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.EQLOSSES.CLASSIFICATION
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = backbone.output_shape()
        in_feature = node.IN_FEATURE or list(shapes)[-1]
        if in_feature not in shapes:
            raise ValueError(f"MODEL.EQLOSSES.CLASSIFICATION.IN_FEATURE '{in_feature}' is not a backbone output "
                             f"(outputs: {', '.join(shapes)})")
        num_classes = node.NUM_CLASSES
        class_stats = ClassStatsBuffers(num_classes)
        return {
            "backbone": backbone,
            "in_feature": in_feature,
            "head": build_head(node, shapes[in_feature].channels, num_classes),
            "loss": build_image_loss(node, num_classes, class_stats=class_stats),
            "class_stats": class_stats,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "retrain_head": node.DECOUPLING.RETRAIN_HEAD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def features(self, batched_inputs) -> torch.Tensor:
        """(N, D) pooled features."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        return self.backbone(images.tensor)[self.in_feature].mean(dim=(2, 3))

    def forward(self, batched_inputs):
        features = self.features(batched_inputs)
        if not self.training:
            return [{"scores": scores} for scores in self.loss.predict_probs(self.head(features))]
        labels = torch.as_tensor([x["label"] for x in batched_inputs], dtype=torch.long, device=features.device)
        training_step = getattr(self.head, "training_step", None)
        if training_step is None:
            return self.loss(self.head(features), labels)
        logits, head_losses = training_step(features, labels, **self.schedule_position())
        return {**self.loss(logits, labels), **head_losses}

    def schedule_position(self) -> dict:
        """``progress`` (iteration / SOLVER.MAX_ITER) and ``learning_rate`` (the trainer's last ``lr``
        scalar: the previous iteration's), each None when unknown (outside a trainer, first iteration)."""
        try:
            storage = get_event_storage()
        except (AssertionError, IndexError):
            return {"progress": None, "learning_rate": None}
        progress = storage.iter / self.max_iter if self.max_iter > 0 else None
        learning_rate = storage.history("lr").latest() if "lr" in storage.histories() else None
        return {"progress": progress, "learning_rate": learning_rate}
