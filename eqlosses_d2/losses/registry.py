"""
Name -> loss class. A loss class sets ``name`` (the value of ``MODEL.EQLOSSES.LOSS``)
and ``config_node`` (its hyper-parameter node under ``MODEL.EQLOSSES``, or None); the
node's keys are its constructor's keyword arguments in upper case.
"""
from typing import Dict, Type

__all__ = ["LOSS_REGISTRY", "register_loss", "build_loss", "build_loss_from_cfg", "loss_hparams_from_cfg"]

LOSS_REGISTRY: Dict[str, Type] = {}


def register_loss(cls):
    if cls.name in LOSS_REGISTRY:
        raise KeyError(f"loss '{cls.name}' is registered twice")
    LOSS_REGISTRY[cls.name] = cls
    return cls


def loss_hparams_from_cfg(cls, eqlosses_cfg) -> dict:
    """The constructor kwargs of ``cls`` from its node under ``MODEL.EQLOSSES`` (a dict-like)."""
    node = getattr(cls, "config_node", None)
    if not node:
        return {}
    return {key.lower(): value for key, value in eqlosses_cfg[node].items()}


def _loss_class(name: str):
    if name not in LOSS_REGISTRY:
        raise KeyError(
            f"MODEL.EQLOSSES.LOSS: unknown loss '{name}' (known: {', '.join(sorted(LOSS_REGISTRY))})"
        )
    return LOSS_REGISTRY[name]


def build_loss(name: str, num_classes: int, class_stats=None, **hparams):
    return _loss_class(name)(num_classes, class_stats=class_stats, **hparams)


def build_loss_from_cfg(eqlosses_cfg, num_classes: int, class_stats=None):
    """The loss ``MODEL.EQLOSSES.LOSS`` names, with the hyper-parameters of its node."""
    cls = _loss_class(eqlosses_cfg.LOSS)
    # a loss built on another (PCB) reads that one's node too
    hparams_from_cfg = getattr(cls, "hparams_from_cfg", None)
    hparams = hparams_from_cfg(eqlosses_cfg) if hparams_from_cfg else loss_hparams_from_cfg(cls, eqlosses_cfg)
    return cls(num_classes, class_stats=class_stats, **hparams)
