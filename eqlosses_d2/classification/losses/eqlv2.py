"""
EQLv2 for image classification (Tan et al., "Equalization Loss v2: A New Gradient Balance
Approach for Long-tailed Object Detection", CVPR 2021): the authors' detection loss adapted to
a classifier with C sigmoid outputs and no background/objectness column.

No classification EQLv2 of its authors exists that we could find: ModelTC/United-Perception
(commit 52aaeb9e; ModelTC/EOD is the same repository, same commit) has in ``up/tasks/cls/models/losses/cls_loss.py`` only ``softmax_eql`` and a
``softmax_eqlv2`` that is a softmax with a log-prior of the gradient statistics (another
method), and the sigmoid EQLv2 only for detection. So this is tztztztztz/eqlv2
``mmdet/models/losses/eqlv2.py`` (commit 907fad90) with the background column removed. Per
class j, from the accumulated gradient ratio g_j = pos_grad_j / (neg_grad_j + 1e-10):

    r_j = 1 / (1 + exp(−γ (g_j − μ))),   q_j = 1 + α (1 − r_j)
    L = Σ_ij [q_j y_ij + r_j (1 − y_ij)] · BCE(z_ij, y_ij) / N,   y = onehot(label)

(normaliser N, the batch size, as the authors' ``/ self.n_i``). After the loss, the absolute
gradient of the *un-normalised* weighted sum, ``|σ(z_ij) − y_ij| · w_ij`` (the authors'
``collect_grad``: no 1/N), is summed over the batch into ``pos_grad_j`` (y_ij = 1) and
``neg_grad_j`` (y_ij = 0), each summed over processes first. An iteration's weights use the
statistics up to the previous one; before any statistics the ratio is 100 (the authors'
``pos_neg`` buffer starts at 100), so r = q = 1: the first iteration is plain sigmoid BCE.
Cumulative, no decay. Scores: ``σ(z_j)`` (the authors' ``test_with_obj`` multiplies by
1 − σ(objectness), which a classifier does not have).

Defaults (the authors', for LVIS; no classification recipe exists): γ = 12, μ = 0.8, α = 4.
Config node ``MODEL.EQLOSSES.CLASSIFICATION.EQLV2``.

Differences from the authors' code:
- no background column: the authors' weights append (1, 1) for it and their statistics skip it;
- float64 buffers ``gradient_stats.pos_grad`` / ``neg_grad`` (theirs float32; the ratio is
  computed from them rather than kept as a third buffer), saved in checkpoints;
- value, gradient and statistics from one fused computation (:class:`_WeightedSigmoidBCE`, the
  detection loss's algebra with the softplus of :func:`.kernels.sigmoid_and_softplus_sums`)
  instead of autograd plus a second sigmoid pass;
- statistics updated in training mode only (the authors update on every call);
- the classifier head keeps its own bias initialisation (their head starts it at the prior 0.001).
"""
import torch
from torch.nn import functional as F

from ...losses.base import scaled_stashed_grad, sync_state
from ...losses.gradient_stats import GradientStats, label_and_off_label_sums
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import sigmoid_and_softplus_sums

__all__ = ["ImageEQLv2"]


class _WeightedSigmoidBCE(torch.autograd.Function):
    """
    ``Σ_ij w_ij · BCE(z_ij, y_ij) / N`` (w = q_j on the label, r_j elsewhere), its gradient
    ``w_ij (σ(z_ij) − y_ij) / N`` and the per-class sums of ``|σ(z_ij) − y_ij| · w_ij``
    over positives and negatives (``stats`` (2, C): row 0 positives, row 1 negatives), from one
    (N, C) buffer that becomes the gradient:
    ``Σ_ij w_ij BCE_ij = Σ_j r_j Σ_i softplus(z_ij) + Σ_i [(q_y − r_y) softplus(z_iy) − q_y z_iy]``
    (softplus(−z) = softplus(z) − z), ``pos_j = Σ_{i: y_i = j} q_j (1 − σ(z_ij))`` and
    ``neg_j = r_j Σ_{i: y_i ≠ j} σ(z_ij)``, the column sums of σ with the label entries zeroed.
    ``weights`` (3, C): r, q and q − r (the last spares a per-row subtraction).
    """

    @staticmethod
    def forward(ctx, logits, labels, weights):
        num_rows, num_classes = logits.shape
        rows = labels[:, None]
        prob = torch.empty_like(logits)
        softplus_columns = sigmoid_and_softplus_sums(logits, prob, dim=0)
        logit_y = logits.gather(1, rows).view(-1)
        neg_weight = weights[0]
        _, pos_w, diff_w = weights.index_select(1, labels)  # q_y, q_y − r_y per row
        loss = softplus_columns.dot(neg_weight) + F.softplus(logit_y).dot(diff_w) - logit_y.dot(pos_w)
        pos_rows = prob.gather(1, rows).view(-1).sub_(1.0).mul_(pos_w)  # q_y (σ_y − 1) = −(positive statistic)
        prob.scatter_(1, rows, 0.0)
        stats = logits.new_zeros((2, num_classes))
        stats[0].index_add_(0, labels, pos_rows, alpha=-1.0)
        torch.mul(prob.sum(dim=0), neg_weight, out=stats[1])
        grad = prob.mul_(neg_weight / num_rows)
        grad.scatter_(1, rows, pos_rows.mul_(1.0 / num_rows)[:, None])
        ctx.grad = grad
        ctx.mark_non_differentiable(stats)
        return loss.div_(num_rows), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        return scaled_stashed_grad(ctx, grad_loss, "EQLv2 (classification)"), None, None


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageEQLv2(ImageClassificationLoss):
    name = "eqlv2"
    config_node = "EQLV2"

    #: the ratio before any statistics: f(100) = 1 for the default γ, μ (plain BCE), as the authors'
    INITIAL_RATIO = 100.0

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.EQLV2")
        # γ of the mapping r = 1 / (1 + exp(−γ (g − μ)))
        _C.GAMMA = 12.0
        # μ of the mapping
        _C.MU = 0.8
        # α of the positive weight q = 1 + α (1 − r)
        _C.ALPHA = 4.0

    def __init__(self, num_classes, class_stats=None, gamma=12.0, mu=0.8, alpha=4.0):
        super().__init__(num_classes, class_stats)
        if not gamma > 0:
            raise ValueError(f"EQLV2.GAMMA must be > 0, got {gamma}")
        if alpha < 0:
            raise ValueError(f"EQLV2.ALPHA must be >= 0, got {alpha}")
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.alpha = float(alpha)
        self.gradient_stats = GradientStats(num_classes, initial_ratio=self.INITIAL_RATIO)
        # (2, 3, 1) float64: the offsets and slopes of r, q and q − r as affine functions of r (a constant
        # buffer, not saved: it moves with the model, so no host-to-device copy per step)
        self.register_buffer("_weight_rows", torch.tensor([[[0.0], [1.0 + self.alpha], [1.0 + self.alpha]],
                                                           [[1.0], [-self.alpha], [-1.0 - self.alpha]]],
                                                          dtype=torch.float64), persistent=False)

    def class_weights(self):
        """(C,) float32 negative weights r and positive weights q from the statistics so far."""
        weights = self._stacked_class_weights()
        return weights[0], weights[1]

    def _stacked_class_weights(self):
        """(3, C) float32: row 0 r, row 1 q, row 2 q − r (computed in float64, rounded once)."""
        stats = self.gradient_stats
        # GradientStats.ratio() in fewer small operations (the sums are ≥ 0: "has statistics" is a sum > 0)
        ratio = torch.where((stats.pos_grad + stats.neg_grad) > 0, stats.pos_grad / (stats.neg_grad + 1e-10),
                            stats.initial_ratio)
        neg_weight = torch.sigmoid(ratio.sub_(self.mu).mul_(self.gamma))
        # [r; q; q − r] = offset + slope · r, q = 1 + α (1 − r), q − r = (1 + α)(1 − r): one operation
        offset, slope = self._weight_rows.unbind(0)
        weights = torch.addcmul(offset, slope, neg_weight)
        return weights.float()

    def forward(self, logits, labels):
        self._check(logits, labels)
        if logits.shape[0] == 0:
            if self.training:  # a collective: every process takes part every iteration
                self.gradient_stats.update_without_samples()
            return {"loss_cls": logits.float().sum() * 0.0}
        logits, labels = logits.float().contiguous(), labels.long()
        weights = self._stacked_class_weights().to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss, stats = _WeightedSigmoidBCE.apply(logits, labels, weights)
        if self.training:
            self._accumulate(stats)
        return {"loss_cls": loss}

    @torch.no_grad()
    def _accumulate(self, stats):
        """:meth:`GradientStats.update` for the (2, C) contribution (positives, negatives) in fewer
        small operations: summed over processes in one :func:`sync_state` call, then added to both
        float64 buffers at once."""
        pos_grad, neg_grad = self.gradient_stats.pos_grad, self.gradient_stats.neg_grad
        summed = sync_state(stats.to(pos_grad.device, torch.float64))[0]
        torch._foreach_add_([pos_grad, neg_grad], list(summed.unbind(0)))

    def predict_probs(self, logits):
        return torch.sigmoid(logits.float())

    def extra_repr(self):
        return f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"
