"""
Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS
2020) and logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) in
the box predictor, in two forms (``FORM``):

``"sigmoid"`` (default): the authors' detection code, their "sigmoid variant of Balanced Softmax"
(cunjunyu/BalancedMetaSoftmax-InstanceSeg, ``projects/BALMS/balms/fast_rcnn.py``,
``BalancedSoftmaxFastRCNNOutputs.balanced_softmax_loss``, the code of their LVIS v0.5 results). C logits,
no background logit (a background RoI has all-negative targets, as their ``SigmoidFastRCNNOutputs``):

    x_ij = z_ij − τ · log((1 − f_j) / f_j)   on foreground RoIs,   x_ij = z_ij   on background RoIs,
    L = Σ_ij BCE(x_ij, onehot(y_i)_j) / N,      scores p_j = σ(z_j)   (no adjustment at inference),

f_j = image_count_j / (training images with annotations): the image frequency they read from EQL's
LVIS category table (``image_count_frequency``), i.e. ``ClassStatsBuffers.image_frequency()``. The
background is handled by leaving background RoIs unadjusted ("Only apply to FG samples", their
comment): the shift is the prior of a foreground class, which a background RoI does not draw from.
τ = 1 is their code (they have no τ); −log((1 − f)/f) is the log-odds of f (they drop the constant
1/(k − 1) of the derivation "to keep log(weight) mostly positive").

``"softmax"``: logit adjustment with a C + 1 softmax and the background as a class of the prior,

    L = CE(z + τ · log π, y) averaged over the N RoIs,   scores softmax(z),
    π_bg = b,  π_j = (1 − b) · n_j / Σ_k n_k  (n: training image counts),  log π taken as log(π^τ + 1e-12)

with b the fraction of background RoIs in the batch (the sampled label distribution: Detectron2's
sampler fixes the foreground share at most ``POSITIVE_FRACTION``); ``log(π^τ + 1e-12)`` is the
logit-adjustment authors' code (``google-research/logit_adj``), which keeps a zero prior finite
(a batch without background RoIs, a class without images). The adjustment is per column, the same
for every RoI of the batch, recomputed from each batch's labels (no state, no host read).

Differences from the authors' code (sigmoid form): the frequencies come from the model's class
statistics (a checkpoint carries them) instead of a hard-coded LVIS v0.5 table; image counts are
clamped to [1, M − 1] (M: images with annotations) so that a class without images (or in every
image) keeps a finite shift (their table has none); the shift is applied without modifying the
head's output in place (theirs writes into ``pred_class_logits``); value and gradient
``(σ(x) − t) / N`` come from one fused computation (:mod:`.shifted_bce`). Their classifier bias
starts from the prior 0.001 (``cfg.MODEL.ROI_HEADS.PRIOR_PROB`` in their ``cfg.py``), as here. Their
LVIS recipe (LVIS v0.5) is decoupled: the classifier alone is re-trained for 22k iterations (RFS
0.001) from a sigmoid RFS Mask R-CNN (``DECOUPLE_TRAINING``); the recipe configs here run it that
way (``*_1x_finetune``) and end to end.

The softmax form is not in either authors' code (Ren et al. released the sigmoid form for
detection, Menon et al. no detection code): it is the logit adjustment of both papers with the
background made a class of the prior. Its CE and gradient ``(softmax(z + a) − onehot) / N`` come
from :func:`.fused.affine_softmax_cross_entropy` (cache-sized row chunks).

Defaults: FORM "sigmoid", TAU 1.0, PRIOR_PROB 0.001 (sigmoid form). Config node
``MODEL.EQLOSSES.BALANCED_SOFTMAX``.
"""
import torch
from torch.nn import functional as F

from .bal_bce import CachedClassConstants
from .base import ClassificationLoss, empty_loss
from .fused import affine_softmax_cross_entropy
from .shifted_bce import shifted_bce
from .sigmoid import prior_bias, with_background_column
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["BalancedSoftmax", "FORMS"]

FORMS = ("sigmoid", "softmax")


@register(ROI_CLS_LOSS_REGISTRY)
class BalancedSoftmax(ClassificationLoss):
    name = "balanced_softmax"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "Balanced Softmax / logit adjustment (Ren et al., NeurIPS 2020; Menon et al., ICLR 2021)"
    doc_paper = "LVIS v0.5, decoupled from sigmoid RFS 1x: mask AP 26.4 (APr 15.9)"
    config_node = "BALANCED_SOFTMAX"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.BALANCED_SOFTMAX")
        # "sigmoid": the authors' detection code (C logits, foreground RoIs shifted by τ·logit(f));
        # "softmax": logit adjustment CE(z + τ log π) with C + 1 logits, π_bg the batch's background share
        _C.FORM = "sigmoid"
        # τ of the adjustment (1: Balanced Softmax)
        _C.TAU = 1.0
        # prior π of the sigmoid form's classifier bias init, b = −log((1 − π) / π) (the authors' 0.001)
        _C.PRIOR_PROB = 0.001

    def __init__(self, num_classes, class_stats=None, form="sigmoid", tau=1.0, prior_prob=0.001):
        super().__init__(num_classes, class_stats)
        if form not in FORMS:
            raise ValueError(f"BALANCED_SOFTMAX.FORM must be one of {', '.join(FORMS)}, got '{form}'")
        if tau < 0:
            raise ValueError(f"BALANCED_SOFTMAX.TAU must be >= 0, got {tau}")
        prior_bias(1, prior_prob)  # one-line error for a prior outside (0, 1)
        self.form = form
        self.tau = float(tau)
        self.prior_prob = float(prior_prob)
        # the form decides the head: C sigmoid logits, or C + 1 softmax logits (background last)
        self.extra_logits = 0 if form == "sigmoid" else 1
        self.family = form
        self.softmax_logits = form == "softmax"
        self._constants = CachedClassConstants()

    def classifier_bias_init(self):
        return prior_bias(self.num_logits, self.prior_prob) if self.form == "sigmoid" else None

    def foreground_shift(self) -> torch.Tensor:
        """Sigmoid form: (C,) float32 ``τ · log(f / (1 − f))``, f the image frequency (float64)."""
        stats = self.require_class_stats()
        counts, total = stats.image_count, stats.num_images_with_annotations

        def compute():
            m = total.double().clamp(min=2)
            f = torch.minimum(counts.double().clamp(min=1), m - 1) / m
            return (self.tau * (f.log() - torch.log1p(-f))).float()

        return self._constants.get((counts, total), compute)

    def log_class_share(self) -> torch.Tensor:
        """Softmax form: (C,) float64 ``n_j / Σ_k n_k`` of the training image counts."""
        counts = self.require_class_stats().image_count

        def compute():
            n = counts.double()
            return n / n.sum().clamp(min=1)

        return self._constants.get((counts,), compute)

    def adjustment(self, labels: torch.Tensor) -> torch.Tensor:
        """Softmax form: (C + 1,) float32 ``log(π^τ + 1e-12)`` for a batch with ``labels``."""
        share = self.log_class_share().to(labels.device)
        background = (labels == self.num_classes).sum(dtype=torch.float64) / max(labels.numel(), 1)
        prior = torch.cat([share * (1.0 - background), background[None]])
        return (prior.pow(self.tau) + 1e-12).log().float()

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if self.form == "sigmoid":
            shift = self.foreground_shift().to(logits.device)
            if logits.shape[0] == 0:
                return {"loss_cls": empty_loss(logits)}
            foreground = (labels < self.num_classes).to(torch.float32)
            return {"loss_cls": shifted_bce(logits, labels, shift, row_mask=foreground, who="Balanced Softmax")}
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": affine_softmax_cross_entropy(logits, labels, shift=self.adjustment(labels))}

    def predict_probs(self, logits):
        if self.form == "sigmoid":
            return with_background_column(torch.sigmoid(logits.float()))
        return F.softmax(logits.float(), dim=-1)

    def activation_logits(self, logits):
        if self.form != "softmax":
            return super().activation_logits(logits)
        return logits.float()

    def extra_repr(self):
        return f"num_classes={self.num_classes}, form={self.form!r}, tau={self.tau}, prior_prob={self.prior_prob}"
