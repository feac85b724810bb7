"""
The normalized mask predictor of Seesaw's and GOL's LVIS recipes
(``MODEL.EQLOSSES.MASK_PREDICTOR_SCALE`` > 0).

Detectron2's mask head ends in a 1×1 convolution from the deconvolved features to one
mask logit per class. The normalized predictor replaces it by a cosine similarity per
pixel: for features ``x`` (D channels at a pixel) and the filter ``w_k`` of class ``k``,

    logit_k = s · <x/‖x‖, w_k/‖w_k‖> + b_k,

with ``s`` the scale (temperature; 20 in the Seesaw and GOL recipes) and the norms taken
over the D channels (``‖·‖ + 1e-6`` in the denominator, so an all-zero pixel after the
ReLU gives ``b_k``). The logits are bounded by ``s``, so rare classes, whose filters see
few gradient steps, get masks of the same confidence range as frequent ones.
"""
from torch import nn
from torch.nn import functional as F

__all__ = ["NormalizedConv2d", "normalize_mask_predictor"]

_EPS = 1e-6


class NormalizedConv2d(nn.Conv2d):
    """1×1 convolution computing ``scale · cos(x, w_k) + b_k`` at every pixel."""

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__(in_channels, out_channels, kernel_size=1)
        if not scale > 0:
            raise ValueError(f"NormalizedConv2d: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, x):
        x = x / (x.norm(dim=1, keepdim=True) + _EPS)
        w = self.weight / (self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + _EPS)
        return F.conv2d(self.scale * x, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", scale={self.scale}"


def normalize_mask_predictor(mask_head: nn.Module, scale: float) -> nn.Module:
    """Replace ``mask_head.predictor`` (Detectron2's 1×1 ``Conv2d``) by a
    :class:`NormalizedConv2d` of the same shape, initialised as Detectron2 initialises it
    (weights N(0, 0.001²), bias 0). Returns the head."""
    stock = getattr(mask_head, "predictor", None)
    if not isinstance(stock, nn.Conv2d) or stock.kernel_size != (1, 1):
        raise ValueError(
            f"MODEL.EQLOSSES.MASK_PREDICTOR_SCALE: mask head {type(mask_head).__name__} has no 1x1 "
            "'predictor' convolution to normalize"
        )
    predictor = NormalizedConv2d(stock.in_channels, stock.out_channels, scale)
    nn.init.normal_(predictor.weight, std=0.001)
    nn.init.constant_(predictor.bias, 0.0)
    mask_head.predictor = predictor.to(stock.weight.device)
    return mask_head

