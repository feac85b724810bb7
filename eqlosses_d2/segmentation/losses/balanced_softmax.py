"""
Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
NeurIPS 2020) and logit adjustment (Menon et al., "Long-tail learning via logit adjustment",
ICLR 2021) per pixel, one loss:

    L = (1 / V) Σ_{valid pixels} CE(z_p + τ · log π, y_p),   predicted from the raw logits z,

V the valid pixels of the batch. As the classification form
(:mod:`eqlosses_d2.classification.losses.balanced_softmax`) the adjustment is
``log(π_j^τ + 1e-12)`` (the logit-adjustment authors' code, ``google-research/logit_adj``:
``np.log(label_freq ** tro + 1e-12)``); τ = 1 is Balanced Softmax (``logits + log n_j`` in its
authors' ``BalancedSoftmaxLoss``, the same up to a per-row constant, which changes neither CE nor
its gradient). Inference uses the raw logits (``predict`` returns them, as the classification
form scores ``softmax(z)``): the adjustment is a training-time correction of the prior.

The prior π (``PRIOR``), from the model's class statistics (a checkpoint carries them):

- ``"pixel"`` (default): the pixel frequency, ``π_j = pixel_count_j / Σ_k pixel_count_k`` (labelled
  training pixels of class j over all labelled pixels): the label distribution the per-pixel loss
  is trained on, which is what the derivation of both papers assumes;
- ``"image"``: the image frequency, ``image_count_j / num_images`` (training images containing j),
  normalised to sum to 1 over the classes (``image_count_j / Σ_k image_count_k``).

No adaptive state. Config node ``MODEL.EQLOSSES.SEM_SEG.BALANCED_SOFTMAX`` (``TAU`` 1.0,
``PRIOR`` "pixel"). Value and analytic gradient ``(softmax(z + τ log π) − onehot) / V`` from one
chunked walk over the logits (:func:`.kernels.pixel_softmax_ce`), holding only the gradient.
"""
import torch

from ...registry import PIXEL_LOSS_REGISTRY, config_node, register
from .base import PixelLoss
from .kernels import AffinePixelCE, PixelBatch, check_finite_loss, require_counts

__all__ = ["PixelBalancedSoftmax", "PRIORS"]

PRIORS = ("pixel", "image")


@register(PIXEL_LOSS_REGISTRY)
class PixelBalancedSoftmax(PixelLoss):
    name = "balanced_softmax"
    config_node = "BALANCED_SOFTMAX"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.BALANCED_SOFTMAX")
        # τ of the adjustment τ·log π (1: Balanced Softmax; logit adjustment's sweeps use 0.5 .. 2)
        _C.TAU = 1.0
        # π: "pixel" (pixel_count / all labelled pixels) or "image" (image_count / num_images, normalised to sum 1)
        _C.PRIOR = "pixel"

    def __init__(self, num_classes, class_stats=None, ignore_value=255, tau=1.0, prior="pixel"):
        super().__init__(num_classes, class_stats, ignore_value)
        if tau < 0:
            raise ValueError(f"SEM_SEG.BALANCED_SOFTMAX.TAU must be >= 0, got {tau}")
        if prior not in PRIORS:
            raise ValueError(f"SEM_SEG.BALANCED_SOFTMAX.PRIOR must be one of {', '.join(PRIORS)}; got '{prior}'")
        self.tau = float(tau)
        self.prior = prior

    def class_prior(self) -> torch.Tensor:
        """(C,) float64 π (sums to 1; uniform zeros only when no class has a count)."""
        counts = require_counts(self, "pixel_count" if self.prior == "pixel" else "image_count").double()
        return counts / counts.sum().clamp(min=1)

    def adjustment(self) -> torch.Tensor:
        """(C,) float32 ``log(π^τ + 1e-12)`` (computed in float64)."""
        return (self.class_prior().pow(self.tau) + 1e-12).log().float()

    def forward(self, logits, targets):
        self._check(logits, targets)
        logits = logits.float().contiguous()
        batch = PixelBatch(logits, targets, self.ignore_value, self.name)
        shift = self.adjustment().to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = AffinePixelCE.apply(logits, batch, batch.per_valid_pixel(), shift, None, "Balanced Softmax (pixels)")
        check_finite_loss(loss, self.name)
        return {"loss_sem_seg": loss}

    def extra_repr(self):
        return f"num_classes={self.num_classes}, tau={self.tau}, prior='{self.prior}'"
