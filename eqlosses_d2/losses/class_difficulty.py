"""
The class-difficulty weights of CDB-W (Sinha et al., ACCV 2020 / IJCV 2022), shared by the RoI loss
``cdb_w`` (:mod:`.cdb_w`) and the image-classification loss
(:mod:`eqlosses_d2.classification.losses.cdb`), as the authors' ImageNet-LT code computes them
(hitachi-rd-cv/CDB-loss, ``ImageNet-LT/loss/CDBSoftmaxLoss.py``): with ``d`` the per-class
difficulties (1 − accuracy),

    τ = 2 · sigmoid((1 − min d) / (1 − max d + 0.01) − 1)      (their dynamic τ),
    w = C · d^τ / Σ d^τ                                        (uniform when every d^τ is 0).

Pure PyTorch, float64, no host read (τ can stay a 0-dim tensor on the device).
"""
import torch

__all__ = ["DYNAMIC_TAU_EPS", "cdb_weights", "dynamic_tau", "tau_from_difficulty"]

#: the ε of their dynamic τ, ``1 − max d + ε``
DYNAMIC_TAU_EPS = 0.01


def dynamic_tau(difficulty: torch.Tensor) -> torch.Tensor:
    """Their dynamic τ = 2 · sigmoid((1 − min d) / (1 − max d + 0.01) − 1): a 0-dim float64 tensor
    on the difficulties' device."""
    d = difficulty.double()
    bias = (1.0 - d.min()) / (1.0 - d.max() + DYNAMIC_TAU_EPS) - 1.0
    return 2.0 * torch.sigmoid(bias)


def tau_from_difficulty(difficulty: torch.Tensor) -> float:
    """:func:`dynamic_tau` as a Python float."""
    return float(dynamic_tau(difficulty))


def cdb_weights(difficulty: torch.Tensor, tau) -> torch.Tensor:
    """(C,) float64 ``C · d^τ / Σ d^τ`` (uniform when every ``d^τ`` is 0); ``tau`` a float or a
    0-dim tensor."""
    powered = difficulty.double().pow(tau)
    total = powered.sum()
    return torch.where(total > 0, powered * (powered.numel() / total), torch.ones_like(powered))
