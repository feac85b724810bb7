"""
IIF weights at inference (Alexandridis et al., IEEE TIP 2023) on a softmax head:
``p = softmax(w ⊙ z)`` with the IIF weights w_c of the foreground classes and w_bg = 1,
whatever softmax loss the head was trained with. The weights (every variant, image or
instance counts) are :func:`eqlosses_d2.losses.iif.iif_weights`, computed from the class
statistics stored in the model. z are the logits the head's own softmax reads. A head
trained with the IIF loss already reads weighted logits: calibrating it with IIF would
apply the weights twice, and :meth:`ScoreCalibration.check_head` refuses it.
"""
import torch

from ..losses.iif import IIF_VARIANTS, iif_weights
from ..registry import CALIBRATION_REGISTRY, config_node, register
from .rowwise import affine_softmax, column_scale

__all__ = ["IIF_VARIANTS", "iif_class_weights", "iif_softmax"]


def iif_class_weights(class_stats, variant: str = "raw") -> torch.Tensor:
    """(C,) float64 IIF weights from a model's class statistics."""
    if variant.endswith("_obj"):
        counts, total = class_stats.instance_count, class_stats.instance_count.sum()
    else:
        counts, total = class_stats.image_count, class_stats.num_images
    return iif_weights(counts, total, variant)


def iif_softmax(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """softmax of the (N, C + 1) logits with the foreground columns multiplied by ``weights``."""
    logits = logits.float()
    return affine_softmax(logits, scale=column_scale(weights, logits.shape[1], logits))


@register(CALIBRATION_REGISTRY)
class IIFCalibration:
    """``METHOD iif``: IIF weights on the logits of a softmax head, at inference. Its keys of ``TEST.EQLOSSES.CALIBRATION``; applied by
    :class:`eqlosses_d2.calibration.ScoreCalibration`."""

    name = "iif"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "TEST.EQLOSSES.CALIBRATION")
        # IIF variant of METHOD "iif" (those of MODEL.EQLOSSES.IIF.VARIANT).
        _C.IIF_VARIANT = "raw"

    @staticmethod
    def kwargs_from_config(node) -> dict:
        return dict(iif_variant=node.IIF_VARIANT)
