"""
ECM: Effective Class-Margin loss (Hyun Cho and Krähenbühl, "Long-tail Detection with Effective
Class-Margins", ECCV 2022), as the authors' code computes it (janghyuncho/ECM-Loss,
``mmdet/models/losses/effective_class_margin_loss.py`` and ``ecm_utils.py``).

C + 1 sigmoid channels, the last the background (objectness) channel: a background RoI has target
1 there, a foreground RoI a one-hot on its class (as EQLv2). With n_j the training *image* counts of
the C classes (their ``lvis_v1_image_count.pkl``) and the background's n_bg = r · Σ_j n_j
(r = ``FG_BG_RATIO`` 6.3313, "empirical fg-bg ratio from Mask-RCNN"), S = Σ_{j ≤ C} n_j (background
included), n⁺_j = n_j, n⁻_j = S − n_j, for every channel j (background included):

    margins   m⁺_j = −log(n⁻_j^¼ / (n⁺_j^¼ + n⁻_j^¼)),   m⁻_j = −log(n⁺_j^¼ / (n⁺_j^¼ + n⁻_j^¼)),
    weights   w_j = a_j · log((1 + a_j) / a_j),   a_j = n⁻_j / n⁺_j     (their Theorem 2),
    p⁺_ij = e^{z_ij + m⁺_j} / (e^{z_ij + m⁺_j} + e^{−z_ij + m⁻_j}) = σ(2 z_ij + m⁺_j − m⁻_j),  p⁻ = 1 − p⁺,
    L = loss_weight · Σ_ij w_j · BCE(2 z_ij + m⁺_j − m⁻_j, t_ij) / N     (N sampled RoIs),

and m⁺_j − m⁻_j = ¼ · log(n⁺_j / n⁻_j). Inference (their ``get_activation``): p_j = σ(z_j) · (1 −
σ(z_bg)) for the classes, σ(z_bg) in the background column, from the raw logits (no margin, no
factor 2).

Defaults (their LVIS v1 configs ``configs/effective_class_margin_loss/r50_ecm_{1x,2x}.py``):
FG_BG_RATIO 6.3313, LOSS_WEIGHT 1.0, with a cosine classifier of scale 20 (``NormedLinear``,
``MODEL.EQLOSSES.COSINE_SCALE``) and a normalized mask predictor of scale 20 (``NormedConv2d``,
``MODEL.EQLOSSES.MASK_PREDICTOR_SCALE``), RFS 0.001. Classifier bias starts at zero (mmdetection's
init of ``fc_cls``).

Differences from their code: the counts come from the model's class statistics (a checkpoint
carries them) instead of a pickle file, and are clamped at 1 (a class without images would get an
infinite margin and a 0 · ∞ weight; their LVIS file has none); the margins and weights are
computed in float64 and used in float32; ``log p⁺`` / ``log p⁻`` are taken as the stable
``−softplus(∓x)`` instead of the logs of the two ratios of exponentials (in float32 an exponent
above ~88 overflows, inf / inf = NaN, and a ratio below ~1e-45 is 0, log 0 = −inf); value and gradient ``2 w_j (σ(x) − t) / N`` come from one
fused computation (:mod:`.shifted_bce`). No state.
"""
import torch

from .bal_bce import CachedClassConstants
from .base import ClassificationLoss, empty_loss
from .shifted_bce import shifted_bce
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["EffectiveClassMarginLoss", "ecm_margins_and_weights"]


def ecm_margins_and_weights(image_count, fg_bg_ratio: float):
    """(C + 1,) float64 ``m⁺ − m⁻`` and ``w`` (module docstring) from the C classes' training image
    counts (clamped at 1); the last entry is the background's."""
    n = torch.as_tensor(image_count).double().clamp(min=1)
    n = torch.cat([n, n.sum()[None] * fg_bg_ratio])
    n_pos, n_neg = n, n.sum() - n
    root_pos, root_neg = n_pos.pow(0.25), n_neg.pow(0.25)
    margin_pos = -(root_neg / (root_pos + root_neg)).log()
    margin_neg = -(root_pos / (root_pos + root_neg)).log()
    a = n_neg / n_pos
    weight = a * ((1 + a) / a).log()
    return margin_pos - margin_neg, weight


@register(ROI_CLS_LOSS_REGISTRY)
class EffectiveClassMarginLoss(ClassificationLoss):
    name = "ecm"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "ECM loss, effective class margins (Hyun Cho and Krähenbühl, ECCV 2022)"
    doc_paper = "1x RFS, cosine: mask AP 26.4, box AP 26.9 (authors' README)"
    family = "sigmoid"
    config_node = "ECM"
    extra_logits = 1

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.ECM")
        # background "count" = FG_BG_RATIO × the sum of the classes' image counts (the authors' 6.3313)
        _C.FG_BG_RATIO = 6.3313
        # weight of the loss
        _C.LOSS_WEIGHT = 1.0

    def __init__(self, num_classes, class_stats=None, fg_bg_ratio=6.3313, loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        if fg_bg_ratio <= 0:
            raise ValueError(f"ECM.FG_BG_RATIO must be > 0, got {fg_bg_ratio}")
        self.fg_bg_ratio = float(fg_bg_ratio)
        self.loss_weight = float(loss_weight)
        self._constants = CachedClassConstants()

    def margins_and_weights(self):
        """(C + 1,) float32 ``m⁺ − m⁻`` and ``w`` from the model's class statistics (cached)."""
        counts = self.require_class_stats().image_count

        def compute():
            margin, weight = ecm_margins_and_weights(counts, self.fg_bg_ratio)
            return margin.float(), weight.float()

        return self._constants.get((counts,), compute)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        margin, weight = (t.to(logits.device) for t in self.margins_and_weights())
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        loss = shifted_bce(logits, labels, margin, scale=2.0, column_weight=weight, who="ECM loss")
        return {"loss_cls": loss * self.loss_weight if self.loss_weight != 1.0 else loss}

    def predict_probs(self, logits):
        probs = torch.sigmoid(logits.float())
        return torch.cat([probs[:, :-1] * (1.0 - probs[:, -1:]), probs[:, -1:]], dim=1)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, fg_bg_ratio={self.fg_bg_ratio}, loss_weight={self.loss_weight}"
