"""
The interface of the image-classification losses: pure PyTorch ``nn.Module``s (no Detectron2
import), one logit per class (no background), registered by name in
``IMAGE_CLS_LOSS_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.LOSS``), each declaring its node
``MODEL.EQLOSSES.CLASSIFICATION.<NODE>`` in ``add_config``.

- ``forward(logits (N, C), labels (N,) in [0, C)) -> {"loss_cls": mean over the batch}``;
- ``predict_probs(logits) -> (N, C)`` class scores for inference;
- adaptive state in buffers (saved in checkpoints, summed over processes with
  :func:`eqlosses_d2.losses.base.sync_state`);
- per-class statistics from the model's ``ClassStatsBuffers`` (``class_stats``; its
  ``image_count`` is the number of training images of each class).
"""
import torch
from torch import nn
from torch.nn import functional as F

from ...losses.base import ConfiguredMethod, check_finite_logits
from ...registry import IMAGE_CLS_LOSS_REGISTRY, lookup
from ..config import add_classification_config

__all__ = ["ImageClassificationLoss", "build_image_loss"]


class ImageClassificationLoss(ConfiguredMethod, nn.Module):
    name = "base"

    @classmethod
    def add_config(cls, cfg):
        add_classification_config(cfg)

    def __init__(self, num_classes: int, class_stats=None):
        super().__init__()
        self.num_classes = num_classes
        # not a submodule: the model owns the statistics (and saves them once)
        object.__setattr__(self, "class_stats", class_stats)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        raise NotImplementedError

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits.float(), dim=1)

    def require_image_counts(self) -> torch.Tensor:
        """(C,) training images per class, or a one-line error when the model has none."""
        stats = self.class_stats
        if stats is None or not bool(getattr(stats, "is_set", True)):
            raise RuntimeError(
                f"loss '{self.name}' needs the training set's per-class image counts, but the model has none: "
                f"train on a registered classification dataset or load an eqlosses_d2 checkpoint"
            )
        return stats.image_count

    def _check(self, logits, labels, total=None):
        """Shapes, and (off CUDA) finite logits; ``total``: the sum of the logits when the loss takes
        it anyway, so the finiteness check needs no pass of its own."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"loss '{self.name}' expects logits of shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"loss '{self.name}': {labels.shape[0]} labels for {logits.shape[0]} logits")
        if not logits.is_cuda:
            check_finite_logits(logits, f"loss '{self.name}'", total=total)


def build_image_loss(classification_cfg, num_classes: int, class_stats=None) -> ImageClassificationLoss:
    """The loss ``MODEL.EQLOSSES.CLASSIFICATION.LOSS`` names, with its node's hyper-parameters."""
    cls = lookup(IMAGE_CLS_LOSS_REGISTRY, classification_cfg.LOSS)
    return cls(num_classes, class_stats=class_stats, **cls.hparams_from_cfg(classification_cfg))
