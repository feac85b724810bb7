"""
Generalized re-weighting (GRW; Zhang et al., "Distribution Alignment: A Unified Framework for
Long-tail Visual Recognition", CVPR 2021), the loss of MARC's second stage (Wang et al., "Margin
Calibration for Long-Tailed Visual Recognition", ACML 2022):

    L = Σ_i r_{y_i} · CE(z_i, y_i) / Σ_i r_{y_i},   r_j = C · π_j^(−p) / Σ_k π_k^(−p),   π_j = n_j / Σ_k n_k

(PyTorch's weighted ``cross_entropy``, mean reduction: normalised by the batch's weights), with
``n_j`` the training images of class j (the model's class statistics) and ``p`` =
``MODEL.EQLOSSES.CLASSIFICATION.GRW.EXP_SCALE`` (default 1.2, MARC's configs for every dataset),
as MARC's authors' ``loss/GRWLoss.py`` (microsoft/robustlearn, commit 31580cd19572; weights computed
in float64 there with numpy, here in float64 with torch, then float32). Scores: ``softmax(z)``.
Differs: a class without training images (never a label of the training batch) is counted as one
image, so its weight is finite instead of ``inf`` (which would make every weight NaN).
"""
import torch
from torch.nn import functional as F

from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss

__all__ = ["GeneralizedReweightCE"]


@register(IMAGE_CLS_LOSS_REGISTRY)
class GeneralizedReweightCE(ImageClassificationLoss):
    name = "grw"
    config_node = "GRW"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.GRW")
        # p of the class weights π_j^(-p) (MARC's configs: 1.2; 0: plain CE; 1: inverse frequency)
        _C.EXP_SCALE = 1.2

    def __init__(self, num_classes, class_stats=None, exp_scale=1.2):
        super().__init__(num_classes, class_stats)
        if not exp_scale >= 0:
            raise ValueError(f"GRW.EXP_SCALE must be >= 0, got {exp_scale}")
        self.exp_scale = float(exp_scale)

    def class_weights(self) -> torch.Tensor:
        """(C,) float32 ``r_j`` (computed in float64), mean 1."""
        counts = self.require_image_counts().double().clamp(min=1)
        weights = (counts / counts.sum()).pow(-self.exp_scale)
        return (weights / weights.sum() * self.num_classes).float()

    def forward(self, logits, labels):
        self._check(logits, labels)
        weight = self.class_weights().to(logits.device)
        return {"loss_cls": F.cross_entropy(logits.float(), labels.long(), weight=weight)}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, exp_scale={self.exp_scale}"
