"""
EQL: Equalization Loss (Tan et al., "Equalization Loss for Long-Tailed Object
Recognition", CVPR 2020).

Sigmoid BCE over the C foreground classes in which the negative terms of tail classes
are dropped for foreground RoIs:

    w_ij = 1 - E(r_i) · T_λ(f_j) · (1 - y_ij),    L = Σ_ij w_ij · BCE(z_ij, y_ij) / N

E(r_i) = 1 for a foreground RoI (0 for background, which keeps all its negatives);
T_λ(f_j) = 1 when the class's image frequency f_j = image_count_j / images with at
least one annotation is below λ. Inference ``p_j = σ(z_j)``.

Defaults: λ (``tail_threshold``) = 0.0011, the LVIS v1 value (815 tail classes: all 337
rare, all 461 common, 17 frequent); use 0.00177 on LVIS v0.5. Classifier bias from the
prior π = 0.001 (``prior_prob``), as the authors' sigmoid heads. No adaptive state.

Differences from the authors' code (tztztztztz/eqlv2, ``mmdet/models/losses/eql.py``):
the frequencies come from the model's class-statistics buffers (the training set's
annotation file, saved in checkpoints) instead of a category table compiled into the
code; the hyper-parameter is called ``tail_threshold`` rather than ``lambda_``.
"""
import torch

from .base import empty_loss, tail_class_mask
from .fused import weighted_sigmoid_bce
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .sigmoid import SigmoidCrossEntropy

__all__ = ["EqualizationLoss"]


@register(ROI_CLS_LOSS_REGISTRY)
class EqualizationLoss(SigmoidCrossEntropy):
    name = "eql"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'EQL (Tan et al., CVPR 2020)'
    doc_paper = '1x random: mask AP 18.6, APr 2.1'
    config_node = "EQL"
    extra_logits = 0

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.EQL")
        # λ: classes with image frequency below it lose their negatives on foreground RoIs
        # (LVIS v1 0.0011, v0.5 0.00177).
        _C.TAIL_THRESHOLD = 0.0011
        # Prior π of the classifier bias init, b = -log((1 - π) / π).
        _C.PRIOR_PROB = 0.001

    def __init__(self, num_classes, class_stats=None, tail_threshold=0.0011, prior_prob=0.001):
        super().__init__(num_classes, class_stats, prior_prob=prior_prob)
        if tail_threshold < 0:
            raise ValueError(f"EQL.TAIL_THRESHOLD must be >= 0, got {tail_threshold}")
        self.tail_threshold = tail_threshold

    def tail_classes(self) -> torch.Tensor:
        """(C,) bool T_λ: classes with image frequency below ``tail_threshold``."""
        return tail_class_mask(self.require_class_stats(), self.tail_threshold)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        tail = self.tail_classes()  # first, so that missing statistics fail at once
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        # w_ij = 1 - E(r_i) T_λ(f_j) (1 - y_ij): the negatives of a background RoI keep
        # weight 1, those of a foreground RoI weight 1 - T_λ (its positive always 1)
        keep = (~tail).to(device=logits.device, dtype=torch.float32)
        return {"loss_cls": weighted_sigmoid_bce(logits, labels, fg_weight=keep)}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, tail_threshold={self.tail_threshold}, prior_prob={self.prior_prob}"
