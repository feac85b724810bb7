"""
Bal-BCE of LiVT (Xu et al., "Learning Imbalanced Data with Vision Transformers", CVPR 2023) on the
box predictor's sigmoid head: C logits, no background logit (a background RoI has all-negative
targets, as the plain sigmoid head), logits shifted in training by the log-odds of the class prior:

    x_ij = z_ij + K · (log π_j − log(1 − π_j)),   π_j = n_j / Σ_k n_k   (n: training instance counts),
    t_ij = s / C + (1 − s) · [j = y_i]  (foreground),   t_ij = s / C  (background),
    L = Σ_ij BCE(x_ij, t_ij) / N   (N sampled RoIs),      scores p_j = σ(z_j)  (unshifted).

The image-classification form (:mod:`eqlosses_d2.classification.losses.bal_bce`) documents the
authors' code (XuZhengzhuo/LiVT, ``util/loss.py`` ``BCE_loss(type='Bal')``): the shift is the
prior's log-odds (``_bal_sigmod_bias``) times ``K = 1`` (their ``--bal_tau`` never reaches Bal-BCE),
the loss is ``C · mean BCE`` (the sum over classes averaged over the samples: here over the RoIs,
Detectron2's sigmoid normaliser), the scores are those of the unshifted logits. Value and gradient
``(σ(x) − t) / N`` come from the same fused algebra and kernel (:mod:`.shifted_bce`).

LiVT has no detection code and no LVIS run; what the detection form decides, each a difference:

- the prior: π_j is the share of class j among the training *instances* (``instance_count``), the
  label distribution of the foreground RoIs a detector is trained on (LiVT's π is the label
  distribution of its training samples, one label per image); counts clamped at 1 (a class without
  instances would get log π = −inf; LiVT's data have none);
- the background: a background RoI is a negative of every class (all targets ``s / C``), and the
  shift is applied to every RoI, background included: it is a per-class term of the logit, not of
  the sample (Balanced Softmax's detection code, ``balanced_softmax``, shifts foreground RoIs only);
- SMOOTHING default 0.0: LiVT's s = 0.1 comes with mixup/cutmix in its classification recipes;
  Detectron2's detection recipes have neither;
- classifier bias from the prior 0.001 (``PRIOR_PROB``), as the sigmoid baseline here (LiVT
  fine-tunes a ViT with a zero-initialised head).

Defaults: TAU (K) 1.0, SMOOTHING 0.0, PRIOR_PROB 0.001. Config node ``MODEL.EQLOSSES.BAL_BCE``. No
state: the shift follows the model's class statistics (recomputed when they change).
"""
import torch

from .base import ClassificationLoss, empty_loss
from .shifted_bce import shifted_bce
from .sigmoid import prior_bias, with_background_column
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["BalancedBCE", "CachedClassConstants"]


class CachedClassConstants:
    """Per-class constants computed from class-statistics tensors, kept while those tensors are the
    same objects, unmodified (their version counters, which any in-place write such as a checkpoint
    load bumps): no recomputation, and no host read, per iteration."""

    def __init__(self):
        self._tensors = ()  # held, so that a freed tensor's id cannot be taken by a new one
        self._versions = ()
        self._value = None

    def get(self, tensors, compute):
        tensors = tuple(tensors)
        versions = tuple(t._version for t in tensors)
        same = len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors))
        if not same or versions != self._versions:
            self._value = compute()
            self._tensors, self._versions = tensors, versions
        return self._value


@register(ROI_CLS_LOSS_REGISTRY)
class BalancedBCE(ClassificationLoss):
    name = "bal_bce"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "Bal-BCE, prior log-odds shift on a sigmoid head (Xu et al., LiVT, CVPR 2023)"
    doc_paper = "no LVIS result (classification only)"
    family = "sigmoid"
    config_node = "BAL_BCE"
    extra_logits = 0

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.BAL_BCE")
        # K of the training shift K·(log π − log(1 − π)), π the training instance share of a class
        # (LiVT's code: 1)
        _C.TAU = 1.0
        # label smoothing s: targets s/C off the label (background rows: all), 1 − s + s/C on it
        _C.SMOOTHING = 0.0
        # prior π of the classifier bias init, b = −log((1 − π) / π) (the sigmoid baseline's)
        _C.PRIOR_PROB = 0.001

    def __init__(self, num_classes, class_stats=None, tau=1.0, smoothing=0.0, prior_prob=0.001):
        super().__init__(num_classes, class_stats)
        if tau < 0:
            raise ValueError(f"BAL_BCE.TAU must be >= 0, got {tau}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"BAL_BCE.SMOOTHING must be in [0, 1), got {smoothing}")
        prior_bias(1, prior_prob)  # one-line error for a prior outside (0, 1)
        self.tau = float(tau)
        self.smoothing = float(smoothing)
        self.prior_prob = float(prior_prob)
        self._shift = CachedClassConstants()

    def classifier_bias_init(self):
        return prior_bias(self.num_logits, self.prior_prob)

    def prior_shift(self) -> torch.Tensor:
        """(C,) float32 ``K · (log π − log(1 − π))`` from the training instance counts (float64)."""
        counts = self.require_class_stats().instance_count

        def compute():
            n = counts.double().clamp(min=1)
            prior = n / n.sum()
            return (self.tau * (prior.log() - torch.log1p(-prior))).float()

        return self._shift.get((counts,), compute)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        shift = self.prior_shift().to(logits.device)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        return {"loss_cls": shifted_bce(logits, labels, shift, off=off, on=on, who="Bal-BCE")}

    def predict_probs(self, logits):
        return with_background_column(torch.sigmoid(logits.float()))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, tau={self.tau}, smoothing={self.smoothing}, "
                f"prior_prob={self.prior_prob}")
