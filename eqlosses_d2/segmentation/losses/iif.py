"""
IIF per pixel (Alexandridis et al., "Inverse Image Frequency for Long-tailed Image Recognition",
IEEE TIP 2023): per-class weights w multiply the logits, in training and at inference,

    L = (1 / V) Σ_{valid pixels} CE(w ⊙ z_p, y_p),   predict(z) = w ⊙ z,

V the valid pixels of the batch. The weights are the detection module's
(:func:`eqlosses_d2.losses.iif.iif_weights`, the authors' formulas) with the counts of a
segmentation training set (``COUNT``):

- ``"image"`` (default): n_c = training images containing class c (at least one labelled pixel of
  it: the class statistics' ``image_count``) and M = all training images (``num_images``), the
  paper's inverse *image* frequency, as the detection form counts images with an instance of c;
- ``"pixel"``: n_c = labelled training pixels of class c and M = all labelled pixels (the
  detection form's ``_obj`` variants, with pixels as the instances).

=========  =====================================================================
raw        ``log(M / n_c)``
smooth     ``log((M + 1) / (n_c + 1)) + 1``  (default)
prob       ``log((M − n_c) / n_c)``  (the classification code's "rel")
normit     ``−Φ⁻¹(n_c / M)``
gombit     ``−log(−log(1 − n_c / M))``
base2      ``log2(M / n_c)``
base10     ``log10(M / n_c)``
=========  =====================================================================

The authors publish no segmentation code (their repository, kostas1515/iif, has classification
and instance segmentation). Default VARIANT "smooth", as their classification recipes: a
segmentation set has classes in most or all of its images (a background or stuff class), to which
"raw" gives a weight near 0 (0 for a class in every image: its logit is then always 0 and never
trained) and "prob", "normit", "gombit" negative weights (classes in over half the images);
"smooth" keeps every weight ≥ 1. Counts are clamped as the detection module says (a class never
seen gets the weight of a class seen once). No adaptive state: the weights follow the model's
class statistics (computed in float64, used in float32). Config node
``MODEL.EQLOSSES.SEM_SEG.IIF``.

Value and analytic gradient ``w ⊙ (softmax(w ⊙ z) − onehot) / V`` in one chunked walk over the
logits (:func:`.kernels.pixel_softmax_ce`), holding only the gradient.
"""
import torch

from ...losses.iif import iif_weights
from ...registry import PIXEL_LOSS_REGISTRY, config_node, register
from .base import PixelLoss
from .kernels import AffinePixelCE, PixelBatch, check_finite_loss, require_counts

__all__ = ["PixelIIFLoss", "PIXEL_IIF_VARIANTS", "IIF_COUNTS"]

PIXEL_IIF_VARIANTS = ("raw", "smooth", "prob", "normit", "gombit", "base2", "base10")
IIF_COUNTS = ("image", "pixel")


@register(PIXEL_LOSS_REGISTRY)
class PixelIIFLoss(PixelLoss):
    name = "iif"
    config_node = "IIF"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.IIF")
        # raw | smooth | prob | normit | gombit | base2 | base10 (smooth: every weight >= 1)
        _C.VARIANT = "smooth"
        # n_c and M: "image" (images containing c, all training images) or "pixel" (pixels of c, all labelled pixels)
        _C.COUNT = "image"

    def __init__(self, num_classes, class_stats=None, ignore_value=255, variant="smooth", count="image"):
        super().__init__(num_classes, class_stats, ignore_value)
        if variant not in PIXEL_IIF_VARIANTS:
            raise ValueError(f"SEM_SEG.IIF.VARIANT must be one of {', '.join(PIXEL_IIF_VARIANTS)}; got '{variant}'")
        if count not in IIF_COUNTS:
            raise ValueError(f"SEM_SEG.IIF.COUNT must be one of {', '.join(IIF_COUNTS)}; got '{count}'")
        self.variant = variant
        self.count = count

    def logit_weights(self) -> torch.Tensor:
        """(C,) float32 IIF weights (computed in float64)."""
        if self.count == "image":
            counts = require_counts(self, "image_count")
            total = self.class_stats.num_images
        else:
            counts = require_counts(self, "pixel_count")
            total = counts.sum()
        return iif_weights(counts, total, self.variant).float()

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        weights = self.logit_weights().to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = AffinePixelCE.apply(logits, batch, batch.per_valid_pixel(), None, weights, "IIF (pixels)")
        check_finite_loss(loss, self.name)
        return {"loss_sem_seg": loss}

    def predict(self, logits):
        """``w ⊙ z`` (N, C, H, W): the weighted logits rank the classes, as in training."""
        return logits.float() * self.logit_weights().to(logits.device)[None, :, None, None]

    def extra_repr(self):
        return f"num_classes={self.num_classes}, variant='{self.variant}', count='{self.count}'"
