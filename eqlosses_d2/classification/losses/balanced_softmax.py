"""
Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
NeurIPS 2020) and logit adjustment (Menon et al., "Long-tail learning via logit adjustment",
ICLR 2021), one loss:

    L = CE(z + τ · log π, y),   π_j = n_j / Σ_k n_k,   scores softmax(z) (no adjustment at inference)

with ``n_j`` the training images of class j (the model's class statistics: the prior is the
training class frequency). The adjustment is ``log(π_j^τ + 1e-12)``, as the logit-adjustment
authors' code (``google-research/logit_adj``: ``np.log(label_freq ** tro + 1e-12)``); at τ = 1
this is Balanced Softmax (``logits + log(n_j)`` in its authors' code, ``BalancedSoftmaxLoss``),
up to a constant per row, which leaves CE and its gradient unchanged, and up to the 1e-12,
which keeps a class without training images finite (log 1e-12 instead of −inf).

Config ``MODEL.EQLOSSES.CLASSIFICATION.BALANCED_SOFTMAX.TAU`` (default 1.0).
"""
import torch
from torch.nn import functional as F

from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss

__all__ = ["BalancedSoftmax"]


@register(IMAGE_CLS_LOSS_REGISTRY)
class BalancedSoftmax(ImageClassificationLoss):
    name = "balanced_softmax"
    config_node = "BALANCED_SOFTMAX"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.BALANCED_SOFTMAX")
        # τ of the adjustment τ·log π (1: Balanced Softmax; logit adjustment's sweeps use 0.5 .. 2)
        _C.TAU = 1.0

    def __init__(self, num_classes, class_stats=None, tau=1.0):
        super().__init__(num_classes, class_stats)
        if tau < 0:
            raise ValueError(f"BALANCED_SOFTMAX.TAU must be >= 0, got {tau}")
        self.tau = float(tau)

    def adjustment(self) -> torch.Tensor:
        """(C,) float32 ``log(π^τ + 1e-12)`` from the training image counts (computed in float64)."""
        counts = self.require_image_counts().double()
        prior = counts / counts.sum().clamp(min=1)
        return (prior.pow(self.tau) + 1e-12).log().float()

    def forward(self, logits, labels):
        self._check(logits, labels)
        adjusted = logits.float() + self.adjustment().to(logits.device)
        return {"loss_cls": F.cross_entropy(adjusted, labels.long())}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, tau={self.tau}"
