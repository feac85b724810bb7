"""
PCB: Pairwise Class Balance (He et al., "Relieving Long-tailed Instance Segmentation via
Pairwise Class Balance", CVPR 2022), on a C + 1 softmax classifier.

State: a C × C confusion matrix M (rows: ground-truth class, a distribution over the
predicted foreground classes) and the cumulative count of positive RoIs per class.
Every iteration, *before* the loss, from the positive RoIs of the batch summed over all
processes: for each class c present, ``m_c`` = the mean of ``softmax(z[:C])`` over its
RoIs, ``M[c] ← μ·M[c] + (1 − μ)·m_c`` (μ = 0.99), then row c renormalized to sum 1;
M starts at zero (so a class's first update sets its row to that batch's mean).

Active once training has reached ``start`` (a fraction of the schedule; 17/24 in the
paper) and every class has been seen at least once. Then a positive RoI of class y gets
the soft label t = column y of the column-normalized M, ``t_k = M[k, y] / Σ_j M[j, y]``
(background 0), and

    L = [ Σ_bg CE(z, bg) + (1 − α)·Σ_fg CE(z, y) + α·Σ_fg KL(t ‖ softmax(z)) ] / N

with N all sampled RoIs, α = 0.4. Before that: plain softmax CE (Σ CE / N). Inference:
softmax. The gradient of the active loss for a positive RoI is ``p − (1 − α)·onehot(y)
− α·t``: PCB is cross-entropy with the soft target ``(1 − α)·onehot(y) + α·t``
(the KL and the soft-target CE differ by the constant α·Σ t log t, which is added so the
reported value is the paper's).

Differences from the authors' code (megvii-research/PCB, ``CrossEntropyPCBLoss``):

- the per-batch sums are all-reduced (the authors all-gather and sum: the same numbers);
  the confusion matrix (float32) and the counts (float64) are buffers, saved in
  checkpoints and restored by ``--resume``;
- the start point is a fraction of ``SOLVER.MAX_ITER`` (training progress, passed by the
  box predictor as ``progress`` = iteration / MAX_ITER), instead of an epoch counter;
- only the softmax base for now (the paper also composes PCB with Seesaw and EQLv2, each
  with its own soft-target form, and iterates the box head 3 times with loss weights
  0.2/0.2/0.6; not implemented yet).
"""
import torch
from torch.nn import functional as F

from .base import ClassificationLoss, all_reduce_sum, empty_loss
from .registry import register_loss

__all__ = ["PairwiseClassBalanceLoss"]


@register_loss
class PairwiseClassBalanceLoss(ClassificationLoss):
    name = "pcb"
    config_node = "PCB"
    extra_logits = 1
    softmax_logits = True

    def __init__(self, num_classes, class_stats=None, alpha=0.4, momentum=0.99, start=17 / 24):
        super().__init__(num_classes, class_stats)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"PCB.ALPHA must be in [0, 1], got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"PCB.MOMENTUM must be in [0, 1), got {momentum}")
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"PCB.START must be a fraction of the schedule in [0, 1], got {start}")
        self.alpha, self.momentum, self.start = float(alpha), float(momentum), float(start)
        self.register_buffer("confusion", torch.zeros(num_classes, num_classes))
        self.register_buffer("instance_count", torch.zeros(num_classes, dtype=torch.float64))
        self._last_active = None

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor):
        """Fold this batch's positive RoIs (all processes) into the confusion matrix."""
        num_classes = self.num_classes
        fg = labels < num_classes
        fg_labels = labels[fg]
        probs = F.softmax(logits[fg, :num_classes].float(), dim=1)
        sums = torch.zeros_like(self.confusion).index_add_(0, fg_labels, probs)
        counts = torch.bincount(fg_labels, minlength=num_classes).to(self.instance_count)
        # one collective for both (every process calls it, with or without positives)
        packed = all_reduce_sum(torch.cat([sums.flatten().double(), counts]))
        sums = packed[: num_classes * num_classes].view(num_classes, num_classes).to(self.confusion)
        counts = packed[num_classes * num_classes :]
        present = counts > 0
        if present.any():
            mean = sums[present] / counts[present, None].to(sums)
            rows = self.confusion[present] * self.momentum + mean * (1.0 - self.momentum)
            self.confusion[present] = rows / rows.sum(dim=1, keepdim=True)
        self.instance_count += counts

    def is_active(self, progress) -> bool:
        return progress is not None and progress >= self.start and bool((self.instance_count > 0).all())

    def soft_labels(self, fg_labels: torch.Tensor) -> torch.Tensor:
        """(n, C + 1): column y of the column-normalized confusion matrix, background 0."""
        columns = self.confusion / self.confusion.sum(dim=0, keepdim=True)
        t = columns[:, fg_labels].t()
        return torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1)

    def forward(self, logits, labels, progress=None, **context):
        self._check(logits, labels)
        self.update(logits, labels)  # before the loss, on every process
        active = self.is_active(progress)
        self._last_active = active
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        logits = logits.float()
        num_rois = logits.shape[0]
        if not active:
            return {"loss_cls": F.cross_entropy(logits, labels, reduction="sum") / num_rois}
        fg = labels < self.num_classes
        target = F.one_hot(labels, self.num_logits).to(logits)
        t = self.soft_labels(labels[fg]).to(logits)
        target[fg] = target[fg] * (1.0 - self.alpha) + t * self.alpha
        # soft-target CE, plus α·Σ t log t: the KL form's value (no gradient)
        entropy_term = torch.special.xlogy(t, t).sum() * self.alpha
        loss = F.cross_entropy(logits, target, reduction="sum") + entropy_term
        return {"loss_cls": loss / num_rois}

    def predict_probs(self, logits):
        return F.softmax(logits.float(), dim=-1)

    def activation_logits(self, logits):
        return logits.float()

    def scalars(self):
        if self._last_active is None:
            return {}
        return {"active": float(self._last_active), "classes_seen": float((self.instance_count > 0).sum())}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, alpha={self.alpha}, momentum={self.momentum}, start={self.start}"
