"""
The config check of the names Detectron2's own registries resolve (``MODEL.META_ARCHITECTURE``,
``MODEL.ROI_HEADS.NAME``, ...): an unknown one is a one-line :class:`~eqlosses_d2.config.ConfigError`
that lists the registered names, found with the other config checks
(:func:`eqlosses_d2.config.validate_config`), before the run writes anything, instead of a
``KeyError`` traceback while the model is built.
"""
from detectron2.modeling import (
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    RPN_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
)

from ..config import CONFIG_CHECK_REGISTRY, ConfigError
from ..registry import names

__all__ = ["DETECTRON2_NAMED_KEYS", "validate_detectron2_names"]

#: config key -> the Detectron2 registry its value names (and values Detectron2 accepts besides)
DETECTRON2_NAMED_KEYS = {
    "MODEL.META_ARCHITECTURE": (META_ARCH_REGISTRY, ()),
    "MODEL.BACKBONE.NAME": (BACKBONE_REGISTRY, ()),
    "MODEL.ANCHOR_GENERATOR.NAME": (ANCHOR_GENERATOR_REGISTRY, ()),
    "MODEL.PROPOSAL_GENERATOR.NAME": (PROPOSAL_GENERATOR_REGISTRY, ("PrecomputedProposals",)),
    "MODEL.RPN.HEAD_NAME": (RPN_HEAD_REGISTRY, ()),
    "MODEL.ROI_HEADS.NAME": (ROI_HEADS_REGISTRY, ()),
    "MODEL.ROI_BOX_HEAD.NAME": (ROI_BOX_HEAD_REGISTRY, ()),
    "MODEL.ROI_MASK_HEAD.NAME": (ROI_MASK_HEAD_REGISTRY, ()),
    "MODEL.ROI_KEYPOINT_HEAD.NAME": (ROI_KEYPOINT_HEAD_REGISTRY, ()),
    "MODEL.SEM_SEG_HEAD.NAME": (SEM_SEG_HEADS_REGISTRY, ()),
}


@CONFIG_CHECK_REGISTRY.register()
def validate_detectron2_names(cfg):
    """Every name a config gives one of Detectron2's registries is registered (one line)."""
    for key, (registry, also_accepted) in DETECTRON2_NAMED_KEYS.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if not node or node in registry or node in also_accepted:  # "": unset (Detectron2's default for some)
            continue
        known = names(registry) + list(also_accepted)
        raise ConfigError(f"{key}: unknown '{node}' in Detectron2's {registry._name} registry (known: {', '.join(known)})")
