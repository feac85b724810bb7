"""
Softmax-EQL (Tan et al., "The Equalization Losses: Gradient-Driven Training for
Long-tailed Object Recognition", arXiv 2210.05566).

Softmax CE with a gradient-driven margin. With G_j the accumulated absolute gradient of
class j's logit (see ``indicator``), a sample of label y is trained on

    margin (default): z'_j = z_j + τ · log(max(G_j, ε) / max(G_y, ε))  for j ≠ y,   L = CE(z', y)
    prior:            z'_j = z_j + log((G_j / (Σ_k G_k + ε))^τ + 1e-9)  for every j

(the second form is logit adjustment with gradient-based priors). Inference uses the
plain ``softmax(z)``. ``G`` sums ``|∂L/∂z_j|`` of the N-normalized loss, computed
analytically as ``(softmax(z') - onehot) / N``, summed over processes, over

- ``indicator="pos"`` (default): the samples whose label is j (``pos_grad``);
- ``"neg"``: the samples whose label is not j, background RoIs included (``neg_grad``);
- ``"pos_and_neg"``: both (``pos_grad + neg_grad``).

Both sums are kept whatever the indicator. An iteration's margins use the statistics from
before it; cumulative, no decay. With no statistics (G = 0) the margin form is plain CE.

Defaults: τ = 1, ε = 1e-4, indicator "pos", form "margin". Classifier bias zero (as
softmax CE).

Detection adaptation (ours; the authors released Softmax-EQL for image classification):
C + 1 logits, background last. Only foreground RoIs are shifted, and only their C
foreground logits; the background logit is never shifted, and background RoIs are plain
CE: the margins act between foreground classes only. ``G`` has C entries (no
background entry). In the "prior" form the target logit is shifted too, by log π_y ≤ 0,
so a foreground RoI must also beat the unshifted background by −log π_y: a stronger
push for tail classes (and, with no statistics yet, a uniform −log 1e-9 ≈ 20.7 on every
foreground RoI's foreground logits; CE's gradient stays bounded). "margin" is the
recommended form.

Other differences from the authors' classification code (ModelTC United-Perception /
ACCV2022 releases, ``SoftmaxEQLLoss`` and ``SoftmaxEQLV2Loss``):

- their ``"pos_and_neg"`` indicator adds the ratio buffer ``pos_neg`` to ``neg_grad``,
  which looks like a slip; ours adds the gradient sums, as the name says;
- they read the gradient with a backward hook on the logits (it includes the loss
  weight); ours is analytic, of the loss before the box predictor's loss weight (1 by
  default), and works under mixed precision;
- float64 buffers, summed over processes before accumulation (theirs too), updated in
  training mode only.
"""
import torch

from .base import ClassificationLoss, empty_loss, scaled_stashed_grad, softmax_with_background_last
from .fused import row_chunks, softmax_
from .gradient_stats import GradientStats, frequency_group_means, label_and_off_label_sums
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["SoftmaxEqualizationLoss"]

INDICATORS = ("pos", "neg", "pos_and_neg")
FORMS = ("margin", "prior")


class _ShiftedSoftmaxCE(torch.autograd.Function):
    """
    ``Σ_i CE(z_i + s_i, y_i) / N`` with the shift ``s = foreground ⊗ logit_shift`` plus
    ``background_shift`` on the last column, its gradient ``(softmax(z + s) - onehot) / N``
    and the per-class sums of the gradient's absolute value over positives and negatives,
    all from a single (N, K) buffer (the shifted logits become the probabilities in place),
    in row chunks (:mod:`.fused`).

    A per-row constant added to all logits changes neither CE nor its gradient: the margin
    form passes ``logit_shift = τ log max(G, ε)`` and, for foreground rows,
    ``background_shift = τ log max(G_y, ε)``, which is z' + τ log max(G_y, ε) on every column.
    """

    @staticmethod
    def forward(ctx, logits, labels, foreground, logit_shift, background_shift):
        num_rows = logits.shape[0]
        scale = 1.0 / num_rows
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        column_sums = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
        prob_y = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
        for start, stop in row_chunks(logits):
            g, rows = grad[start:stop], labels[start:stop, None]
            torch.addr(logits[start:stop], foreground[start:stop], logit_shift, out=g)
            g[:, -1] += background_shift[start:stop]
            shifted_y = g.gather(1, rows).squeeze(1)
            total += (softmax_(g, scale) - shifted_y).sum()  # g: softmax(z') / N
            column_sums += g.sum(dim=0)
            p_y = torch.gather(g, 1, rows, out=prob_y[start:stop, None])
            g.scatter_(1, rows, p_y - scale)  # (softmax(z') - onehot) / N
        # |∂L/∂z'| per class: (1 - p_y) / N on the label, p / N elsewhere
        pos_grad, off_label = label_and_off_label_sums(column_sums, labels, prob_y, scale - prob_y)
        ctx.grad = grad  # handed to autograd (not copied) in backward
        ctx.mark_non_differentiable(pos_grad, off_label)
        return (total * scale).to(logits.dtype), pos_grad, off_label

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "Softmax-EQL"), None, None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class SoftmaxEqualizationLoss(ClassificationLoss):
    name = "softmax_eql"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'Softmax-EQL (arXiv 2210.05566), our detection adaptation'
    doc_paper = '(classification only)'
    config_node = "SOFTMAX_EQL"
    extra_logits = 1

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.SOFTMAX_EQL")
        # τ: margin τ·log(max(G_j, ε) / max(G_y, ε)), or the prior's exponent.
        _C.TAU = 1.0
        # ε: lower clamp of the accumulated gradients G (and the prior's denominator).
        _C.EPS = 1e-4
        # G from "pos" (label = j), "neg" (label ≠ j) or "pos_and_neg" gradients.
        _C.INDICATOR = "pos"
        # "margin" (pairwise, on foreground RoIs; default) or "prior" (z_j + log((G_j/ΣG)^τ + 1e-9)).
        _C.FORM = "margin"

    def __init__(self, num_classes, class_stats=None, tau=1.0, eps=1e-4, indicator="pos", form="margin"):
        super().__init__(num_classes, class_stats)
        if indicator not in INDICATORS:
            raise ValueError(f"SOFTMAX_EQL.INDICATOR must be one of {', '.join(INDICATORS)}; got '{indicator}'")
        if form not in FORMS:
            raise ValueError(f"SOFTMAX_EQL.FORM must be one of {', '.join(FORMS)}; got '{form}'")
        if eps <= 0:
            raise ValueError(f"SOFTMAX_EQL.EPS must be > 0, got {eps}")
        self.tau = float(tau)
        self.eps = float(eps)
        self.indicator = indicator
        self.form = form
        # Softmax-EQL reads the sums, never the ratio
        self.gradient_stats = GradientStats(num_classes, initial_ratio=1.0)

    def accumulated_grad(self) -> torch.Tensor:
        """(C,) float64 G, the indicator's accumulated gradient."""
        stats = self.gradient_stats
        if self.indicator == "pos":
            return stats.pos_grad
        if self.indicator == "neg":
            return stats.neg_grad
        return stats.pos_grad + stats.neg_grad

    def logit_shifts(self):
        """(C,) float32 ``a`` such that the shift of foreground logit j is ``a_j - a_y`` (margin)
        or ``a_j`` (prior)."""
        grad = self.accumulated_grad()
        if self.form == "margin":
            shift = self.tau * grad.clamp(min=self.eps).log()
        else:
            prior = grad / (grad.sum() + self.eps)
            shift = (prior.pow(self.tau) + 1e-9).log()
        return shift.float()

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if logits.shape[0] == 0:
            if self.training:  # a collective: every process takes part every iteration
                self.gradient_stats.update_without_samples()
            return {"loss_cls": empty_loss(logits)}
        shift = self.logit_shifts().to(logits.device)  # statistics up to the previous iteration
        logits, labels = logits.float(), labels.long()
        foreground = labels < self.num_classes
        logit_shift = torch.cat([shift, shift.new_zeros(1)])
        if self.form == "margin":
            background_shift = torch.where(foreground, logit_shift[labels], logit_shift.new_zeros(()))
        else:
            background_shift = logit_shift.new_zeros(labels.shape[0])
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss, pos_grad, neg_grad = _ShiftedSoftmaxCE.apply(
                logits, labels, foreground.float(), logit_shift, background_shift
            )
        if self.training:
            num_classes = self.num_classes
            self.gradient_stats.update(pos_grad[:num_classes], neg_grad[:num_classes], finite=self._finite)
        return {"loss_cls": loss}

    softmax_logits = True

    def predict_probs(self, logits):
        return softmax_with_background_last(logits)

    def activation_logits(self, logits):
        return logits.float()

    def scalars(self):
        return frequency_group_means(self.accumulated_grad(), self.class_stats, f"grad_{self.indicator}")

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, tau={self.tau}, eps={self.eps}, "
            f"indicator='{self.indicator}', form='{self.form}'"
        )
