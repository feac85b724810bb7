"""
NorCal: normalized calibration (Pan et al., "On Model Calibration for Long-Tailed Object
Detection and Instance Segmentation", NeurIPS 2021).

Post-hoc: each foreground class's score is divided by its training sample size to the
power γ, the background is left alone, and the scores of a proposal are renormalized:

    q_c = (exp(z_c) · f_c) / (Σ_k exp(z_k) · f_k + exp(z_bg)),    f_c = n_c^−γ

which is ``softmax(z_c + log f_c)`` with the background logit unchanged. n_c is the
class's training image count (or instance count). γ = 0 is the uncalibrated model.

Factors (``factor``): ``power`` f_c = n_c^−γ (the paper's); ``effective_number``
f_c = (1 − γ) / (1 − γ^n_c), the class-balanced weight of Cui et al. (γ is then their β
in [0, 1); γ = 0 gives f = 1, uncalibrated).

Variants (``variant``), as the authors' code names them:

- ``exps`` (default): the exponentials of the softmax logits are scaled;
- ``probs``: the softmax probabilities are scaled. With renormalization, ``exps`` and
  ``probs`` are the same function (the softmax's denominator cancels): on a plain
  softmax head it is computed from the logits as ``softmax(z + log f)`` in one pass
  (:func:`norcal_softmax_from_logits`; the softmax and the calibration at the cost of a
  softmax alone), and from the probabilities where the head's scores are not a plain
  softmax (Seesaw's objectness) or are an average (the cascade head calibrates its
  averaged stage scores). Without renormalization, ``exps`` returns exp(z_c)·f_c itself
  (unbounded scores, the authors' ablation) and ``probs`` returns p_c·f_c;
- ``logits``: the foreground logits are *multiplied* by f_c before the softmax (the
  authors' "logits" option; always normalized).

Sigmoid-family heads (one-vs-all: sigmoid, EQL, EQLv2, Federated, Gumbel) have no
competing background column to renormalize against. The rule used there is NorCal on
each class's own binary problem (class vs. not-class): the class's exponential is
scaled and the pair renormalized, ``q_c = p_c f_c / (p_c f_c + 1 − p_c)``, i.e.
``σ(z_c + log f_c)`` for a sigmoid head; the head's last column (its background or
objectness score, which Detectron2's inference ignores) is passed through. Only the
``exps``/``probs`` variants with renormalization are defined there.

Guard: a class never seen in training (n_c = 0) is treated as seen once (f = 1), as the
IIF weights do; on LVIS every class has at least one training image.
"""
import torch

from ..losses.fused import row_chunks
from ..registry import CALIBRATION_REGISTRY, config_node, register
from .rowwise import affine_softmax, column_scale

__all__ = ["NORCAL_FACTORS", "NORCAL_VARIANTS", "norcal_factors", "norcal_binary", "norcal_softmax_from_logits",
           "norcal_softmax_probs", "norcal_softmax_logits"]

NORCAL_VARIANTS = ("exps", "probs", "logits")
NORCAL_FACTORS = ("power", "effective_number")


def norcal_factors(counts, gamma: float, factor: str = "power") -> torch.Tensor:
    """(C,) float64 multiplicative factors f_c from per-class training counts n_c."""
    if factor not in NORCAL_FACTORS:
        raise ValueError(f"NorCal factor must be one of {', '.join(NORCAL_FACTORS)}, got '{factor}'")
    counts = torch.as_tensor(counts).to(torch.float64).clamp(min=1.0)
    gamma = float(gamma)
    if factor == "power":
        return counts.pow(-gamma)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"NorCal effective_number factor needs 0 <= gamma < 1, got {gamma}")
    if gamma == 0.0:
        return torch.ones_like(counts)
    return (1.0 - gamma) / (1.0 - torch.pow(torch.full_like(counts, gamma), counts))


def norcal_softmax_probs(probs: torch.Tensor, factors: torch.Tensor, renorm: bool = True) -> torch.Tensor:
    """
    (N, C + 1) probabilities of a softmax head (background last) → NorCal's: foreground
    columns times f_c, background unchanged, rows renormalized (``renorm``).
    """
    out = probs * column_scale(factors, probs.shape[1], probs)
    if renorm:
        for start, stop in row_chunks(out):
            rows = out[start:stop]
            rows.div_(rows.sum(dim=1, keepdim=True))
    return out


def norcal_softmax_from_logits(logits: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """
    ``norcal_softmax_probs(softmax(logits), factors)`` of a plain-softmax head, straight
    from its (N, C + 1) logits: ``softmax(z_c + log f_c)`` with the background logit
    unchanged (the ``exps`` / ``probs`` variants with renormalization), in one pass of
    row chunks into one output (no full-size temporary).
    """
    logits = logits.float()
    shift = column_scale(factors.to(torch.float64).log(), logits.shape[1], logits, fill=0.0)
    return affine_softmax(logits, shift=shift)


def norcal_softmax_exps(logits: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The ``exps`` variant without renormalization: exp(z_c)·f_c, exp(z_bg)."""
    out = torch.exp(logits.float())
    return out.mul_(column_scale(factors, out.shape[1], out))


def norcal_softmax_logits(logits: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The ``logits`` variant: softmax of the foreground logits times f_c (background unchanged)."""
    logits = logits.float()
    return affine_softmax(logits, scale=column_scale(factors, logits.shape[1], logits))


def norcal_binary(probs: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """
    One-vs-all heads: ``q_c = p_c f_c / (p_c f_c + 1 − p_c)`` on the first C columns; the
    remaining columns are passed through.
    """
    num_classes = factors.numel()
    out = probs.clone()
    fg = out[:, :num_classes]
    factors = factors.to(probs)
    for start, stop in row_chunks(fg):
        p = fg[start:stop]
        scaled = p * factors
        # p f + 1 − p ≥ min(f, 1) > 0 for p in [0, 1]: no 0/0
        p.neg_().add_(1.0).add_(scaled)
        torch.div(scaled, p, out=p)
    return out


@register(CALIBRATION_REGISTRY)
class NorCal:
    """``METHOD norcal``: NorCal (Pan et al. 2021): foreground scores divided by a power of the class counts. Its keys of ``TEST.EQLOSSES.CALIBRATION``; applied by
    :class:`eqlosses_d2.calibration.ScoreCalibration`."""

    name = "norcal"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "TEST.EQLOSSES.CALIBRATION")
        # NorCal's γ: foreground scores divided by n_c^γ (0: uncalibrated); with FACTOR
        # "effective_number" it is the β in [0, 1) of (1 − β) / (1 − β^n_c).
        _C.GAMMA = 0.0
        # NorCal variant: "exps" (the authors' default), "probs" or "logits".
        _C.VARIANT = "exps"
        # NorCal factor: "power" (n_c^-γ) or "effective_number" ((1 − γ) / (1 − γ^n_c)).
        _C.FACTOR = "power"
        # NorCal: renormalize each proposal's scores over the classes and background.
        _C.RENORM = True
        # n_c of NorCal: training "image" counts (the paper's) or "instance" counts.
        _C.COUNT = "image"

    @staticmethod
    def kwargs_from_config(node) -> dict:
        return dict(gamma=node.GAMMA, variant=node.VARIANT, factor=node.FACTOR, renorm=node.RENORM, count=node.COUNT)
