"""
CDB-W, class-wise difficulty-based weighting, in the RoI box predictor: Sinha, Ohashi and Nakamura,
"Class-Wise Difficulty-Balanced Loss for Solving Class-Imbalance", ACCV 2020 ("CDB-CE"), and
"Class-Difficulty Based Methods for Long-Tailed Visual Recognition", IJCV 2022 (CDB-W, with LVIS
Mask R-CNN results).

The authors' public code (hitachi-rd-cv/CDB-loss at 82b0119e) covers image and video classification
only (CIFAR-LT, ImageNet-LT, EGTEA); their organisation publishes no detection code (hitachi-rd-cv/
Difficulty_Net is classification too). The formula, τ rule and reduction are those of their
ImageNet-LT code, shared with the image-classification loss
(:mod:`eqlosses_d2.classification.losses.cdb`: :func:`dynamic_tau`, :func:`cdb_weights`); what a
detection head needs beyond it (the difficulty measure, the background) is ours, stated here.

C + 1 logits, background last (Detectron2's softmax head). With ``d_j = 1 − a_j`` the difficulty
of foreground class j:

    w_j = C · d_j^τ / Σ_k d_k^τ   (j < C),     w_bg = 1,
    L = Σ_i w_{y_i} CE(z_i, y_i) / Σ_i w_{y_i}   over the N sampled RoIs,

the weighted mean of ``torch.nn.CrossEntropyLoss(weight=w)`` (their ``create_loss``) on the C + 1
classes; scores ``softmax(z)`` (no weighting at inference). τ is dynamic, from the spread of the
difficulties (their ImageNet-LT code), ``τ = 2 · sigmoid((1 − min_j d_j) / (1 − max_j d_j + 0.01)
− 1)`` over the C foreground classes, or fixed (``DYNAMIC_TAU: False``, ``TAU``).

The difficulty measure (ours; the authors measure top-1 accuracy on a validation split once per
epoch): ``a_j`` is the top-1 accuracy of the training step's own foreground RoIs of ground-truth
class j, a RoI counting as right when the argmax of its C + 1 logits (torch's ``argmax``, first
index on ties; the background column included, so a foreground RoI taken for background is wrong)
is its class. Background RoIs are not counted: the background is not a class of the difficulty
vector, so it takes no part in τ or in the normalisation, and its weight stays 1, the mean of the
foreground weights (``Σ_j w_j = C``). Measured on the background, its accuracy (high on sampled
RoIs) would give it a weight near 0 and the detector would stop learning to reject proposals.

State (registered float64 buffers, saved in checkpoints; a resume is exact):
``window_correct``, ``window_count`` (C,): right and all foreground RoIs per class of the current
window, summed over processes each step with :func:`.base.sync_state` before they are added (one
collective of 2C float64); ``difficulty`` (C,), ``class_weights`` (C,) and ``tau`` (): what the
last completed window gave; ``num_steps`` (int64): training steps (forward calls) so far. After
every ``UPDATE_PERIOD``-th step, the window's counts set ``d_j = 1 − correct_j / count_j`` (a class
without a foreground RoI in the window keeps its difficulty), τ and the weights are recomputed and
the counts are reset: each window is a fresh measurement, as the authors' per-epoch accuracy. A
step's loss uses the weights from before it (the windows completed before it); its counts go into
the current window. Before the first window is complete the difficulties are ones and the weights
uniform (plain softmax CE), as their ``np.ones(num_classes)``. In the cascade head each stage's
loss measures its own stage's RoIs. A model initialised from a ``cdb_w`` checkpoint
(``MODEL.WEIGHTS``) starts from that checkpoint's weights, window and step count.

Host reads: none under the GPU policy (the counts, the update and τ stay on the device; the step
count has a host mirror, re-read once when a state dict is loaded). Under the CPU policy, the
finite check's one ``bool``.

Defaults: DYNAMIC_TAU True (their ``create_loss`` default), TAU 1.0 (used when DYNAMIC_TAU is off;
their ImageNet-LT config ``tau: 1``), UPDATE_PERIOD 6260 iterations (one pass over LVIS v1 train's
100,170 images at batch 16: the authors measure once per epoch). Config node ``MODEL.EQLOSSES.CDB_W``.

Where ours differs from the authors' code (besides the measure above, theirs being on a
validation split and per epoch):
- a class without foreground RoIs in a window keeps its previous difficulty (their ``shot_acc``
  would drop it and misalign the weights); every difficulty 0 gives uniform weights (theirs 0/0);
  a batch whose labels all weigh 0 gives loss 0 (theirs NaN);
- the counts of every process are summed each step (their classification measurement is made by
  one process on the whole validation split);
- a step whose logits are not finite (GPU policy) adds nothing to the counts, but counts as a step.
"""
import torch
from torch.nn import functional as F

from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .base import ClassificationLoss, empty_loss, gpu_policy, sync_state
from .class_difficulty import cdb_weights, dynamic_tau

__all__ = ["ClassDifficultyWeightedCE"]

_GROUP_NAMES = ("r", "c", "f")


@register(ROI_CLS_LOSS_REGISTRY)
class ClassDifficultyWeightedCE(ClassificationLoss):
    name = "cdb_w"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "CDB-W, class-wise difficulty-based weighting (Sinha et al., ACCV 2020 / IJCV 2022)"
    doc_paper = "LVIS results in the IJCV 2022 paper only (no detection code released); not checked here"
    config_node = "CDB_W"
    extra_logits = 1
    softmax_logits = True

    @classmethod
    def add_config(cls, cfg):
        cls.add_difficulty_keys(config_node(cfg, f"MODEL.EQLOSSES.{cls.config_node}"))

    @staticmethod
    def add_difficulty_keys(_C):
        """The keys of the difficulty measure and weights (CDB-W's node; CDB-S's adds its lag)."""
        # τ from the spread of the class difficulties (2·sigmoid((1 − min d)/(1 − max d + 0.01) − 1)), else TAU
        _C.DYNAMIC_TAU = True
        # fixed τ of the weights d_j^τ (used when DYNAMIC_TAU is False; the authors' ImageNet-LT config: 1)
        _C.TAU = 1.0
        # training steps per difficulty window (accuracy of the training foreground RoIs; the authors: an epoch)
        _C.UPDATE_PERIOD = 6260

    def __init__(self, num_classes, class_stats=None, dynamic_tau=True, tau=1.0, update_period=6260):
        super().__init__(num_classes, class_stats)
        if not tau >= 0:
            raise ValueError(f"CDB_W.TAU must be >= 0, got {tau}")
        if not update_period >= 1 or int(update_period) != update_period:
            raise ValueError(f"CDB_W.UPDATE_PERIOD must be an integer >= 1, got {update_period}")
        self.dynamic_tau = bool(dynamic_tau)
        self.fixed_tau = float(tau)
        self.update_period = int(update_period)
        f64 = torch.float64
        self.register_buffer("difficulty", torch.ones(num_classes, dtype=f64))
        self.register_buffer("class_weights", torch.ones(num_classes, dtype=f64))
        self.register_buffer("tau", self._tau_of(self.difficulty))
        self.register_buffer("window_correct", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("window_count", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        #: the host's copy of ``num_steps`` (re-read when a state dict is loaded)
        self._steps = 0

    def _tau_of(self, difficulty):
        if self.dynamic_tau:
            return dynamic_tau(difficulty)
        return torch.tensor(self.fixed_tau, dtype=torch.float64, device=difficulty.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.num_steps)  # once per load, not per step

    def loss_weights(self, device) -> torch.Tensor:
        """(C + 1,) float32 ``[w_0, ..., w_{C−1}, 1]``: the weights of this step's loss."""
        weights = self.class_weights.to(device=device, dtype=torch.float32)
        return torch.cat([weights, weights.new_ones(1)])

    @torch.no_grad()
    def count(self, logits, labels):
        """(correct, count), (C,) float64 each: this batch's right and all foreground RoIs per class.

        Right: ``argmax`` (first index on ties) equals the label. On the CPU, where ``argmax`` over
        every row is a slow pass (~10 ms at 8192 × 1204, five times ``amax``), the rows whose
        label logit reaches the row's ``amax`` are found first and only those go through ``argmax``
        (the same answer, ties included); the GPU policy takes ``argmax`` over every row (no host
        read)."""
        num_classes = self.num_classes
        stats = torch.zeros(num_classes + 1, 2, dtype=torch.float64, device=labels.device)
        if not labels.numel():
            return stats[:num_classes, 0], stats[:num_classes, 1]
        if gpu_policy(logits.device):
            correct = (logits.argmax(dim=1) == labels).to(torch.float64)
            stats.index_add_(0, labels, torch.stack([correct, torch.ones_like(correct)], dim=1))
        else:
            label_logit = logits.gather(1, labels[:, None]).view(-1)
            candidates = ((label_logit >= logits.amax(dim=1)) & (labels < num_classes)).nonzero().view(-1)
            right = candidates[logits.index_select(0, candidates).argmax(dim=1) == labels[candidates]]
            stats[:, 0].index_add_(0, labels[right], stats.new_ones(right.numel()))
            stats[:, 1].index_add_(0, labels, stats.new_ones(labels.numel()))
        return stats[:num_classes, 0], stats[:num_classes, 1]  # the background row left out

    @torch.no_grad()
    def accumulate(self, correct, count):
        """Add a step's counts (summed over processes) to the window; after every ``update_period``-th
        step, set the difficulties, τ and the weights from the window and reset it."""
        correct, count = sync_state(correct, count, finite=self._finite, dtype=torch.float64)
        self.window_correct += correct
        self.window_count += count
        self.num_steps += 1
        self._steps += 1
        if self._steps % self.update_period == 0:
            self.update_from_window()

    @torch.no_grad()
    def update_from_window(self):
        """``d = 1 − correct / count`` per class seen in the window (others keep theirs), then τ and
        the weights (:func:`cdb_weights`); the window starts again from zero."""
        seen = self.window_count > 0
        accuracy = self.window_correct / self.window_count.clamp(min=1)
        self.difficulty.copy_(torch.where(seen, 1.0 - accuracy, self.difficulty))
        tau = self._tau_of(self.difficulty)
        self.tau.copy_(tau)
        self.class_weights.copy_(cdb_weights(self.difficulty, tau))
        self.window_correct.zero_()
        self.window_count.zero_()

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        labels = labels.long()
        weights = self.loss_weights(logits.device)  # before this step's counts (a new tensor)
        self.accumulate(*self.count(logits.detach(), labels))  # on every process (a collective)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        # Σ_i w_{y_i} CE_i / Σ_i w_{y_i}: torch's weighted mean, with the denominator kept above 0
        weighted_sum = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
        total = weights[labels].sum().clamp(min=torch.finfo(torch.float32).tiny)
        return {"loss_cls": weighted_sum / total}

    def predict_probs(self, logits):
        return F.softmax(logits.float(), dim=-1)

    def activation_logits(self, logits):
        return logits.float()

    def scalars(self):
        """τ, the mean difficulty and the largest weight of the last completed window, and the mean
        weight per r/c/f group when class statistics are set (one host read)."""
        keys = ["tau", "mean_difficulty", "max_weight"]
        values = [self.tau, self.difficulty.mean(), self.class_weights.max()]
        stats = self.class_stats
        if stats is not None and bool(getattr(stats, "is_set", True)):
            groups = stats.frequency_group.to(self.class_weights.device)
            for index, group in enumerate(_GROUP_NAMES):
                in_group = (groups == index).to(torch.float64)
                keys.append(f"mean_weight_{group}")
                values.append((self.class_weights * in_group).sum() / in_group.sum())  # NaN: no class
        return {key: value for key, value in zip(keys, torch.stack(values).tolist()) if value == value}

    def extra_repr(self):
        tau = "dynamic" if self.dynamic_tau else self.fixed_tau
        return f"num_classes={self.num_classes}, tau={tau}, update_period={self.update_period}"
