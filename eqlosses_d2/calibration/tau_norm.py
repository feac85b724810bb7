"""
τ-normalization (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020).

The classifier's weight vectors are rescaled by their norms to the power τ,
``w̃_c = w_c / ‖w_c‖^τ`` (τ = 0: unchanged; τ = 1: unit norm), which evens out the larger
norms that frequent classes grow. Applied to an already computed logit
``z_c = <x, w_c> + b_c``, this is ``z̃_c = (z_c − b_c) / ‖w_c‖^τ + b_c``.

Detection: only the C foreground weight vectors are normalized; the background /
objectness outputs are left as they are. The biases are kept (the authors' image
classifier computes τ-normalized logits without a bias; a detector's biases carry the
background prior — −4.6 to −6.9 for sigmoid heads — which dropping would destroy). A
cosine classifier has unit-norm weights already: τ-normalization does nothing there and
is refused by the config check.
"""
import torch

from ..registry import CALIBRATION_REGISTRY, config_node, register

__all__ = ["tau_normalized_logits"]


def tau_normalized_logits(logits: torch.Tensor, weight: torch.Tensor, bias, tau: float, num_classes: int):
    """(N, K) logits of a linear classifier (weight (K, D), bias (K,) or None) → τ-normalized."""
    norms = weight[:num_classes].detach().float().norm(dim=1).clamp(min=1e-12)
    scale = norms.pow(-float(tau))
    out = logits.float().clone()
    fg = out[:, :num_classes]
    if bias is not None:
        b = bias[:num_classes].detach().float()
        fg.sub_(b).mul_(scale).add_(b)
    else:
        fg.mul_(scale)
    return out


@register(CALIBRATION_REGISTRY)
class TauNorm:
    """``METHOD tau_norm``: τ-normalized classifier weights (Kang et al. 2020). Its keys of ``TEST.EQLOSSES.CALIBRATION``; applied by
    :class:`eqlosses_d2.calibration.ScoreCalibration`."""

    name = "tau_norm"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "TEST.EQLOSSES.CALIBRATION")
        # τ of METHOD "tau_norm": classifier weights w_c / |w_c|^τ.
        _C.TAU = 1.0

    @staticmethod
    def kwargs_from_config(node) -> dict:
        return dict(tau=node.TAU)
