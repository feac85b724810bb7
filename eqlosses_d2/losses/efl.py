"""
EFL: Equalized Focal Loss (Li et al., "Equalized Focal Loss for Dense Long-Tailed Object
Detection", CVPR 2022).

Sigmoid focal loss with a per-class focusing factor and weight:

    γ_j = γ_b + s · (1 − g_j),    w_j = γ_j / γ_b,
    EFL = Σ_ij α_t · w_j · (1 − p_t)^{γ_j} · (−log p_t) / normalizer

where g_j = clamp(pos_grad_j / (neg_grad_j + 1e-10), 0, 1) is the accumulated ratio of
the positive to the negative gradient of class j's logit: Σ |∂EFL/∂z_ij| over all anchors
of all levels whose label is j, and over all the others (background anchors included).
A class that receives little positive gradient (rare) gets a larger γ_j (its easy
negatives are down-weighted more) and a larger weight (its hard positives count more).

The gradient is analytic (:func:`.focal.focal_loss_sum`), computed with the loss, so the
statistics are right under mixed precision too (the authors read them with a backward
hook on the head's outputs and say that only works in fp32: the hook sees the loss-scaled
fp16 gradient). The statistics are the gradient of the normalized loss, summed over the
processes (all-reduced) and divided by their number: the gradient of the objective DDP
optimizes, (1/W) Σ_p L_p, so they equal those of one process that saw every image.
(The authors' sums are W times larger; the ratio g_j is the same.) Float64 buffers
(:class:`.gradient_stats.GradientStats`), cumulative, saved in checkpoints. The factors of
an iteration use the statistics from before it; before any statistics g_j = 1, so the
first iteration is the plain focal loss. Updated in training mode only.

Defaults γ_b = 2, α = 0.25, s = 8 (the paper's). With s = 0 EFL is the focal loss.
The normalizer is the model's (:func:`.dense.positive_anchor_normalizer`, the authors'
max(1, all-reduced positive count) / W). Pure PyTorch, no Detectron2 import.
"""
import torch

from .base import empty_loss
from ..registry import DENSE_CLS_LOSS_REGISTRY, config_node, register
from .dense import DenseClassificationLoss, world_size
from .focal import focal_loss_sum
from .gradient_stats import GradientStats, frequency_group_means

__all__ = ["EqualizedFocalLoss"]


@register(DENSE_CLS_LOSS_REGISTRY)
class EqualizedFocalLoss(DenseClassificationLoss):
    name = "efl"
    config_node = "EFL"

    @classmethod
    def add_config(cls, cfg):
        # Equalized Focal Loss (Li et al. 2022): γ_j = GAMMA + SCALE_FACTOR·(1 - g_j), weight γ_j / GAMMA.
        _C = config_node(cfg, "MODEL.EQLOSSES.EFL")
        # α of the focal terms (< 0: no α weighting).
        _C.ALPHA = 0.25
        # γ_b: the focusing factor of a class with balanced gradients (g_j = 1).
        _C.GAMMA = 2.0
        # s: how much γ_j grows as the class's positive/negative gradient ratio g_j falls to 0.
        _C.SCALE_FACTOR = 8.0

    #: g_j before any statistics (the authors' ``pos_neg`` starts at 1: plain focal loss)
    INITIAL_RATIO = 1.0

    def __init__(self, num_classes, class_stats=None, alpha=0.25, gamma=2.0, scale_factor=8.0):
        super().__init__(num_classes, class_stats)
        if not gamma > 0:
            raise ValueError(f"EFL.GAMMA (γ_b) must be > 0 (the weight is γ_j / γ_b), got {gamma}")
        if scale_factor < 0:
            raise ValueError(f"EFL.SCALE_FACTOR must be >= 0, got {scale_factor}")
        if alpha > 1:
            raise ValueError(f"EFL.ALPHA must be <= 1 (< 0: no α weighting), got {alpha}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.scale_factor = float(scale_factor)
        self.gradient_stats = GradientStats(num_classes, initial_ratio=self.INITIAL_RATIO)

    def ratio(self) -> torch.Tensor:
        """(C,) float64 g_j = clamp(pos_grad / (neg_grad + 1e-10), 0, 1)."""
        return self.gradient_stats.ratio().clamp(0.0, 1.0)

    def focusing_factors(self):
        """(C,) float64 γ_j and weights γ_j / γ_b, from the statistics so far."""
        gamma = self.gamma + self.scale_factor * (1.0 - self.ratio())
        return gamma, gamma / self.gamma

    def forward(self, logits, labels, normalizer=1.0):
        self._check(logits, labels, normalizer)
        if logits.shape[0] == 0:
            if self.training:  # a collective: every process takes part every iteration
                self.gradient_stats.update_without_samples()
            return {"loss_cls": empty_loss(logits)}
        gamma, weight = self.focusing_factors()  # statistics up to the previous iteration
        loss, pos_grad, neg_grad = focal_loss_sum(
            logits, labels, gamma.float(), weight.float(), self.alpha, normalizer,
            stats_scale=1.0 / world_size(), with_stats=self.training,
        )
        if self.training:
            self.gradient_stats.update(pos_grad, neg_grad, finite=self._finite)
        return {"loss_cls": loss}

    def scalars(self):
        gamma, _ = self.focusing_factors()
        out = frequency_group_means(gamma, self.class_stats, "gamma")
        out.update(frequency_group_means(self.ratio(), self.class_stats, "pos_neg_ratio"))
        return out

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, gamma={self.gamma}, "
            f"scale_factor={self.scale_factor}"
        )
