"""
Federated loss (Zhou et al., "Probabilistic two-stage detection", CenterNet2), as in
Detectron2 main (``FastRCNNOutputLayers.get_fed_loss_classes`` and
``sigmoid_cross_entropy_loss``, weights from ``get_fed_loss_cls_weights``).

Sigmoid BCE restricted, per batch, to a class set S:
``L = Σ_i Σ_{j ∈ S} BCE(z_ij, y_ij) / N``. S holds the labels present among the sampled
RoIs, *the background index C included when a background RoI is present*, plus classes
drawn without replacement with probability ∝ ``image_count ** freq_weight_power`` until
``|S| = num_fed_classes``; the background index then takes one of the places, so 49
foreground classes are used with the default 50 (exactly as Detectron2 main).
Inference ``p_j = σ(z_j)``. No state; the weights are static (from the class statistics).

Defaults (Detectron2 main's ``ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES`` and
``FED_LOSS_FREQ_WEIGHT_POWER``): num_fed_classes = 50, freq_weight_power = 0.5;
prior_prob = 0.01, the classifier bias ``−log((1 − π)/π)`` of the authors' CenterNet2
head (``ROI_BOX_HEAD.PRIOR_PROB``). Detectron2 main leaves that bias at 0
(prior_prob = 0.5 reproduces it); on the tiny synthetic schedule a zero bias pushed
every class logit to about −40 within 8 iterations, so the authors' init is the default.

Differences from Detectron2 main:

- C logits, not C + 1: main's sigmoid CE allocates a background logit and drops it
  (``pred_class_logits[:, :-1]``); it gets no gradient and its column is never read by
  ``fast_rcnn_inference``. The loss value and the gradient of the C class logits are
  the same as main's given the same C logits and the same torch random state (the
  draw is the same ``torch.multinomial`` call on the same weights); the background
  column of :meth:`predict_probs` is ``1 - max_j p_j`` as for the other sigmoid losses.
- the loss and its gradient come from one fused computation over all C columns with
  weight 1 on the columns of S and 0 elsewhere (:func:`~.fused.weighted_sigmoid_bce`),
  instead of main's masked BCE through autograd: the same value and gradient up to float
  rounding, in one pass over the logits.
- when fewer classes have a positive weight than places are left (fewer than 50
  classes, or classes never seen, ``image_count`` = 0), all positive-weight classes are
  taken and nothing is drawn. Main's ``torch.multinomial`` then fills the remaining
  places with zero-weight indices (what torch does on CPU): present classes or the
  background index, which change nothing, but also never-seen classes, which S here
  never holds. With LVIS v1 (every class has images, C ≫ 50) the two never differ.
- the class weights come from the model's class statistics (``image_count``), not from
  the ``class_image_count`` metadata of ``DATASETS.TRAIN``; the counts are the same.

Host reads of a training step: none when more classes have images than the batch's labels
and the places left need (LVIS); otherwise one, the number of classes left to draw from
(``torch.multinomial`` without replacement needs as many positive weights as draws). The
number of classes with images is read once per state of the statistics.
"""
import torch

from .base import ClassificationLoss, empty_loss
from .fused import weighted_sigmoid_bce
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register
from .sigmoid import prior_bias, with_background_column

__all__ = ["FederatedLoss", "federated_classes"]


def federated_classes(labels: torch.Tensor, num_fed_classes: int, num_classes: int, class_weight: torch.Tensor,
                      num_weighted_classes=None):
    """
    The class set S of one batch: the unique labels (the background index ``num_classes``
    included when present), then negatives drawn without replacement with probability
    ∝ ``class_weight`` (C,) until ``|S| = num_fed_classes``. Returns a 1-D int64 tensor
    (unique labels sorted first, then the drawn classes in draw order).
    ``num_weighted_classes``: the number of classes with a positive weight, if known; when
    enough of them remain whatever the labels (at least the places left plus the labels),
    the draw needs no host read of how many remain.
    """
    unique_labels = torch.unique(labels)
    num_missing = num_fed_classes - len(unique_labels)
    if num_missing <= 0:
        return unique_labels
    prob = unique_labels.new_zeros(num_classes + 1, dtype=torch.float32)
    prob[:num_classes] = class_weight.to(device=prob.device, dtype=torch.float32)
    prob[unique_labels] = 0
    if num_weighted_classes is not None and num_weighted_classes - len(unique_labels) > num_missing:
        return torch.cat([unique_labels, torch.multinomial(prob, num_missing, replacement=False)])
    num_candidates = int((prob > 0).sum())
    if num_candidates <= num_missing:
        sampled = torch.nonzero(prob > 0, as_tuple=True)[0]
    else:
        sampled = torch.multinomial(prob, num_missing, replacement=False)
    return torch.cat([unique_labels, sampled])


@register(ROI_CLS_LOSS_REGISTRY)
class FederatedLoss(ClassificationLoss):
    name = "federated"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "Federated loss (CenterNet2; Detectron2 main's semantics)"
    doc_paper = 'CenterNet2 1x RFS box AP 26.5 → 28.3'
    config_node = "FEDERATED"
    extra_logits = 0
    family = "sigmoid"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.FEDERATED")
        # |S|: classes in the loss per batch, the background index counted when present (as Detectron2 main).
        _C.NUM_FED_CLASSES = 50
        # Extra classes are drawn with probability ∝ image_count ** power.
        _C.FREQ_WEIGHT_POWER = 0.5
        # Classifier bias init -log((1 - π) / π) (CenterNet2's 0.01); 0.5 gives main's zero bias.
        _C.PRIOR_PROB = 0.01

    def __init__(self, num_classes, class_stats=None, num_fed_classes=50, freq_weight_power=0.5, prior_prob=0.01):
        super().__init__(num_classes, class_stats)
        if num_fed_classes < 1:
            raise ValueError(f"federated: NUM_FED_CLASSES must be >= 1, got {num_fed_classes}")
        self.num_fed_classes = int(num_fed_classes)
        self.freq_weight_power = float(freq_weight_power)
        self.prior_prob = float(prior_prob)
        prior_bias(1, self.prior_prob)  # validates it
        self._last_num_fg_classes = None

    def classifier_bias_init(self):
        return prior_bias(self.num_logits, self.prior_prob)

    def class_weight(self) -> torch.Tensor:
        """(C,) float32 sampling weights ``image_count ** freq_weight_power``."""
        stats = self.require_class_stats()
        return stats.image_count.float() ** self.freq_weight_power

    def num_weighted_classes(self, weight: torch.Tensor) -> int:
        """How many classes have a positive weight: a host read once per state of the
        statistics (``image_count``'s version counter), not every iteration."""
        counts = self.class_stats.image_count
        cached = getattr(self, "_num_weighted", None)
        if cached is None or cached[0] is not counts or cached[1] != counts._version:
            cached = (counts, counts._version, int((weight > 0).sum()))
            self._num_weighted = cached
        return cached[2]

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        weight = self.class_weight()
        self._last_num_fg_classes = None
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        num_classes = logits.shape[1]
        fed_classes = federated_classes(
            labels, self.num_fed_classes, num_classes, weight, self.num_weighted_classes(weight)
        )
        fed_classes = fed_classes[fed_classes < num_classes]  # the background index takes a place, no column
        self._last_num_fg_classes = fed_classes.numel()
        # BCE over the columns of S: every other column has weight 0 (a RoI's own class is in S)
        in_set = torch.zeros(num_classes, dtype=torch.float32, device=logits.device)
        in_set[fed_classes] = 1.0
        loss = weighted_sigmoid_bce(logits, labels, bg_weight=in_set, fg_weight=in_set)
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return with_background_column(torch.sigmoid(logits.float()))

    def scalars(self):
        if self._last_num_fg_classes is None:
            return {}
        return {"num_classes_in_loss": float(self._last_num_fg_classes)}

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, num_fed_classes={self.num_fed_classes}, "
            f"freq_weight_power={self.freq_weight_power}, prior_prob={self.prior_prob}"
        )
