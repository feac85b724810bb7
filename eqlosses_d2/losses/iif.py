"""
IIF: Inverse Image Frequency (Alexandridis et al., "Inverse Image Frequency for
Long-tailed Image Recognition", IEEE TIP 2023).

Multiplicative per-class weights on the logits of a C + 1 softmax classifier, in
training and at inference: ``L = CE(w ⊙ z, y)`` averaged over the N RoIs,
``p = softmax(w ⊙ z)``, ``w_bg = 1``. With n_c the training image count of class c and
M the number of training images (all images of the annotation file, 100,170 on LVIS v1
train), the variants are

============  ==================================
raw           ``log(M / n_c)``  (default)
smooth        ``log((M + 1) / (n_c + 1)) + 1``
prob          ``log((M − n_c) / n_c)``
normit        ``−Φ⁻¹(n_c / M)``
gombit        ``−log(−log(1 − n_c / M))``
base2         ``log2(M / n_c)``
base10        ``log10(M / n_c)``
============  ==================================

and ``<variant>_obj`` the same with instance counts: n_c the number of instances of
class c, M the number of instances of all classes (1,270,141 on LVIS v1 train). These
reproduce the authors' weight tables (``lvis_files/idf_1204.csv``). No adaptive state:
the weights follow the model's class statistics.

Guards (the authors' tables have no such class, so nothing changes on LVIS): a class
never seen (n_c = 0) would get an infinite weight, and n_c = M an infinite one under
prob, normit and gombit. n_c is clamped to [1, M] (raw, base2, base10) or [1, M − 1]
(prob, normit, gombit) before the formula; smooth is finite for every n_c in [0, M]
and is left as is. So a never-seen class gets the weight of a class seen once. Note
that raw gives w = 0 to a class in every image, and prob, normit and gombit give
negative weights to classes in more than half (1 − 1/e for gombit) of the images, as
the formulas do.

Differences from the authors' code: the weights are computed from the class
statistics (in float64, then used in float32) instead of read from a csv file, and
follow the model's statistics (a checkpoint carries them, so inference needs no json);
``iif_weights`` is the pure function (reused by post-hoc calibration). The loss and its
analytic gradient ``w ⊙ (softmax(w ⊙ z) − y) / N`` come from one fused computation
(:func:`~.fused.affine_softmax_cross_entropy`: the same values as autograd through the
product and the CE, in cache-sized row chunks). M ≥ 2 is assumed.
"""
import torch
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss
from .fused import affine_softmax_cross_entropy
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["IIFLoss", "IIF_VARIANTS", "iif_weights"]

_BASE_VARIANTS = ("raw", "smooth", "prob", "normit", "gombit", "base2", "base10")
IIF_VARIANTS = _BASE_VARIANTS + tuple(v + "_obj" for v in _BASE_VARIANTS)


def iif_weights(counts, total, variant: str = "raw") -> torch.Tensor:
    """
    (C,) float64 IIF weights from per-class ``counts`` (image or instance counts) and
    ``total`` (M: all images, or all instances). ``variant`` is one of
    :data:`IIF_VARIANTS`; an ``_obj`` suffix is accepted and ignored here (the caller
    passes instance counts). Counts are clamped as the module docstring says.
    """
    base = variant[: -len("_obj")] if variant.endswith("_obj") else variant
    if base not in _BASE_VARIANTS:
        raise ValueError(f"iif: unknown VARIANT '{variant}' (known: {', '.join(IIF_VARIANTS)})")
    counts = torch.as_tensor(counts).to(torch.float64)
    total = torch.as_tensor(total, device=counts.device).to(torch.float64)
    if base == "smooth":
        return torch.log((total + 1.0) / (counts + 1.0)) + 1.0
    if base in ("raw", "base2", "base10"):
        counts = torch.minimum(counts.clamp(min=1.0), total)
        ratio = total / counts
        if base == "raw":
            return torch.log(ratio)
        return torch.log2(ratio) if base == "base2" else torch.log10(ratio)
    counts = torch.minimum(counts.clamp(min=1.0), total - 1.0)
    if base == "prob":
        return torch.log((total - counts) / counts)
    frequency = counts / total
    if base == "normit":
        return -torch.special.ndtri(frequency)
    return -torch.log(-torch.log1p(-frequency))  # gombit


@register(ROI_CLS_LOSS_REGISTRY)
class IIFLoss(ClassificationLoss):
    name = "iif"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = 'IIF weights, 14 variants (Alexandridis et al., TIP 2023)'
    doc_paper = '2x RFS, cosine + feature aug.: 26.3 (APr 18.6)'
    config_node = "IIF"
    extra_logits = 1

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.IIF")
        # raw | smooth | prob | normit | gombit | base2 | base10, each also as <variant>_obj
        # (instance counts instead of image counts).
        _C.VARIANT = "raw"

    def __init__(self, num_classes, class_stats=None, variant="raw"):
        super().__init__(num_classes, class_stats)
        if variant not in IIF_VARIANTS:
            raise ValueError(f"iif: unknown VARIANT '{variant}' (known: {', '.join(IIF_VARIANTS)})")
        self.variant = variant

    def logit_weights(self) -> torch.Tensor:
        """(C + 1,) float32: the class weights, then 1 for the background logit."""
        stats = self.require_class_stats()
        if self.variant.endswith("_obj"):
            counts = stats.instance_count
            total = stats.instance_count.sum()
        else:
            counts, total = stats.image_count, stats.num_images
        weights = iif_weights(counts, total, self.variant).float()
        return torch.cat([weights, weights.new_ones(1)])

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        weights = self.logit_weights().to(logits.device)
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": affine_softmax_cross_entropy(logits, labels, scale=weights)}

    softmax_logits = True

    def predict_probs(self, logits):
        return F.softmax(self.activation_logits(logits), dim=-1)

    def activation_logits(self, logits):
        return logits.float() * self.logit_weights().to(logits.device)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, variant={self.variant!r}"
