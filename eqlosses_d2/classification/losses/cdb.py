"""
CDB-W: the class-wise difficulty-balanced (weighted) softmax cross-entropy of Sinha, Ohashi and
Nakamura, "Class-Wise Difficulty-Balanced Loss for Solving Class-Imbalance", ACCV 2020 (their
"CDB-CE"), as its authors' ImageNet-LT code runs it.

Read: hitachi-rd-cv/CDB-loss at commit 82b0119e, ``ImageNet-LT/loss/CDBSoftmaxLoss.py``
(``create_loss``), ``ImageNet-LT/run_networks.py`` (where the difficulty is measured) and the
config ``ImageNet-LT/config/ImageNet_LT/feat_uniform_with_CDBloss.yaml``; for comparison
``CIFAR-LT/losses/cdb_loss.py`` and ``CIFAR-LT/cifar_train.py``.

With ``d_j = 1 − a_j`` the difficulty of class j (``a_j`` its top-1 accuracy on the validation
split, measured every ``UPDATE_PERIOD`` iterations by
:class:`eqlosses_d2.classification.difficulty.ClassDifficultyHook`):

    w_j = C · d_j^τ / Σ_k d_k^τ,      L = Σ_i w_{y_i} CE(z_i, y_i) / Σ_i w_{y_i},

the weighted mean of ``torch.nn.CrossEntropyLoss(weight=w)`` (their ``create_loss``), scored with
``softmax(z)``. τ is fixed (``DYNAMIC_TAU: False``, ``TAU``) or dynamic, from the spread of the
difficulties, as their ImageNet-LT code:

    b = (1 − min_j d_j) / (1 − max_j d_j + 0.01) − 1,      τ = 2 · sigmoid(b)   (0 < τ < 2).

Before the first measurement the difficulties are ones (their ``np.ones(num_classes)``), so the
weights are uniform and the loss is plain CE. The difficulties, weights and τ are float64
buffers, saved in checkpoints; the hook all-reduces the per-class counts before they are set,
so every process holds the same weights.

Defaults: dynamic τ (their ``create_loss`` default; ``TAU`` 1.0 is used when ``DYNAMIC_TAU`` is
off, as their ImageNet-LT config ``tau: 1``), ``UPDATE_PERIOD`` 1000 iterations (their code:
every epoch; the configs set one epoch), ``DIFFICULTY_DATASET`` "" = the ``_val`` split of
``DATASETS.TRAIN[0]`` (``synthetic_cls_lt_train`` → ``synthetic_cls_lt_val``; their code: the
ImageNet-LT val split). Config node ``MODEL.EQLOSSES.CLASSIFICATION.CDB``.

Where ours differs from their code:
- a class without images in the difficulty set keeps its previous difficulty (their
  ``shot_acc`` lists only the classes present, so the list would be shorter than C and the
  weights misaligned);
- all difficulties zero (every validation image right) gives uniform weights (theirs: 0/0, NaN);
  a batch whose labels all have weight 0 gives loss 0 (theirs: NaN);
- the measurement period is in iterations (Detectron2's schedule), not epochs; their code also
  measures after the last epoch, which changes nothing that is used, and we skip it;
- their CIFAR-LT code differs from their ImageNet-LT code: there τ = sigmoid((1 − min d) /
  (1 − max d + 0.01)) (no −1, no factor 2) and the loss is the plain mean over the batch
  ``mean_i w_{y_i} CE_i``; we follow the ImageNet-LT code.
"""
import torch
from torch.nn import functional as F

from ...losses.class_difficulty import cdb_weights, dynamic_tau, tau_from_difficulty  # noqa: F401 (shared)
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss

__all__ = ["ClassDifficultyBalancedCE", "cdb_weights", "dynamic_tau", "tau_from_difficulty"]


@register(IMAGE_CLS_LOSS_REGISTRY)
class ClassDifficultyBalancedCE(ImageClassificationLoss):
    name = "cdb_w"
    config_node = "CDB"
    #: the trainer adds :class:`~eqlosses_d2.classification.difficulty.ClassDifficultyHook`, which
    #: measures each class's accuracy every ``UPDATE_PERIOD`` iterations on ``DIFFICULTY_DATASET``
    #: and passes the counts to :meth:`update_class_accuracy` (not before training: the
    #: difficulties start at ones, as the authors')
    measures_class_difficulty = True

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.CDB")
        # τ from the spread of the class difficulties (2·sigmoid((1 − min d)/(1 − max d + 0.01) − 1)), else TAU
        _C.DYNAMIC_TAU = True
        # fixed τ of the weights d_j^τ (used when DYNAMIC_TAU is False; the authors' ImageNet-LT config: 1)
        _C.TAU = 1.0
        # iterations between two measurements of the class accuracies (the authors: every epoch)
        _C.UPDATE_PERIOD = 1000
        # dataset the accuracies are measured on ("": the _val split of DATASETS.TRAIN[0])
        _C.DIFFICULTY_DATASET = ""

    def __init__(self, num_classes, class_stats=None, dynamic_tau=True, tau=1.0, update_period=1000,
                 difficulty_dataset=""):
        super().__init__(num_classes, class_stats)
        if not tau >= 0:
            raise ValueError(f"CDB.TAU must be >= 0, got {tau}")
        if update_period < 1:
            raise ValueError(f"CDB.UPDATE_PERIOD must be >= 1, got {update_period}")
        self.dynamic_tau = bool(dynamic_tau)
        self.fixed_tau = float(tau)
        # read by the hook (the loss itself never uses them)
        self.update_period = int(update_period)
        self.difficulty_dataset = str(difficulty_dataset)
        self.register_buffer("difficulty", torch.ones(num_classes, dtype=torch.float64))
        self.register_buffer("class_weights", torch.ones(num_classes, dtype=torch.float64))
        # the τ of the current weights (before any measurement: that of the initial difficulties)
        initial_tau = tau_from_difficulty(self.difficulty) if self.dynamic_tau else self.fixed_tau
        self.register_buffer("tau", torch.tensor(initial_tau, dtype=torch.float64))

    @torch.no_grad()
    def update_class_accuracy(self, correct: torch.Tensor, count: torch.Tensor):
        """Set ``d = 1 − correct / count`` (per class, counts over all processes; a class with
        ``count == 0`` keeps its difficulty) and recompute τ and the weights."""
        correct = correct.to(self.difficulty.device, torch.float64)
        count = count.to(self.difficulty.device, torch.float64)
        seen = count > 0
        accuracy = correct / count.clamp(min=1)
        self.difficulty.copy_(torch.where(seen, 1.0 - accuracy, self.difficulty))
        tau = tau_from_difficulty(self.difficulty) if self.dynamic_tau else self.fixed_tau
        self.tau.fill_(tau)
        self.class_weights.copy_(cdb_weights(self.difficulty, tau))

    def difficulty_scalars(self) -> dict:
        """What the hook logs after a measurement."""
        return {"cdb/tau": float(self.tau), "cdb/mean_difficulty": float(self.difficulty.mean())}

    def forward(self, logits, labels):
        self._check(logits, labels)
        labels = labels.long()
        weights = self.class_weights.to(device=logits.device, dtype=torch.float32)
        # Σ_i w_{y_i} CE_i / Σ_i w_{y_i}: torch's weighted mean, with the denominator kept above 0
        weighted_sum = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
        total = weights[labels].sum().clamp(min=torch.finfo(torch.float32).tiny)
        return {"loss_cls": weighted_sum / total}

    def extra_repr(self):
        tau = "dynamic" if self.dynamic_tau else self.fixed_tau
        return (f"num_classes={self.num_classes}, tau={tau}, update_period={self.update_period}, "
                f"difficulty_dataset='{self.difficulty_dataset}'")
