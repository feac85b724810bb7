"""
LOCE's equilibrium loss, EBL (Feng et al., "Exploring Classification Equilibrium in
Long-Tailed Object Detection", ICCV 2021).

A C + 1 softmax whose logits are shifted by the log of the running mean classification
score of each class, s_j (background fixed at 0.01):

    P_j = s_j exp(z_j) / Σ_k s_k exp(z_k),    L = −Σ_i log P_{i, y_i} / N

i.e. ``CE(z + log s, y)``: a pairwise margin log(s_y / s_j) that favours classes the
detector scores low. Inference: the plain softmax of z.

Mean scores (state, updated *before* the loss, from the current forward pass): an
*entry* is one ground-truth instance matched by at least one positive RoI, with the mean,
over those RoIs, of the plain softmax score of its class (detached). The entries of all
processes are pooled; for a class c with n entries,

    s_c ← α^n · s_c + (1 − α^n) · mean of its entries,    α = 0.9, s initialised to 0.01.

The box predictor forms the entries (``instance_labels``, ``instance_means``) by grouping
each image's positive RoIs by their matched ground-truth box; LOCE's memory-augmented
feature sampling adds one entry per sampled class.

Differences from the authors' code (fcjian/LOCE): the entries are pooled across
processes as per-class sums and counts (an all-reduce) instead of an all-gather of the
entries (the same update); ``mean_score`` is a buffer, so it is saved in checkpoints and
restored exactly by ``--resume`` (the authors keep it as a plain tensor, reset to 0.01
when training restarts); the cross-entropy and its analytic gradient come from one
fused computation (:func:`~.fused.affine_softmax_cross_entropy`), the same values as
autograd's.
"""
import torch
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss, sync_state
from .fused import affine_softmax_cross_entropy
from .gradient_stats import frequency_group_means
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["EquilibriumLoss"]


@register(ROI_CLS_LOSS_REGISTRY)
class EquilibriumLoss(ClassificationLoss):
    name = "equilibrium"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = (
        'LOCE (Feng et al., ICCV 2021): the equilibrium loss (running mean scores per class); with '
        '`MODEL.ROI_HEADS.NAME LongTailLOCEROIHeads` also memory-augmented feature sampling; the decoupled '
        'fine-tune protocol: `configs/*/loce_*`'
    )
    doc_paper = 'LOCE (EBL + MFS, fine-tuned from a 2x baseline): mask AP 26.6 (APr 18.5), box 27.4'
    config_node = "EQUILIBRIUM"
    extra_logits = 1
    softmax_logits = True
    #: the box predictor passes the per-instance mean scores (``instance_labels``, ``instance_means``)
    needs_instance_scores = True

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.EQUILIBRIUM")
        # α of LOCE's mean-score update, s_c ← α^n s_c + (1 − α^n)·mean of the class's n entries.
        _C.ALPHA = 0.9
        # The background's fixed "mean score".
        _C.BACKGROUND_SCORE = 0.01
        # Every class's mean score before its first entry.
        _C.INITIAL_SCORE = 0.01

    def __init__(self, num_classes, class_stats=None, alpha=0.9, background_score=0.01, initial_score=0.01):
        super().__init__(num_classes, class_stats)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EQUILIBRIUM.ALPHA must be in [0, 1), got {alpha}")
        if not (background_score > 0 and initial_score > 0):
            raise ValueError("EQUILIBRIUM.BACKGROUND_SCORE and INITIAL_SCORE must be > 0")
        self.alpha, self.background_score = float(alpha), float(background_score)
        mean_score = torch.full((num_classes + 1,), float(initial_score))
        mean_score[num_classes] = self.background_score
        self.register_buffer("mean_score", mean_score)

    @torch.no_grad()
    def update(self, instance_labels: torch.Tensor, instance_means: torch.Tensor, finite=None):
        """Fold this iteration's entries (all processes) into the mean scores. ``finite``:
        None, or a 0-dim bool tensor (GPU policy): when false this process adds no entry.
        No host synchronization: the classes without entries keep their score through a
        ``torch.where`` instead of a host-side test."""
        num_classes = self.num_classes
        sums = torch.zeros(num_classes, dtype=torch.float64, device=self.mean_score.device)
        counts = torch.zeros_like(sums)
        if instance_labels.numel():
            labels = instance_labels.to(sums.device)
            sums.index_add_(0, labels, instance_means.to(sums))
            counts.index_add_(0, labels, torch.ones_like(sums[labels]))
        # every process, entries or not
        sums, counts = sync_state(sums, counts, finite=finite)
        keep = torch.pow(torch.full_like(counts, self.alpha), counts)  # 1 where a class has no entry
        old = self.mean_score[:num_classes].double()
        mean = sums / counts.clamp(min=1.0)
        self.mean_score[:num_classes] = torch.where(counts > 0, keep * old + (1 - keep) * mean, old).to(
            self.mean_score
        )
        self.mean_score[num_classes] = self.background_score

    def forward(self, logits, labels, instance_labels=None, instance_means=None, **context):
        self._check(logits, labels)
        if instance_labels is None:
            raise ValueError(
                "loss 'equilibrium' needs per-instance mean scores (instance_labels, instance_means): "
                "use it through eqlosses_d2's box predictor"
            )
        if self.training:
            self.update(instance_labels, instance_means, finite=self._finite)  # before the loss
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": affine_softmax_cross_entropy(logits, labels, shift=self.mean_score.log())}

    def predict_probs(self, logits):
        return F.softmax(logits.float(), dim=-1)

    def activation_logits(self, logits):
        return logits.float()

    def scalars(self):
        """Mean of the classes' mean scores, overall and per r/c/f group (one host synchronization)."""
        return frequency_group_means(self.mean_score[: self.num_classes], self.class_stats, "mean_score")

    def extra_repr(self):
        return f"num_classes={self.num_classes}, alpha={self.alpha}, background_score={self.background_score}"


def instance_mean_scores(logits: torch.Tensor, labels: torch.Tensor, instance_ids: torch.Tensor, num_classes: int):
    """
    LOCE's entries from one batch: for each instance id (one per matched ground-truth
    instance; −1 for background RoIs), its class and the mean over its RoIs of the plain
    softmax score of that class (detached). Returns (labels (E,), means (E,)). No host read
    (the row selection and ``torch.unique`` wait for the device by nature).
    """
    with torch.no_grad():
        fg = (labels < num_classes) & (instance_ids >= 0)
        scores = F.softmax(logits[fg].float(), dim=1).gather(1, labels[fg][:, None]).squeeze(1)
        ids, inverse = torch.unique(instance_ids[fg], return_inverse=True)
        sums = torch.zeros(ids.numel(), dtype=torch.float32, device=logits.device).index_add_(0, inverse, scores)
        counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(scores))
        entry_labels = torch.zeros(ids.numel(), dtype=labels.dtype, device=labels.device)
        entry_labels[inverse] = labels[fg]
        return entry_labels, sums / counts
