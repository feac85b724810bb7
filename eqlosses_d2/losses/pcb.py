"""
PCB: Pairwise Class Balance (He et al., "Relieving Long-tailed Instance Segmentation via
Pairwise Class Balance", CVPR 2022), composed with a base loss (``base``): softmax CE
(the paper's "RFS + PCB"), Seesaw or EQLv2, as the authors' code does.

State: a C × C confusion matrix M (rows: ground-truth class) and the cumulative count of
positive RoIs per class. Every iteration, *before* the loss, from the positive RoIs of
the batch summed over all processes: for each class c present, ``m_c`` = the mean of the
RoIs' foreground scores, ``M[c] ← μ·M[c] + (1 − μ)·m_c`` (μ = 0.99); M starts at zero.

Active once training has reached ``start`` (a fraction of the schedule; 17/24 in the
paper) and every class has been seen at least once. A positive RoI of class y then gets
a soft label t from column y of M, and the class part of its loss is trained towards
``(1 − α)·onehot(y) + α·t`` (α = 0.4):

- ``softmax``: scores ``softmax(z[:C])``, each updated row renormalized to sum 1;
  ``t_k = M[k, y] / Σ_j M[j, y]`` (background 0);
  ``L = [Σ_bg CE + (1 − α)·Σ_fg CE(z, y) + α·Σ_fg KL(t ‖ softmax(z))] / N``.
  (KL and soft-target CE differ by the constant α·Σ t log t, added so the value is the
  paper's; the gradient of a positive RoI is ``p − (1 − α)·onehot(y) − α·t``.)
- ``seesaw``: as softmax for M and t (scores from the class logits); the class branch is
  Seesaw's CE on its adjusted logits z̃ with the soft target,
  ``(1 − α)·CE(z̃, y) − α·Σ_k t_k log softmax(z̃)_k``; the objectness branch unchanged.
- ``eqlv2``: scores ``σ(z[:C])``, rows *not* renormalized, t = column y of M as is
  (not normalized); EQLv2's weighted BCE with the soft targets on the class channels,
  weights ``q·y + r·(1 − y)`` and gradient statistics from ``|σ − y|`` (the authors'
  ``EQLv2PCBLoss``).

Before activation the base loss alone. N = all sampled RoIs. Inference: the base's.

Differences from the authors' code (megvii-research/PCB, ``*PCBLoss``):

- the per-batch sums are all-reduced (the authors all-gather and sum: the same numbers):
  first the (C,) counts, then, in float32, only the rows of the classes present in some
  process's batch (a few hundred rows of a LVIS batch, instead of the dense C × C matrix,
  11.6 MB in float64); the confusion matrix (float32) and the counts (float64) are
  buffers, saved in checkpoints and restored by ``--resume``;
- the start point is a fraction of ``SOLVER.MAX_ITER`` (training progress, passed by the
  box predictor as ``progress`` = iteration / MAX_ITER), instead of an epoch counter;
- the paper's iterative box head is :class:`LongTailIterativeROIHeads`; as in the
  authors' code each of its passes calls the loss (so the state is updated once per
  pass) with α scaled by pass/(passes − 1).

Host synchronizations of a training step: ``torch.unique`` of the labels and the row
selections (``torch.nonzero``) wait for the device by nature; the only explicit host read,
whether every class has been seen, is taken once training has reached ``start``, and only
until every class has been seen (the counts only grow); in several processes the rows to
reduce (``torch.nonzero`` of the reduced counts) are one more implicit one.
"""
import torch
import torch.distributed as dist
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss, gpu_policy, keep_unless_nonfinite, scaled_stashed_grad, sync_state
from .fused import row_chunks, row_ranges, rows_in_chunks, softmax_
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, lookup, register
from .base import build_loss, loss_hparams_from_cfg

#: base losses PCB composes with, and how each reads scores into the confusion matrix:
#: (score function, renormalize updated rows, column-normalize for the soft labels)
PCB_BASES = {"softmax": ("softmax", True, True), "seesaw": ("softmax", True, True), "eqlv2": ("sigmoid", False, False)}

__all__ = ["PairwiseClassBalanceLoss"]


class _SoftLabelCrossEntropy(torch.autograd.Function):
    """
    ``[−Σ_bg log p_y − Σ_fg ((1 − α) log p_y + α Σ_k t_k log p_k)] / N + α·entropy_term / N``
    (``entropy_term`` = Σ_fg Σ_k t_k log t_k makes it the KL form's value) with its
    analytic gradient ``(p − w_i·onehot(y) − α·t) / N`` (w = 1 − α on positive rows, 1 on
    background rows), in row chunks into one (N, C + 1) buffer (see :mod:`.fused`).

    The soft labels come per class: the foreground row ``fg_rows[k]`` (ascending) has
    ``t = class_t[inverse[k]]``. With log p_k = z_k − lse,
    Σ_fg Σ_k t_k log p_k = Σ_fg t·z − Σ_fg (Σ_k t_k)·lse; the first sum, ``soft_dot``, is
    per class Σ_u t_u·(Σ_{i: y_i = u} z_i), from the class sums of the logits.
    """

    @staticmethod
    def forward(ctx, logits, labels, fg_rows, class_t, inverse, soft_dot, alpha, entropy_term):
        num_rows, num_classes = logits.shape[0], class_t.shape[1]
        scale = 1.0 / num_rows
        class_t_sum = class_t.sum(dim=1)
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        chunks = row_chunks(logits)
        if gpu_policy(logits.device):
            # no host read of the rows per chunk: the positives' terms over all rows after the loop
            row_weight = torch.ones(num_rows, dtype=logits.dtype, device=logits.device)
            row_weight.index_fill_(0, fg_rows, 1.0 - alpha)
            lse = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
            for start, stop in chunks:
                g, rows = grad[start:stop], labels[start:stop, None]
                g.copy_(logits[start:stop])
                logit_y = g.gather(1, rows).squeeze(1)
                weight = row_weight[start:stop]
                lse[start:stop] = softmax_(g, scale)  # g: p / N
                total += (weight * (lse[start:stop] - logit_y)).sum()
                g.scatter_add_(1, rows, weight.mul(-scale)[:, None])
            total += alpha * (class_t_sum.index_select(0, inverse) * lse.index_select(0, fg_rows)).sum()
            grad[:, :num_classes].index_add_(0, fg_rows, class_t.index_select(0, inverse), alpha=-alpha * scale)
        else:
            for (start, stop), (first, last) in zip(chunks, rows_in_chunks(fg_rows, chunks)):
                g, rows = grad[start:stop], labels[start:stop, None]
                g.copy_(logits[start:stop])
                logit_y = g.gather(1, rows).squeeze(1)
                local, which = fg_rows[first:last] - start, inverse[first:last]
                weight = torch.ones(stop - start, dtype=g.dtype, device=g.device).index_fill_(0, local, 1.0 - alpha)
                lse = softmax_(g, scale)  # g: p / N
                total += (weight * (lse - logit_y)).sum()
                total += alpha * (class_t_sum.index_select(0, which) * lse.index_select(0, local)).sum()
                g.scatter_add_(1, rows, weight.mul_(-scale)[:, None])
                g[:, :num_classes].index_add_(0, local, class_t.index_select(0, which), alpha=-alpha * scale)
        total += alpha * (entropy_term - soft_dot)
        ctx.grad = grad  # handed to autograd (not copied) in backward
        return (total * scale).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return scaled_stashed_grad(ctx, grad_output, "PCB loss"), None, None, None, None, None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class PairwiseClassBalanceLoss(ClassificationLoss):
    name = "pcb"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = (
        'PCB (He et al., CVPR 2022) on softmax CE, Seesaw or EQLv2 (`PCB.BASE`); its iterative box head is '
        '`MODEL.ROI_HEADS.NAME LongTailIterativeROIHeads`'
    )
    doc_paper = 'RFS + PCB 2x: mask AP 26.5; Seesaw + PCB: 27.2 (APr 19.0)'
    config_node = "PCB"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.PCB")
        # Base loss PCB composes with: "softmax", "seesaw" or "eqlv2" (its own node's keys apply).
        _C.BASE = "softmax"
        # α of PCB: positive RoIs' loss (1 − α)·CE + α·KL(soft label ‖ prediction).
        _C.ALPHA = 0.4
        # μ of the confusion matrix's moving average, M[c] ← μ·M[c] + (1 − μ)·batch mean.
        _C.MOMENTUM = 0.99
        # Fraction of SOLVER.MAX_ITER after which the soft labels are used (the paper: 17/24).
        _C.START = 17 / 24

    def __init__(self, num_classes, class_stats=None, base="softmax", alpha=0.4, momentum=0.99, start=17 / 24,
                 *, base_hparams=None):
        super().__init__(num_classes, class_stats)
        if base not in PCB_BASES:
            raise ValueError(f"PCB.BASE must be one of {', '.join(PCB_BASES)}, got '{base}'")
        self.base_name = base
        self.base = build_loss(base, num_classes, class_stats=class_stats, **(base_hparams or {}))
        self.extra_logits = self.base.extra_logits
        self.family = self.base.family
        self.softmax_logits = self.base.softmax_logits
        self._score, self._renormalize_rows, self._normalize_columns = PCB_BASES[base]
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
        self._seen_every_class = False  # cached once true: the counts only grow

    @classmethod
    def hparams_from_cfg(cls, eqlosses_cfg) -> dict:
        """PCB's node, plus the base loss's own node as ``base_hparams``."""
        hparams = loss_hparams_from_cfg(cls, eqlosses_cfg)
        if hparams["base"] not in PCB_BASES:
            raise ValueError(f"PCB.BASE must be one of {', '.join(PCB_BASES)}, got '{hparams['base']}'")
        hparams["base_hparams"] = lookup(ROI_CLS_LOSS_REGISTRY, hparams["base"]).hparams_from_cfg(eqlosses_cfg)
        return hparams

    def classifier_bias_init(self):
        return self.base.classifier_bias_init()

    @torch.no_grad()
    def update_confusion_and_gather(self, logits: torch.Tensor, labels: torch.Tensor, logit_sums: bool = False):
        """
        Two things in one pass over the positive RoIs: folds this batch's positives (all
        processes) into the confusion matrix and the counts (the state), and gathers what the
        loss needs of them: this process's distinct positive classes (U,), each positive's
        index into them and, with ``logit_sums``, the per-class sums of the positives' class
        logits (U, C) (else None).
        """
        num_classes = self.num_classes
        fg_rows = torch.nonzero(labels < num_classes, as_tuple=True)[0]
        fg_labels = labels[fg_rows]
        counts = torch.bincount(fg_labels, minlength=num_classes).to(self.instance_count)
        present, inverse = torch.unique(fg_labels, return_inverse=True)
        sums = torch.zeros(present.numel(), num_classes, dtype=torch.float32, device=logits.device)
        class_logit_sums = torch.zeros_like(sums) if logit_sums else None
        # the positives' class scores, summed per class, a cache-sized block of rows at a time
        class_logits = logits[:, :num_classes]
        for first, last in row_ranges(fg_rows.numel(), num_classes, logits.device):
            scores = torch.index_select(class_logits, 0, fg_rows[first:last]).float()
            if logit_sums:
                class_logit_sums.index_add_(0, inverse[first:last], scores)
            if self._score == "softmax":
                softmax_(scores)
            else:
                scores.sigmoid_()
            sums.index_add_(0, inverse[first:last], scores)
        finite = self._finite  # GPU policy: leave out a batch of non-finite logits, without a host read
        batch_counts = keep_unless_nonfinite(finite, counts)
        updated = present
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # the counts, then only the rows of the classes present in some process, in float32
            # (every process calls both collectives, the same rows in the same order)
            batch_counts = sync_state(batch_counts)[0]
            updated = torch.nonzero(batch_counts > 0, as_tuple=True)[0]
            if updated.numel():
                # this process's classes are among them (sorted, as torch.unique's)
                slot = torch.searchsorted(updated, present).clamp_(max=updated.numel() - 1)
                rows = torch.zeros(updated.numel(), num_classes, dtype=torch.float32, device=sums.device)
                rows.index_add_(0, slot, keep_unless_nonfinite(finite, sums.float()))
                sums = sync_state(rows)[0].to(self.confusion)
        if updated.numel():
            old_rows = self.confusion.index_select(0, updated)
            # μ·M[c] + (1 − μ)·mean_c, in place on the sums
            rows = sums.mul_(((1.0 - self.momentum) / batch_counts[updated]).to(sums)[:, None])
            rows.add_(old_rows, alpha=self.momentum)
            if self._renormalize_rows:
                rows.mul_(rows.sum(dim=1, keepdim=True).reciprocal_())
            if finite is not None and not distributed:
                rows = torch.where(finite, rows, old_rows)
            self.confusion.index_copy_(0, updated, rows)
        self.instance_count += batch_counts
        return present, inverse, class_logit_sums

    def _load_from_state_dict(self, *args, **kwargs):
        self._seen_every_class = False  # new counts
        super()._load_from_state_dict(*args, **kwargs)

    def seen_every_class(self) -> bool:
        """Whether every class has had a positive RoI (a host read, taken until it is true)."""
        if not self._seen_every_class:
            self._seen_every_class = bool((self.instance_count > 0).all())
        return self._seen_every_class

    def is_active(self, progress) -> bool:
        return progress is not None and progress >= self.start and self.seen_every_class()

    def class_soft_labels(self, classes: torch.Tensor) -> torch.Tensor:
        """(U, C): the soft label of each class of ``classes``, its column of the confusion
        matrix as a row (normalized for softmax bases), one column gather per class."""
        t = self.confusion.index_select(1, classes).t().contiguous()
        if self._normalize_columns:
            t.mul_(t.sum(dim=1, keepdim=True).reciprocal_())
        return t

    def forward(self, logits, labels, progress=None, pass_index=None, num_passes=1, **context):
        """``progress``: training progress in [0, 1] (None: never active). With the
        iterative head (``num_passes`` > 1) pass i uses α·i/(num_passes − 1), as the authors."""
        self._check(logits, labels)
        alpha = self.alpha
        if num_passes > 1 and pass_index is not None:
            alpha = self.alpha * pass_index / (num_passes - 1)
        # before the loss, on every process; the fused kernel below needs the class sums of
        # the positives' logits, gathered with the scores
        may_be_active = self.base_name == "softmax" and progress is not None and progress >= self.start
        present, inverse, class_logit_sums = self.update_confusion_and_gather(logits, labels, logit_sums=may_be_active)
        active = self.is_active(progress)
        self._last_active = active
        if self.base_name != "softmax":
            self.base.scalars_wanted = self.scalars_wanted
            class_target = None
            if active:
                fg_labels = labels[labels < self.num_classes]
                class_target = F.one_hot(fg_labels, self.num_classes).to(self.confusion) * (1.0 - alpha)
                class_target += self.class_soft_labels(present).index_select(0, inverse) * alpha
            return self.base(logits, labels, class_target=class_target)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        logits = logits.float()
        num_rois = logits.shape[0]
        if not active:
            return {"loss_cls": F.cross_entropy(logits, labels, reduction="sum") / num_rois}
        fg_rows = torch.nonzero(labels < self.num_classes, as_tuple=True)[0]
        class_t = self.class_soft_labels(present).to(logits)  # (U, C), background 0
        # Σ_fg Σ_k t log t, per class (0 log 0 = 0: the clamp only meets t = 0); Σ_fg t·z
        t_log_t = (class_t * class_t.clamp(min=torch.finfo(class_t.dtype).tiny).log()).sum(dim=1)
        entropy_term = t_log_t.double().index_select(0, inverse).sum()
        soft_dot = (class_t * class_logit_sums).sum(dtype=torch.float64)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = _SoftLabelCrossEntropy.apply(
                logits.contiguous(), labels.long(), fg_rows, class_t, inverse, soft_dot, alpha, entropy_term
            )
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return self.base.predict_probs(logits)

    def activation_logits(self, logits):
        return self.base.activation_logits(logits)

    def scalars(self):
        if self._last_active is None:
            return {}
        out = dict(self.base.scalars())
        out.update({"active": float(self._last_active), "classes_seen": float((self.instance_count > 0).sum().item())})
        return out

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, base={self.base_name!r}, alpha={self.alpha}, "
                f"momentum={self.momentum}, start={self.start}")
