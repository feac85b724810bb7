"""
Softmax-EQL for image classification (Tan et al., "The Equalization Losses: Gradient-Driven
Training for Long-tailed Object Recognition", arXiv 2210.05566), as its authors run it.

Read: ``SoftmaxEQLLoss`` in ModelTC/United-Perception, ``up/tasks/cls/models/losses/cls_loss.py``
(commit 0aed4a22; the same class is in the ACCV2022 FGIA 1st-place code, Ezra-Yu/ACCV2022_FGIA_1st,
and in a later copy next to ``SoftmaxEQLV2Loss``, the prior form, not implemented here).
With G the indicator's accumulated gradient statistics, a sample of label y is trained on

    z'_j = z_j + τ · log(max(G_j, ε) / max(G_y, ε))  for j ≠ y  (z'_y = z_y),
    L = loss_weight · mean_i CE(z'_i, y_i),

and scored with ``softmax(z)``. The statistics are those of the authors' ``collect_grad``, which
takes the gradient of the logits (a tensor hook; where their head registers it we did not locate in
the copy we read, so we take ``grad`` as ``∂(loss_weight · L)/∂z``, what such a hook receives): ``g = |∂L/∂z| = loss_weight · |softmax(z') − onehot| / N``,
``pos_grad += Σ_i g_ij [y_i = j]``, ``neg_grad += Σ_i g_ij [y_i ≠ j]`` (each summed over
processes first), then ``pos_neg = pos_grad / (neg_grad + 1e-10)``. An iteration's margins use the
statistics from before it (the hook runs in the backward pass after the forward that used them).

Indicators, as in their code: ``"pos"`` G = pos_grad (default), ``"neg"`` G = neg_grad,
``"pos_and_neg"`` G = **pos_neg + neg_grad** — the ratio buffer plus the negative sum (a quirk of
their code, followed here; the paper's wording suggests pos_grad + neg_grad). ``pos_neg`` starts
at ones (their initial buffer), so the first "pos_and_neg" step has zero margins, as theirs.

Defaults (theirs): τ = 1, ε = 1e-4, indicator "pos", loss_weight 1. Config node
``MODEL.EQLOSSES.CLASSIFICATION.SOFTMAX_EQL``.

Computation: a per-row constant added to every logit changes neither CE nor its gradient, so the
margins are applied as ``z + τ log max(G, ε)`` (adding ``τ log max(G_y, ε)`` to row i of z'), one
broadcast add; one autograd Function computes the loss, its gradient ``loss_weight · (softmax(z') −
onehot) / N`` and the statistics from one softmax (:func:`.kernels.softmax_ce_rows_and_grad`: the
loss from −log p_y, or from the row maxima where p_y underflows, not a log-softmax pass;
≈ 1.1× plain CE forward + backward at 512 × 1000 on one thread).

Where ours differs from their code (never in value or gradient beyond float rounding):
- the gradient is computed analytically, not read by a hook: identical in fp32 training; under
  mixed precision their hook would see the loss-scaled gradient, ours does not;
- float64 buffers (theirs float32): the sums are exact over long schedules; the margins agree
  with theirs to float32 rounding;
- statistics are updated in training mode only (their hook fires only when backward runs, which
  is the same thing in practice).
"""
import torch

from ...losses.base import scaled_stashed_grad, sync_state
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import softmax_ce_rows_and_grad

__all__ = ["ImageSoftmaxEQL", "SoftmaxEQLStatistics"]

INDICATORS = ("pos", "neg", "pos_and_neg")


class SoftmaxEQLStatistics:
    """
    What every Softmax-EQL form (this one, the per-pixel one of :mod:`eqlosses_d2.segmentation`)
    shares: the hyper-parameters τ, ε, the indicator and the loss weight (their config keys and
    checks), the float64 buffers ``pos_grad``, ``neg_grad`` and ``pos_neg`` (the authors' ratio,
    starting at ones), the indicator's G and its log-margins, and the update after a step. A mixin
    of an ``nn.Module`` loss: the buffers are the loss's own (checkpoint keys ``pos_grad``, ...).
    """

    @staticmethod
    def add_statistics_config(node):
        """The node's keys and defaults (the authors')."""
        # τ of the margin τ·log(max(G_j, ε) / max(G_y, ε))
        node.TAU = 1.0
        # ε: lower clamp of G
        node.EPS = 1e-4
        # G: "pos" (pos_grad), "neg" (neg_grad) or "pos_and_neg" (pos_neg ratio + neg_grad, the authors' code)
        node.INDICATOR = "pos"
        # weight of the loss (the statistics accumulate the weighted gradient, as the authors' hook)
        node.LOSS_WEIGHT = 1.0

    def init_statistics(self, num_classes: int, key: str, tau: float, eps: float, indicator: str, loss_weight: float):
        """Check and keep the hyper-parameters (``key``: the node's name in errors) and add the buffers."""
        if indicator not in INDICATORS:
            raise ValueError(f"{key}.INDICATOR must be one of {', '.join(INDICATORS)}; got '{indicator}'")
        if not eps > 0:
            raise ValueError(f"{key}.EPS must be > 0, got {eps}")
        if not loss_weight > 0:
            raise ValueError(f"{key}.LOSS_WEIGHT must be > 0, got {loss_weight}")
        self.tau = float(tau)
        self.eps = float(eps)
        self.indicator = indicator
        self.loss_weight = float(loss_weight)
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("pos_neg", torch.ones(num_classes, dtype=torch.float64))

    def accumulated_grad(self) -> torch.Tensor:
        """(C,) float64 G of the indicator (the authors' ``indicator``)."""
        if self.indicator == "pos":
            return self.pos_grad
        if self.indicator == "neg":
            return self.neg_grad
        return self.pos_neg + self.neg_grad

    def log_margin(self, device) -> torch.Tensor:
        """(C,) float32 ``τ log max(G, ε)``, added to every logit of a sample (equal to the margins up
        to a per-sample constant, which changes neither CE nor its gradient)."""
        return (self.tau * self.accumulated_grad().clamp(min=self.eps).log()).float().to(device)

    @torch.no_grad()
    def accumulate(self, pos: torch.Tensor, neg: torch.Tensor, finite=None):
        """Add a step's (C,) contributions, summed over processes first (a collective), and renew the ratio."""
        pos, neg = sync_state(pos, neg, finite=finite, dtype=torch.float64)
        self.pos_grad += pos.to(self.pos_grad.device)
        self.neg_grad += neg.to(self.neg_grad.device)
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, tau={self.tau}, eps={self.eps}, indicator='{self.indicator}', "
                f"loss_weight={self.loss_weight}")


class _AdjustedCEWithGradStats(torch.autograd.Function):
    """``scale · Σ_i CE(z_i + a, y_i)`` (``scale = loss_weight / N``), its gradient
    ``scale · (softmax(z + a) − onehot)`` and the per-class sums of the gradient's absolute value over
    the samples of that class (``pos``: ``scale · (1 − p_iy)``) and over the others (``neg``:
    ``scale · p_ij``), from one (N, C) buffer."""

    @staticmethod
    def forward(ctx, logits, adjustment, labels, scale):
        rows = labels[:, None]
        # one softmax, the loss without a log-softmax pass, exact where p_y underflows
        # (:func:`.kernels.softmax_ce_rows_and_grad`); grad = scale · (p − onehot)
        loss, grad = softmax_ce_rows_and_grad(torch.add(logits, adjustment), labels, scale)
        grad_y = grad.gather(1, rows)  # scale · (p_y − 1)
        neg = grad.scatter_(1, rows, 0.0).sum(dim=0)  # the off-label column sums
        grad.scatter_(1, rows, grad_y)
        pos = torch.zeros_like(neg).index_add_(0, labels, grad_y.squeeze(1), alpha=-1.0)
        ctx.grad = grad
        ctx.mark_non_differentiable(pos, neg)
        return loss.to(logits.dtype), pos, neg

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        return scaled_stashed_grad(ctx, grad_loss, "Softmax-EQL (classification)"), None, None, None


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageSoftmaxEQL(SoftmaxEQLStatistics, ImageClassificationLoss):
    name = "softmax_eql"
    config_node = "SOFTMAX_EQL"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        cls.add_statistics_config(config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.SOFTMAX_EQL"))

    def __init__(self, num_classes, class_stats=None, tau=1.0, eps=1e-4, indicator="pos", loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        self.init_statistics(num_classes, "SOFTMAX_EQL", tau, eps, indicator, loss_weight)

    def margins(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 shifts ``τ log(max(G_j, ε) / max(G_y, ε))``, zero on the label."""
        log_grad = self.accumulated_grad().clamp(min=self.eps).log()
        shift = self.tau * (log_grad[None, :] - log_grad[labels][:, None])
        return shift.scatter(1, labels[:, None], 0.0).float()

    def forward(self, logits, labels):
        self._check(logits, labels)
        labels = labels.long()
        logits = logits.float()
        if logits.shape[0] == 0:
            if self.training:  # a collective: every process takes part every iteration
                zeros = self.pos_grad.new_zeros(self.num_classes)
                sync_state(zeros, zeros)
            return {"loss_cls": logits.sum() * 0.0}
        adjustment = self.log_margin(logits.device)
        loss, pos, neg = _AdjustedCEWithGradStats.apply(logits, adjustment, labels, self.loss_weight / logits.shape[0])
        if self.training:
            self.accumulate(pos, neg)
        return {"loss_cls": loss}
