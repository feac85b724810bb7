"""
EQLv2: Equalization Loss v2 (Tan et al., "Equalization Loss v2: A New Gradient Balance
Approach for Long-tailed Object Detection", CVPR 2021).

C + 1 sigmoid channels, the last an objectness (background) channel: a background RoI
has target 1 there, a foreground RoI a one-hot on its class. Per class j, from the
accumulated gradient ratio g_j = pos_grad_j / (neg_grad_j + 1e-10):

    r_j = f(g_j) = 1 / (1 + exp(-γ (g_j - μ))),    q_j = 1 + α (1 - r_j)    (r = q = 1 on objectness)
    L = Σ_ij [q_j y_ij + r_j (1 - y_ij)] · BCE(z_ij, y_ij) / N

After the loss, ``grad_ij = |σ(z_ij) - y_ij| · weight_ij`` (the gradient of the summed,
not N-normalized, weighted loss) is accumulated into ``pos_grad_j`` (y_ij = 1) and
``neg_grad_j`` (y_ij = 0), objectness excluded, summed over processes first. Iteration t's
weights use the statistics up to t - 1; before any statistics g = 100, so f(g) = 1 and the
first iteration is plain BCE. Cumulative, no decay.

Inference: ``p_j = σ(z_j) · (1 - σ(z_bg))`` (``test_with_obj``, default) or ``σ(z_j)``;
the background column is ``σ(z_bg)`` (Detectron2's inference drops it).

Defaults: γ = 12, μ = 0.8, α = 4, ``test_with_obj`` = True. Classifier bias from the prior
π = 0.001 on all C + 1 channels (objectness included): the authors' ``ConvFCBBoxHead``
initialises every output of a sigmoid classifier with ``bias_init_with_prob(0.001)``.

Differences from the authors' code (tztztztztz/eqlv2, ``mmdet/models/losses/eqlv2.py``):

- the statistics are float64 registered buffers from the start (the authors made them
  buffers only in 2022; the published numbers were produced with plain attributes, lost on
  resume); the ratio is computed from them instead of kept as a third buffer;
- the gradient statistics come from the same fused computation as the loss (see
  :class:`_WeightedSigmoidBCE`) instead of a second pass;
- the statistics are updated only in training mode (the authors update on every call).
"""
import torch
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss, scaled_stashed_grad
from .gradient_stats import GradientStats, frequency_group_means, label_and_off_label_sums
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .sigmoid import prior_bias

__all__ = ["EqualizationLossV2"]


class _WeightedSigmoidBCE(torch.autograd.Function):
    """
    ``Σ_ij w_ij · BCE(z_ij, y_ij) / N`` with ``w_ij = q_j`` where y_ij = 1 (j = label_i) and
    ``r_j`` elsewhere, its gradient ``w_ij (σ(z_ij) - y_ij) / N``, and the per-class sums of
    ``|σ(z_ij) - y_ij| · w_ij`` over positives and negatives, all from one sigmoid and one
    softplus of the (N, K) logits and a single (N, K) buffer.

    The sums never materialise the one-hot target or the weight matrix:
    Σ_ij w_ij BCE_ij = Σ_j r_j Σ_i softplus(z_ij) + Σ_i [q_yi softplus(-z_iyi) - r_yi softplus(z_iyi)],
    pos_j = q_j Σ_{i: y_i = j} (1 - σ(z_ij)),   neg_j = r_j (Σ_i σ(z_ij) - Σ_{i: y_i = j} σ(z_ij)).
    """

    @staticmethod
    def forward(ctx, logits, labels, neg_weight, pos_weight):
        num_rois = logits.shape[0]
        rows = labels[:, None]
        buffer = F.softplus(logits)  # BCE(z, 0)
        logit_y = logits.gather(1, rows).squeeze(1)
        softplus_y = buffer.gather(1, rows).squeeze(1)
        pos_w = pos_weight[labels]
        neg_w = neg_weight[labels]
        loss = (buffer.sum(dim=0) * neg_weight).sum() + (
            pos_w * (softplus_y - logit_y) - neg_w * softplus_y  # softplus(-z) = softplus(z) - z
        ).sum()

        prob = torch.sigmoid(logits, out=buffer)
        prob_y = prob.gather(1, rows).squeeze(1)
        pos_grad, off_label = label_and_off_label_sums(prob.sum(dim=0), labels, prob_y, pos_w * (1.0 - prob_y))
        neg_grad = neg_weight * off_label

        # gradient of the normalized loss: r_j σ / N off the label, q_y (σ - 1) / N on it
        grad = prob.mul_(neg_weight / num_rois)
        grad.scatter_(1, rows, (pos_w * (prob_y - 1.0) / num_rois)[:, None])
        ctx.grad = grad  # handed to autograd (not copied) in backward
        ctx.mark_non_differentiable(pos_grad, neg_grad)
        return loss / num_rois, pos_grad, neg_grad

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "EQLv2"), None, None, None


class _SoftWeightedSigmoidBCE(torch.autograd.Function):
    """
    The dense form for soft targets y ∈ [0, 1] (PCB's composition, as the PCB authors'
    ``EQLv2PCBLoss``): ``w = q·y + r·(1 − y)``, ``L = Σ w·BCE(z, y) / N``, gradient
    ``w (σ(z) − y) / N``, and per class ``pos = Σ_i |σ − y|·y·w``, ``neg = Σ_i |σ − y|·(1 − y)·w``.
    With one-hot y it equals :class:`_WeightedSigmoidBCE`.
    """

    @staticmethod
    def forward(ctx, logits, target, neg_weight, pos_weight):
        num_rois = logits.shape[0]
        weight = pos_weight * target + neg_weight * (1.0 - target)
        loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()
        error = torch.sigmoid(logits) - target
        weighted_abs = error.abs() * weight
        pos_grad = (weighted_abs * target).sum(dim=0)
        neg_grad = (weighted_abs * (1.0 - target)).sum(dim=0)
        ctx.grad = error.mul_(weight).div_(num_rois)
        ctx.mark_non_differentiable(pos_grad, neg_grad)
        return loss / num_rois, pos_grad, neg_grad

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "EQLv2"), None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class EqualizationLossV2(ClassificationLoss):
    name = "eqlv2"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'EQLv2 (Tan et al., CVPR 2021)'
    doc_paper = '1x random: mask AP 23.7 (APr 14.9, APc 22.8, APf 28.6); 2x: 25.5'
    family = "sigmoid"
    config_node = "EQLV2"
    extra_logits = 1

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.EQLV2")
        # γ of the weight mapping f(g) = 1 / (1 + exp(-γ (g - μ))).
        _C.GAMMA = 12.0
        # μ of the weight mapping f.
        _C.MU = 0.8
        # α of the positive weight q = 1 + α (1 - r).
        _C.ALPHA = 4.0
        # Inference p_j = σ(z_j)·(1 - σ(z_bg)) (True) or σ(z_j) (False).
        _C.TEST_WITH_OBJ = True
        # Prior π of the bias init of all C + 1 channels, objectness included (authors' head).
        _C.PRIOR_PROB = 0.001

    #: the ratio before any statistics: f(100) = 1 for any sensible γ, μ (plain BCE)
    INITIAL_RATIO = 100.0

    def __init__(
        self, num_classes, class_stats=None, gamma=12.0, mu=0.8, alpha=4.0, test_with_obj=True, prior_prob=0.001
    ):
        super().__init__(num_classes, class_stats)
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.alpha = float(alpha)
        self.test_with_obj = bool(test_with_obj)
        self.prior_prob = prior_prob
        prior_bias(1, prior_prob)  # validate now, not when the model is built
        self.gradient_stats = GradientStats(num_classes, initial_ratio=self.INITIAL_RATIO)

    def classifier_bias_init(self):
        return prior_bias(self.num_logits, self.prior_prob)

    def class_weights(self):
        """(C + 1,) float32 negative weights r and positive weights q, objectness last (1, 1)."""
        ratio = self.gradient_stats.ratio()
        neg_weight = torch.sigmoid(self.gamma * (ratio - self.mu))
        pos_weight = 1.0 + self.alpha * (1.0 - neg_weight)
        one = neg_weight.new_ones(1)
        return torch.cat([neg_weight, one]).float(), torch.cat([pos_weight, one]).float()

    def forward(self, logits, labels, class_target=None, **context):
        """``class_target``: optional soft target (n_fg, C) of the foreground RoIs' class
        channels, in batch order (PCB); None is the one-hot of their labels."""
        self._check(logits, labels)
        if logits.shape[0] == 0:
            if self.training:  # a collective: every process takes part every iteration
                self.gradient_stats.update_without_samples()
            return {"loss_cls": empty_loss(logits)}
        neg_weight, pos_weight = self.class_weights()  # statistics up to the previous iteration
        logits, labels = logits.float(), labels.long()
        neg_weight, pos_weight = neg_weight.to(logits.device), pos_weight.to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if class_target is None:
                loss, pos_grad, neg_grad = _WeightedSigmoidBCE.apply(logits, labels, neg_weight, pos_weight)
            else:
                target = F.one_hot(labels, self.num_logits).to(logits)
                fg = labels < self.num_classes
                target[fg, : self.num_classes] = class_target.to(logits)
                loss, pos_grad, neg_grad = _SoftWeightedSigmoidBCE.apply(logits, target, neg_weight, pos_weight)
        if self.training:
            num_classes = self.num_classes
            self.gradient_stats.update(pos_grad[:num_classes], neg_grad[:num_classes], finite=self._finite)
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        probs = torch.sigmoid(logits.float())
        background = probs[:, self.num_classes :]
        foreground = probs[:, : self.num_classes]
        if self.test_with_obj:
            foreground = foreground * (1.0 - background)
        return torch.cat([foreground, background], dim=1)

    def scalars(self):
        return frequency_group_means(self.gradient_stats.ratio(), self.class_stats, "pos_neg_ratio")

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}, "
            f"test_with_obj={self.test_with_obj}, prior_prob={self.prior_prob}"
        )
