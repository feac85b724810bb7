"""
Seesaw loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021).

C + 2 logits per RoI, in mmdetection's order: the C class logits, then the two objectness
logits ``[foreground, background]``.

- Class branch, foreground RoIs only: ``CE(z̃, y)`` with ``z̃_j = z_j + log S_yj`` for j ≠ y,
  ``S_yj = M_yj · C_yj``;
  mitigation ``M_yj = (N_j / N_y)^p`` if ``N_j < N_y`` else 1, N the cumulative counts of
  sampled foreground RoI labels (clamped at 1), updated with this batch's labels *before*
  the loss; compensation ``C_yj = (σ_j / σ_y)^q`` if ``σ_j > σ_y`` else 1, σ the softmax of
  the class logits (detached), σ_y clamped at ``eps``.
- Objectness branch, all RoIs: 2-way softmax CE, foreground vs background.
- Both terms are summed over their RoIs and divided by N, the number of sampled RoIs
  (mmdetection's ``avg_factor``), and multiplied by ``loss_weight``.
- Inference: ``p_j = softmax(z_cls)_j · softmax(z_obj)_fg``; background column
  ``softmax(z_obj)_bg``.

Returned losses: ``loss_cls`` (class branch; Detectron2's ``loss_weight["loss_cls"]``
applies to it) and ``loss_cls_objectness`` (objectness branch).

Defaults (mmdetection's ``SeesawLoss`` and its LVIS configs): p = 0.8, q = 2.0,
eps = 1e-2, loss_weight = 1.0 (one weight for both terms, as mmdetection). The LVIS
recipes also use a cosine classifier of scale 20 (``MODEL.EQLOSSES.COSINE_SCALE``) and
optionally a normalized mask predictor.

Differences from the authors' code (mmdetection ``SeesawLoss``):

- the per-batch label counts are all-reduced over processes before they are
  accumulated, so every process holds the same global counts (mmdetection keeps them
  per GPU, never synchronized); the counts live in the float64 buffer
  ``cumulative_count`` (C,), saved in checkpoints and restored on resume;
- the factors are applied in log space, ``log S = p·min(log N_j − log N_y, 0) +
  q·max(log σ_j − max(log σ_y, log eps), 0)``, which equals mmdetection's
  ``log(M·C)`` without building the C × C ratio matrix;
- the counts are updated on every process even when it has no RoI (a zero contribution),
  so the all-reduce never deadlocks;
- the two cross-entropies and their gradients are computed by one autograd function
  that writes the analytic gradient (softmax − one-hot) straight into the (N, C + 2)
  logit gradient: the same values, without autograd's full-size buffers for slicing
  and row selection.
"""
import math

import torch
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss, sync_state
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["SeesawLoss", "seesaw_log_factors"]

_GROUP_NAMES = ("r", "c", "f")


def _seesaw_log_terms(class_logits, labels, cumulative_count, p: float, eps: float):
    """
    The factors' logs in compact form (no gradient): the log mitigation of each class
    present, (U, C), with each row's index into it, and the compensation's log ratio
    ``max(log σ_j − max(log σ_y, log eps), 0)`` per row, (n, C), not yet times q.
    """
    log_count = cumulative_count.clamp(min=1).log().to(torch.float32)
    classes, inverse = torch.unique(labels, return_inverse=True)
    log_mitigation = (log_count[None, :] - log_count[classes][:, None]).clamp_(max=0.0).mul_(p)
    log_scores = F.log_softmax(class_logits.detach().float(), dim=1)
    log_self = log_scores.gather(1, labels[:, None]).clamp_(min=math.log(eps))
    return log_mitigation, inverse, log_scores.sub_(log_self).clamp_(min=0.0)


@torch.no_grad()
def seesaw_log_factors(class_logits, labels, cumulative_count, p: float, q: float, eps: float):
    """
    Log mitigation and log compensation factors, each (n, C), for foreground RoIs with
    class logits ``class_logits`` (n, C) and labels in [0, C). Both are 0 at j = y.
    Computed without gradient (the factors are constants for the loss).
    """
    log_mitigation, inverse, log_ratio = _seesaw_log_terms(class_logits, labels, cumulative_count, p, eps)
    return log_mitigation[inverse], log_ratio.mul_(q)


class _SeesawCrossEntropy(torch.autograd.Function):
    """
    The two Seesaw cross-entropy sums, ``Σ_fg CE(z̃, y)`` and ``Σ_all CE(z_obj, t)``,
    with their analytic gradients written straight into one (N, C + 2) gradient (autograd
    through slicing and row selection would allocate and add several full-size ones).
    ``adjusted`` is z̃ = z + log S for the foreground rows (a constant shift of z: the
    gradient with respect to z is the one with respect to z̃). ``class_target``: None (the
    one-hot of ``fg_labels``) or a soft target (n_fg, C) for the class branch,
    ``−Σ_k t_k log softmax(z̃)_k`` (PCB's composition).
    """

    @staticmethod
    def forward(ctx, logits, fg_rows, fg_labels, adjusted, objectness_target, class_target=None):
        num_classes = logits.shape[1] - 2
        log_p_objectness = F.log_softmax(logits[:, num_classes:], dim=1)
        loss_objectness = -log_p_objectness.gather(1, objectness_target[:, None]).sum()
        grad_objectness = log_p_objectness.exp_()
        grad_objectness[torch.arange(logits.shape[0], device=logits.device), objectness_target] -= 1.0
        if fg_rows.numel() and class_target is not None:
            log_p = F.log_softmax(adjusted, dim=1)
            loss_cls = -(class_target * log_p).sum()
            grad_cls = log_p.exp_().sub_(class_target)
        elif fg_rows.numel():
            log_p = F.log_softmax(adjusted, dim=1)
            loss_cls = -log_p.gather(1, fg_labels[:, None]).sum()
            grad_cls = log_p.exp_()
            grad_cls[torch.arange(fg_rows.numel(), device=logits.device), fg_labels] -= 1.0
        else:
            loss_cls = logits.new_zeros(())
            grad_cls = None
        # intermediates, scaled in place and released in backward
        ctx.grads = (grad_cls, grad_objectness)
        ctx.fg_rows = fg_rows
        ctx.shape = logits.shape
        return loss_cls, loss_objectness

    @staticmethod
    def backward(ctx, grad_loss_cls, grad_loss_objectness):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError("Seesaw loss: backward through the same graph twice is not supported")
        del ctx.grads
        grad_cls, grad_objectness = grads
        num_classes = ctx.shape[1] - 2
        grad = grad_objectness.new_zeros(ctx.shape)
        grad[:, num_classes:] = grad_objectness.mul_(grad_loss_objectness)
        if grad_cls is not None:
            grad[:, :num_classes].index_copy_(0, ctx.fg_rows, grad_cls.mul_(grad_loss_cls))
        return grad, None, None, None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class SeesawLoss(ClassificationLoss):
    name = "seesaw"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'Seesaw loss (Wang et al., CVPR 2021), with the objectness branch'
    doc_paper = '2x RFS, cosine: mask AP 26.4 (APr 19.5); normalized mask predictor optional'
    config_node = "SEESAW"
    extra_logits = 2

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.SEESAW")
        # Mitigation (N_j / N_y)^p for N_j < N_y (N: cumulative positive RoI counts).
        _C.P = 0.8
        # Compensation (σ_j / σ_y)^q for σ_j > σ_y.
        _C.Q = 2.0
        # Lower clamp of σ_y in the compensation.
        _C.EPS = 0.01
        # Weight of both terms (loss_cls and loss_cls_objectness), as mmdet's.
        _C.LOSS_WEIGHT = 1.0

    def __init__(self, num_classes, class_stats=None, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        if p < 0 or q < 0:
            raise ValueError(f"seesaw: P and Q must be >= 0, got p={p}, q={q}")
        if not 0 < eps <= 1:
            raise ValueError(f"seesaw: EPS must be in (0, 1], got {eps}")
        self.p = float(p)
        self.q = float(q)
        self.eps = float(eps)
        self.loss_weight = float(loss_weight)
        # N_j: sampled foreground RoIs of class j since the start of training, over all processes
        self.register_buffer("cumulative_count", torch.zeros(num_classes, dtype=torch.float64))
        self._last = None  # detached per-RoI factor means of the last batch, for scalars()

    @torch.no_grad()
    def accumulate(self, fg_labels: torch.Tensor):
        """Add this batch's foreground label counts (summed over processes) to N."""
        batch_count = torch.bincount(fg_labels, minlength=self.num_classes).to(self.cumulative_count)
        self.cumulative_count += sync_state(batch_count)[0]

    def forward(self, logits, labels, class_target=None, **context):
        """``class_target``: optional soft target (n_fg, C) of the foreground RoIs' class
        branch, in batch order (PCB); None is the one-hot of their labels."""
        self._check(logits, labels)
        num_classes = self.num_classes
        fg = labels < num_classes
        fg_labels = labels[fg]
        # before the loss, and on every process (the all-reduce is collective)
        self.accumulate(fg_labels)
        self._last = None
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits), "loss_cls_objectness": empty_loss(logits)}

        logits = logits.float()
        num_rois = logits.shape[0]
        fg_rows = torch.nonzero(fg, as_tuple=True)[0]
        with torch.no_grad():
            adjusted = logits[:, :num_classes].index_select(0, fg_rows)
            if fg_rows.numel():
                log_mitigation, inverse, log_ratio = _seesaw_log_terms(
                    adjusted, fg_labels, self.cumulative_count, self.p, self.eps
                )
                # z̃ = z + log M + log C (in place, on the gathered foreground rows)
                adjusted.add_(log_ratio, alpha=self.q).add_(log_mitigation.index_select(0, inverse))
                if self.scalars_wanted:  # the factors' means, for scalars() only
                    self._last = (
                        fg_labels,
                        self._mean_off_target(log_mitigation.exp_())[inverse],
                        self._mean_off_target(log_ratio.mul_(self.q).exp_()),
                    )
        # objectness target: 0 = foreground, 1 = background (mmdetection's order)
        if class_target is not None:
            class_target = class_target.to(logits)
        loss_cls, loss_objectness = _SeesawCrossEntropy.apply(
            logits, fg_rows, fg_labels, adjusted, (~fg).long(), class_target
        )
        return {
            "loss_cls": loss_cls * (self.loss_weight / num_rois),
            "loss_cls_objectness": loss_objectness * (self.loss_weight / num_rois),
        }

    def _mean_off_target(self, factor):
        # mean of a factor over j != y (it is exactly 1 at j = y)
        if self.num_classes < 2:
            return factor.new_ones(factor.shape[0])
        return (factor.sum(dim=1) - 1.0) / (self.num_classes - 1)

    def predict_probs(self, logits):
        logits = logits.float()
        class_probs = F.softmax(logits[:, : self.num_classes], dim=1)
        objectness = F.softmax(logits[:, self.num_classes :], dim=1)
        return torch.cat([class_probs * objectness[:, :1], objectness[:, 1:]], dim=1)

    def scalars(self):
        """Mean mitigation / compensation factor over the off-target classes of the last
        batch's foreground RoIs; per r/c/f group of the RoI's class when class stats are set."""
        if self._last is None:
            return {}
        labels, mitigation, compensation = self._last
        out = {"mitigation_mean": mitigation.mean().item(), "compensation_mean": compensation.mean().item()}
        stats = self.class_stats
        if stats is not None and bool(getattr(stats, "is_set", True)):
            groups = stats.frequency_group.to(labels.device)[labels]
            for index, group in enumerate(_GROUP_NAMES):
                in_group = groups == index
                if bool(in_group.any()):
                    out[f"mitigation_mean_{group}"] = mitigation[in_group].mean().item()
                    out[f"compensation_mean_{group}"] = compensation[in_group].mean().item()
        return out

    def extra_repr(self):
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, loss_weight={self.loss_weight}"
