"""
Post-hoc score calibration: NorCal, IIF weights at inference and τ-normalization, chosen
by ``TEST.EQLOSSES.CALIBRATION.METHOD``. Pure PyTorch functions (one file per method)
and :class:`ScoreCalibration`, which the box predictor applies in ``predict_probs``.

Counts come from the class statistics stored in the model (``ClassStatsBuffers``), so
calibration works in ``--eval-only`` and on checkpoints trained elsewhere (a Detectron2
checkpoint without our buffers gets them from ``MODEL.EQLOSSES.CLASS_STATS_DATASET``).

Calibrations that are functions of the head's probabilities (NorCal's ``exps``/``probs``
with renormalization, and its one-vs-all rule for sigmoid-family heads) are applied by
the cascade head once, to the average of its stages' probabilities: the scores the
cascade actually ranks. Those that need logits (NorCal ``logits`` or ``exps`` without
renormalization, IIF, τ-norm) act inside each stage, before the average.
"""

from ..registry import CALIBRATION_REGISTRY, ROI_CLS_LOSS_REGISTRY, names, register, registered
from .iif import IIF_VARIANTS, iif_class_weights, iif_softmax
from .norcal import (
    NORCAL_FACTORS,
    NORCAL_VARIANTS,
    norcal_binary,
    norcal_factors,
    norcal_softmax_exps,
    norcal_softmax_from_logits,
    norcal_softmax_logits,
    norcal_softmax_probs,
)
from .tau_norm import tau_normalized_logits

__all__ = [
    "CALIBRATION_REGISTRY",
    "NoCalibration",
    "ScoreCalibration",
    "calibration_from_cfg",
    "iif_softmax",
    "norcal_binary",
    "norcal_factors",
    "norcal_softmax_from_logits",
    "norcal_softmax_logits",
    "norcal_softmax_probs",
    "tau_normalized_logits",
]

_COUNTS = ("image", "instance")


def softmax_heads() -> str:
    """The losses whose head is a plain softmax over C + 1 logits (what IIF at inference and
    NorCal's logit variants act on), from the loss registry: for the one-line errors."""
    losses = registered(ROI_CLS_LOSS_REGISTRY)
    heads = [name for name, cls in losses.items() if getattr(cls, "softmax_logits", False) is True]
    if "pcb" in losses:  # PCB's head is its base loss's
        heads.append("pcb with PCB.BASE softmax")
    return ", ".join(heads)


@register(CALIBRATION_REGISTRY)
class NoCalibration:
    """``METHOD none``: the head's own probabilities. A calibration method's class in
    ``CALIBRATION_REGISTRY`` declares its keys of ``TEST.EQLOSSES.CALIBRATION`` (``add_config``)
    and which of them are :class:`ScoreCalibration`'s arguments (``kwargs_from_config``);
    ``ScoreCalibration`` applies it."""

    name = "none"

    @classmethod
    def add_config(cls, cfg):
        pass

    @staticmethod
    def kwargs_from_config(node) -> dict:
        return {}


class ScoreCalibration:
    """
    One calibration setting. ``probs_from_logits`` turns a head's raw logits into its
    calibrated (N, C + 1) probabilities; with ``defer=True`` a probability-space
    calibration is left out, to be applied by ``finish`` (the cascade head, after
    averaging its stages).
    """

    def __init__(self, method="none", gamma=0.0, variant="exps", factor="power", renorm=True, count="image",
                 iif_variant="raw", tau=1.0):
        if method not in CALIBRATION_REGISTRY:
            raise ValueError(f"METHOD: unknown '{method}' (known: {', '.join(names(CALIBRATION_REGISTRY))})")
        if variant not in NORCAL_VARIANTS:
            raise ValueError(f"VARIANT: unknown '{variant}' (known: {', '.join(NORCAL_VARIANTS)})")
        if count not in _COUNTS:
            raise ValueError(f"COUNT must be 'image' or 'instance', got '{count}'")
        if factor not in NORCAL_FACTORS:
            raise ValueError(f"FACTOR: unknown '{factor}' (known: {', '.join(NORCAL_FACTORS)})")
        if factor == "effective_number" and not 0.0 <= gamma < 1.0:
            raise ValueError(f"GAMMA must be in [0, 1) with FACTOR effective_number, got {gamma}")
        if iif_variant not in IIF_VARIANTS:
            raise ValueError(f"IIF_VARIANT: unknown '{iif_variant}' (known: {', '.join(IIF_VARIANTS)})")
        if tau < 0:
            raise ValueError(f"TAU must be >= 0, got {tau}")
        self.method, self.gamma, self.variant, self.factor = method, float(gamma), variant, factor
        self.renorm, self.count, self.iif_variant, self.tau = bool(renorm), count, iif_variant, float(tau)

    def __repr__(self):
        if self.method == "norcal":
            return (f"ScoreCalibration(norcal, gamma={self.gamma}, variant={self.variant}, factor={self.factor}, "
                    f"renorm={self.renorm}, count={self.count})")
        if self.method == "iif":
            return f"ScoreCalibration(iif, variant={self.iif_variant})"
        if self.method == "tau_norm":
            return f"ScoreCalibration(tau_norm, tau={self.tau})"
        return "ScoreCalibration(none)"

    def check_head(self, loss, cosine: bool):
        """One-line error if this setting is undefined for the head's loss (instance or
        class) and classifier."""
        softmax_logits = loss.softmax_logits
        if self.method == "iif" and not softmax_logits:
            raise ValueError(f"METHOD iif needs a softmax head ({softmax_heads()}), not '{loss.name}'")
        if self.method == "iif" and loss.name == "iif":
            raise ValueError(
                "METHOD iif on a head trained with the IIF loss (MODEL.EQLOSSES.LOSS iif) would apply the IIF "
                "weights twice (its softmax already reads weighted logits): use METHOD none"
            )
        if self.method == "tau_norm" and cosine:
            raise ValueError("METHOD tau_norm does nothing with a cosine classifier (MODEL.EQLOSSES.COSINE_SCALE > 0)")
        if self.method == "norcal" and self._needs_logits(loss) and not softmax_logits:
            what = "VARIANT logits" if self.variant == "logits" else f"RENORM False (VARIANT {self.variant})"
            raise ValueError(f"{what} of NorCal needs a softmax head ({softmax_heads()}), not '{loss.name}'")

    def _needs_logits(self, loss) -> bool:
        if self.method in ("iif", "tau_norm"):
            return True
        if self.method != "norcal":
            return False
        if loss.family != "softmax":
            return self.variant == "logits" or not self.renorm
        return self.variant == "logits" or (self.variant == "exps" and not self.renorm)

    def acts_on_probs(self, loss) -> bool:
        """True when the calibration is a function of the head's probabilities."""
        return self.method == "norcal" and not self._needs_logits(loss)

    def _norcal_factors(self, class_stats):
        counts = class_stats.image_count if self.count == "image" else class_stats.instance_count
        return norcal_factors(counts, self.gamma, self.factor)

    @property
    def is_identity(self) -> bool:
        """No calibration (METHOD none, NorCal with γ = 0, τ-norm with τ = 0): the head's
        own probabilities are returned bit for bit."""
        return self.method == "none" or (self.method == "norcal" and self.gamma == 0.0) or (
            self.method == "tau_norm" and self.tau == 0.0
        )

    def probs_from_logits(self, logits, loss, classifier=None, defer: bool = False):
        """(N, K) raw logits of a head → (N, C + 1) calibrated probabilities."""
        if self.is_identity:
            return loss.predict_probs(logits)
        stats = loss.require_class_stats()
        if self.method == "tau_norm":
            weight, bias = classifier.weight, getattr(classifier, "bias", None)
            return loss.predict_probs(tau_normalized_logits(logits, weight, bias, self.tau, loss.num_classes))
        if self.method == "iif":
            return iif_softmax(loss.activation_logits(logits), iif_class_weights(stats, self.iif_variant))
        # NorCal
        if self.acts_on_probs(loss):
            if not defer and loss.softmax_logits and self.renorm:
                # softmax(z + log f): the head's softmax and the calibration in one pass
                factors = self._norcal_factors(stats)
                return norcal_softmax_from_logits(loss.activation_logits(logits), factors)
            probs = loss.predict_probs(logits)
            return probs if defer else self.finish(probs, loss)
        factors = self._norcal_factors(stats)
        logits = loss.activation_logits(logits)
        if self.variant == "logits":
            return norcal_softmax_logits(logits, factors)
        probs = norcal_softmax_exps(logits, factors)  # exps, no renormalization
        return probs

    def finish(self, probs, loss):
        """The probability-space part (identity unless ``acts_on_probs``)."""
        if self.is_identity or not self.acts_on_probs(loss):
            return probs
        factors = self._norcal_factors(loss.require_class_stats())
        if loss.family == "softmax":
            return norcal_softmax_probs(probs, factors, renorm=self.renorm)
        return norcal_binary(probs, factors)


def calibration_from_cfg(cfg) -> ScoreCalibration:
    """The setting ``TEST.EQLOSSES.CALIBRATION`` describes: its METHOD, and the keys of every
    registered method (a sweep varies one method's parameter from another's base setting)."""
    node = cfg.TEST.EQLOSSES.CALIBRATION
    kwargs = {}
    for _, method in registered(CALIBRATION_REGISTRY).items():
        kwargs.update(method.kwargs_from_config(node))
    return ScoreCalibration(method=node.METHOD, **kwargs)
