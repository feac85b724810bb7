"""
The registries of eqlosses_d2: one Detectron2 ``Registry`` per kind of method, keyed by the
name a config selects it with.

=========================  ====================================  ====================================
registry                   selected by                           holds
=========================  ====================================  ====================================
``ROI_CLS_LOSS_REGISTRY``  ``MODEL.EQLOSSES.LOSS``               classification losses of the RoI box
                                                                 predictor (:mod:`eqlosses_d2.losses`)
``DENSE_CLS_LOSS_REGISTRY`` ``MODEL.EQLOSSES.ONE_STAGE.LOSS``    classification losses of the one-stage
                                                                 heads (:mod:`eqlosses_d2.losses.dense`)
``CALIBRATION_REGISTRY``   ``TEST.EQLOSSES.CALIBRATION.METHOD``  post-hoc score calibrations
                                                                 (:mod:`eqlosses_d2.calibration`)
``IMAGE_CLS_LOSS_REGISTRY`` ``MODEL.EQLOSSES.CLASSIFICATION.LOSS`` losses of the image classifier
                                                                 (:mod:`eqlosses_d2.classification`)
``CLASSIFIER_HEAD_REGISTRY`` ``MODEL.EQLOSSES.CLASSIFICATION.HEAD`` classifier heads (linear, cosine, ...;
                                                                 :mod:`eqlosses_d2.classification.heads`)
``PIXEL_LOSS_REGISTRY``    ``MODEL.EQLOSSES.SEM_SEG.LOSS``       per-pixel losses of the semantic segmentation
                                                                 heads (:mod:`eqlosses_d2.segmentation.losses`)
``CONFIG_CHECK_REGISTRY``  (all of them, in order)               one-line config checks, each next to
                                                                 what it checks
=========================  ====================================  ====================================

A method is a class with a ``name`` (its config value) that declares its own config node
and defaults next to its code, in a classmethod ``add_config(cfg)``;
:func:`eqlosses_d2.add_eqlosses_config` collects those of every registered class. Adding a
method is one new file (the class, registered with :func:`register`) and one import line in
its package's ``__init__`` (or, outside the package, an import before the config is built).
The next kinds (classifier heads, segmentation and classification losses) are a new
``Registry`` and a :class:`Kind` entry in :data:`KINDS`.

The registry class is Detectron2's (``detectron2.utils.registry.Registry`` is fvcore's, imported
here from fvcore so that the pure-PyTorch losses import no Detectron2 module).
"""
from typing import Dict, List, NamedTuple

from fvcore.common.registry import Registry

__all__ = [
    "CALIBRATION_REGISTRY",
    "CLASSIFIER_HEAD_REGISTRY",
    "CONFIG_CHECK_REGISTRY",
    "DENSE_CLS_LOSS_REGISTRY",
    "IMAGE_CLS_LOSS_REGISTRY",
    "KINDS",
    "PIXEL_LOSS_REGISTRY",
    "Kind",
    "ROI_CLS_LOSS_REGISTRY",
    "Registry",
    "add_registered_configs",
    "config_node",
    "lookup",
    "names",
    "register",
    "registered",
]

ROI_CLS_LOSS_REGISTRY = Registry("ROI_CLS_LOSS")
ROI_CLS_LOSS_REGISTRY.__doc__ = """Classification losses of the RoI box predictor (``MODEL.EQLOSSES.LOSS``):
subclasses of :class:`eqlosses_d2.losses.ClassificationLoss`, built ``cls(num_classes, class_stats=...,
**cls.hparams_from_cfg(cfg.MODEL.EQLOSSES))``."""

DENSE_CLS_LOSS_REGISTRY = Registry("DENSE_CLS_LOSS")
DENSE_CLS_LOSS_REGISTRY.__doc__ = """Classification losses of the one-stage detectors
(``MODEL.EQLOSSES.ONE_STAGE.LOSS``): subclasses of :class:`eqlosses_d2.losses.dense.DenseClassificationLoss`."""

CALIBRATION_REGISTRY = Registry("CALIBRATION")
CALIBRATION_REGISTRY.__doc__ = """Post-hoc score calibrations (``TEST.EQLOSSES.CALIBRATION.METHOD``):
subclasses of :class:`eqlosses_d2.calibration.ScoreCalibration`, built ``cls.from_config(node)``."""

IMAGE_CLS_LOSS_REGISTRY = Registry("IMAGE_CLS_LOSS")
IMAGE_CLS_LOSS_REGISTRY.__doc__ = """Losses of the long-tailed image classifier (``MODEL.EQLOSSES.CLASSIFICATION.LOSS``):
subclasses of :class:`eqlosses_d2.classification.losses.ImageClassificationLoss`, one logit per class."""

CLASSIFIER_HEAD_REGISTRY = Registry("CLASSIFIER_HEAD")
CLASSIFIER_HEAD_REGISTRY.__doc__ = """Classifier heads, features -> logits (``MODEL.EQLOSSES.CLASSIFICATION.HEAD``):
subclasses of :class:`eqlosses_d2.classification.heads.ClassifierHead` (pure PyTorch)."""

PIXEL_LOSS_REGISTRY = Registry("PIXEL_LOSS")
PIXEL_LOSS_REGISTRY.__doc__ = """Per-pixel losses of the semantic segmentation heads (``MODEL.EQLOSSES.SEM_SEG.LOSS``):
subclasses of :class:`eqlosses_d2.segmentation.losses.PixelLoss`, one logit per class, ignored pixels skipped."""

CONFIG_CHECK_REGISTRY = Registry("CONFIG_CHECK")
CONFIG_CHECK_REGISTRY.__doc__ = """Functions ``check(cfg)`` that raise :class:`eqlosses_d2.config.ConfigError`
in one line; :func:`eqlosses_d2.config.validate_config` runs them all, in the order they were registered
(``@CONFIG_CHECK_REGISTRY.register()``, keyed by the function's name)."""


class Kind(NamedTuple):
    """A kind of method: its registry, the config key that selects one, and what a user calls
    one in an error message ("loss": "unknown loss 'x'")."""

    registry: Registry
    key: str
    noun: str


#: every kind of method, in the order their config nodes are added
KINDS = (
    Kind(ROI_CLS_LOSS_REGISTRY, "MODEL.EQLOSSES.LOSS", "loss"),
    Kind(DENSE_CLS_LOSS_REGISTRY, "MODEL.EQLOSSES.ONE_STAGE.LOSS", "loss"),
    Kind(CALIBRATION_REGISTRY, "TEST.EQLOSSES.CALIBRATION.METHOD", ""),
    Kind(IMAGE_CLS_LOSS_REGISTRY, "MODEL.EQLOSSES.CLASSIFICATION.LOSS", "loss"),
    Kind(CLASSIFIER_HEAD_REGISTRY, "MODEL.EQLOSSES.CLASSIFICATION.HEAD", "classifier head"),
    Kind(PIXEL_LOSS_REGISTRY, "MODEL.EQLOSSES.SEM_SEG.LOSS", "pixel loss"),
)


def _kind(registry: Registry) -> Kind:
    for kind in KINDS:
        if kind.registry is registry:
            return kind
    return Kind(registry, registry._name, "")


def register(registry: Registry):
    """Class decorator: register a method class under its ``name`` (its config value), as
    ``registry.register()`` does under the class's ``__name__``."""

    def deco(cls):
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__}: a class registered in {registry._name} needs a 'name' (its config value)")
        if name in registry:
            raise KeyError(f"{registry._name}: '{name}' is registered twice ({registry.get(name).__qualname__}, {cls.__qualname__})")
        registry._do_register(name, cls)
        return cls

    return deco


def registered(registry: Registry) -> Dict[str, type]:
    """{name: object} of a registry, sorted by name."""
    return dict(sorted(registry, key=lambda item: item[0]))


def names(registry: Registry) -> List[str]:
    """The registered names, sorted."""
    return list(registered(registry))


def lookup(registry: Registry, name: str):
    """The object registered as ``name``, or a ``KeyError`` in one line that names the config key
    and lists the registered names."""
    if name in registry:
        return registry.get(name)
    kind = _kind(registry)
    noun = f"{kind.noun} " if kind.noun else ""
    raise KeyError(f"{kind.key}: unknown {noun}'{name}' (known: {', '.join(names(registry))})")


def config_node(cfg, path: str):
    """The node at ``path`` ("MODEL.EQLOSSES.SEESAW") of ``cfg``, created (empty, of ``cfg``'s own
    node class) where missing: what a method's ``add_config`` fills with its keys."""
    node = cfg
    for part in path.split("."):
        if part not in node:
            node[part] = type(cfg)()
        node = node[part]
    return node


def add_registered_configs(cfg):
    """Every registered method's config node and defaults (``cls.add_config(cfg)``), kind by kind."""
    for kind in KINDS:
        for _, cls in registered(kind.registry).items():
            add_config = getattr(cls, "add_config", None)
            if add_config is not None:
                add_config(cfg)
    return cfg
