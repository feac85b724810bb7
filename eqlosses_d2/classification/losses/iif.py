"""
IIF for image classification (Alexandridis et al., "Inverse Image Frequency for Long-tailed
Image Recognition", IEEE TIP 2023), as its authors' classification code runs it
(kostas1515/iif, ``classification/custom.py`` ``IIFLoss`` and ``classification/train.py``
``evaluate``, commit 747b0419): per-class weights w multiply the logits,

    L = mean_i CE(w ⊙ z_i, y_i),   scores softmax(w ⊙ z)

in training and at test time: their ``evaluate`` replaces the model's output with
``criterion(output, infer=True)`` = ``pred * iif[variant]`` before the top-1/top-5 accuracy,
so the weighted logits rank the classes (we return their softmax: the same ranking).

With n_c the training images of class c (for single-label classification the instance
count: each image is one instance) and M = Σ_c n_c (their ``freqs.sum()``), the variants are
their code's:

============  ==================================
raw           ``log(M / n_c)``
smooth        ``log((M + 1) / (n_c + 1)) + 1``
rel           ``log((M − n_c) / n_c)``
normit        ``−Φ⁻¹(n_c / M)``
gombit        ``−log(−log(1 − n_c / M))``
base2         ``log2(M / n_c)``
base10        ``log10(M / n_c)``
============  ==================================

optionally divided by their p-norm over the classes (``IIF_NORM`` = p > 0; their ``--iif_norm``,
default 0: no normalisation). Defaults: VARIANT "smooth" (every ImageNet-LT, Places-LT and
CIFAR-LT command of their README uses ``--iif smooth``; their argparse default is "raw"),
IIF_NORM 0. Their recipes apply IIF to a CE-trained model, either re-initialising and re-training
only the classifier (``--decoup``; here MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING.RETRAIN_HEAD with
MODEL.EQLOSSES.TRAINABLE_MODULES) or at test time only (not this loss: a calibration).
Config node ``MODEL.EQLOSSES.CLASSIFICATION.IIF``.

Differences from their code:
- the weights come from the model's class statistics (computed in float64, used in float32)
  instead of the dataset object, so a checkpoint carries them;
- a guard their data never meets: n_c is clamped to [1, M] (raw, base2, base10) or [1, M − 1]
  (rel, normit, gombit) before the formula (the detection IIF's :func:`~eqlosses_d2.losses.iif.iif_weights`),
  so a class without training images gets the weight of a class seen once instead of inf;
- their optional ``--deffered`` per-class CE weights and mixup are not part of this loss;
- value and analytic gradient ``w ⊙ (softmax(w ⊙ z) − y) / N`` from one softmax pass
  (:class:`_WeightedLogitsCE`, :func:`.kernels.softmax_ce_rows_and_grad`).
"""
import torch
from torch.nn import functional as F

from ...losses.base import scaled_stashed_grad
from ...losses.iif import iif_weights
from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss
from .kernels import softmax_ce_rows_and_grad

__all__ = ["ImageIIFLoss", "IMAGE_IIF_VARIANTS"]

IMAGE_IIF_VARIANTS = ("raw", "smooth", "rel", "normit", "gombit", "base2", "base10")
# their classification "rel" is the detection module's "prob" (the same formula)
_DETECTION_NAME = {"rel": "prob"}


class _WeightedLogitsCE(torch.autograd.Function):
    """``scale · Σ_i CE(w ⊙ z_i, y_i)`` and its gradient ``scale · w ⊙ (softmax(w ⊙ z) − onehot)``."""

    @staticmethod
    def forward(ctx, logits, labels, weights, scale):
        loss, ctx.grad = softmax_ce_rows_and_grad(logits * weights, labels, scale, column_weight=weights)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "IIF (classification)"), None, None, None


@register(IMAGE_CLS_LOSS_REGISTRY)
class ImageIIFLoss(ImageClassificationLoss):
    name = "iif"
    config_node = "IIF"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.IIF")
        # raw | smooth | rel | normit | gombit | base2 | base10 (the authors' recipes: smooth)
        _C.VARIANT = "smooth"
        # p > 0: divide the weights by their p-norm over the classes (authors' --iif_norm); 0: as they are
        _C.IIF_NORM = 0

    def __init__(self, num_classes, class_stats=None, variant="smooth", iif_norm=0):
        super().__init__(num_classes, class_stats)
        if variant not in IMAGE_IIF_VARIANTS:
            raise ValueError(f"IIF.VARIANT must be one of {', '.join(IMAGE_IIF_VARIANTS)}; got '{variant}'")
        if iif_norm < 0:
            raise ValueError(f"IIF.IIF_NORM must be >= 0, got {iif_norm}")
        self.variant = variant
        self.iif_norm = iif_norm

    def logit_weights(self) -> torch.Tensor:
        """(C,) float32 IIF weights from the training image counts (computed in float64)."""
        counts = self.require_image_counts().double()
        weights = iif_weights(counts, counts.sum(), _DETECTION_NAME.get(self.variant, self.variant))
        if self.iif_norm > 0:
            weights = weights / torch.linalg.vector_norm(weights, ord=self.iif_norm)
        return weights.float()

    def forward(self, logits, labels):
        self._check(logits, labels)
        weights = self.logit_weights().to(logits.device)
        if logits.shape[0] == 0:
            return {"loss_cls": logits.float().sum() * 0.0}
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = _WeightedLogitsCE.apply(logits.float(), labels.long(), weights, 1.0 / logits.shape[0])
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return F.softmax(logits.float() * self.logit_weights().to(logits.device), dim=1)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, variant='{self.variant}', iif_norm={self.iif_norm}"
