"""
CDB-S, class-wise difficulty-based sampling, in the RoI box predictor: Sinha, Ohashi and Nakamura,
"Class-Difficulty Based Methods for Long-Tailed Visual Recognition", IJCV 2022 (CDB-S, the sampling
half of the paper; CDB-W, its weighting half, is :mod:`.cdb_w`).

CDB-S changes which images a training step sees, not the loss: the loss is Detectron2's softmax CE
on the C + 1 logits (background last), unweighted, and scores are ``softmax(z)``. What this module
adds to it is the measurement the sampler needs, the same as CDB-W's (see :mod:`.cdb_w`, whose
class this one extends): ``d_j = 1 − a_j``, ``a_j`` the top-1 accuracy of the training step's own
foreground RoIs of class j (argmax over the C + 1 logits) over a window of ``UPDATE_PERIOD``
steps, summed over processes; after each window τ (dynamic, or fixed) and the class weights

    w_j = C · d_j^τ / Σ_k d_k^τ

are recomputed (:func:`.class_difficulty.cdb_weights`, the authors' ImageNet-LT formula). The
sampler, :class:`eqlosses_d2.data.cdb_sampler.ClassDifficultyTrainingSampler`
(``DATALOADER.SAMPLER_TRAIN: "ClassDifficultyTrainingSampler"``), draws a class with probability
``w_j / Σ w`` and then one of the training images that contain it, uniformly; before the first
window is complete every ``d_j`` is 1 and the weights uniform, so the sampler starts as class-aware
sampling (a class uniformly, then an image of it). The two come together: ``cdb_s`` without the
sampler would be plain softmax CE with a meter, and the sampler needs this loss's weights (both
are one-line config errors).

State (registered float64 buffers, checkpointed, synchronised like CDB-W's): CDB-W's
``difficulty``, ``class_weights``, ``tau``, ``window_correct``, ``window_count``, ``num_steps``, and
``previous_class_weights``: the weights of the window before the last, which the sampler still
uses for up to ``SAMPLER_LAG`` iterations after a window closes (so a resumed run can re-create the
sample stream exactly: see the sampler's module).

Defaults: DYNAMIC_TAU True, TAU 1.0 (used when DYNAMIC_TAU is off), UPDATE_PERIOD 6260 iterations
(one pass over LVIS v1 train at batch 16: the authors measure once per epoch), SAMPLER_LAG 50
iterations. Config node ``MODEL.EQLOSSES.CDB_S``.

Where ours differs from the paper (the authors released no sampler code, hitachi-rd-cv/CDB-loss at
82b0119e has CDB-W only, and the paper's text could not be read from this machine, only its
abstract; the sampling rule above is our reading of "sampling by class difficulty"):
- the difficulty is measured on the training RoIs per window of iterations, as for CDB-W (the
  authors measure accuracy on a validation split once per epoch);
- a detection image holds several classes; we draw the class first and then an image of it (as
  class-aware sampling for detection does), so an image's chance grows with each of its classes;
- a window's weights reach the sampler ``SAMPLER_LAG`` iterations after the window closes (the
  data loader reads ahead of the training step; a lag keeps the stream deterministic).
"""
import torch
from torch.nn import functional as F

from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .base import empty_loss
from .cdb_w import ClassDifficultyWeightedCE

__all__ = ["ClassDifficultySampledCE"]


@register(ROI_CLS_LOSS_REGISTRY)
class ClassDifficultySampledCE(ClassDifficultyWeightedCE):
    name = "cdb_s"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "CDB-S, class-wise difficulty-based sampling (Sinha et al., IJCV 2022)"
    doc_paper = "LVIS results in the IJCV 2022 paper only (no sampler code released); not checked here"
    config_node = "CDB_S"
    #: the data sampler reads :meth:`sampling_weights` (``eqlosses_d2.data.cdb_sampler``)
    drives_class_difficulty_sampler = True
    #: the sampler that draws by this loss's weights (``eqlosses_d2.data.cdb_sampler.SAMPLER_NAME``)
    required_config = (("DATALOADER.SAMPLER_TRAIN", "ClassDifficultyTrainingSampler"),)

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.CDB_S")
        cls.add_difficulty_keys(_C)  # DYNAMIC_TAU, TAU, UPDATE_PERIOD: CDB-W's
        # iterations after a window closes before the sampler draws with its weights (the loader reads ahead)
        _C.SAMPLER_LAG = 50

    def __init__(self, num_classes, class_stats=None, dynamic_tau=True, tau=1.0, update_period=6260, sampler_lag=50):
        super().__init__(num_classes, class_stats, dynamic_tau=dynamic_tau, tau=tau, update_period=update_period)
        if not sampler_lag >= 1 or int(sampler_lag) != sampler_lag:
            raise ValueError(f"CDB_S.SAMPLER_LAG must be an integer >= 1, got {sampler_lag}")
        self.sampler_lag = int(sampler_lag)
        self.register_buffer("previous_class_weights", torch.ones(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update_from_window(self):
        self.previous_class_weights.copy_(self.class_weights)
        super().update_from_window()

    @torch.no_grad()
    def reset_state(self):
        """Back to the state of a run's first step (ones, an empty window, step 0)."""
        for name in ("difficulty", "class_weights", "previous_class_weights"):
            getattr(self, name).fill_(1.0)
        self.window_correct.zero_()
        self.window_count.zero_()
        self.tau.copy_(self._tau_of(self.difficulty))
        self.num_steps.zero_()
        self._steps = 0

    def sampling_weights(self):
        """``(completed_windows, current, previous)``: how many windows have closed (one host read)
        and the (C,) float64 weights of the last and of the one before (ones before any)."""
        return int(self.num_steps) // self.update_period, self.class_weights, self.previous_class_weights

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        labels = labels.long()
        self.accumulate(*self.count(logits.detach(), labels))  # on every process (a collective)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": F.cross_entropy(logits.float(), labels)}

    def extra_repr(self):
        return super().extra_repr() + f", sampler_lag={self.sampler_lag}"
