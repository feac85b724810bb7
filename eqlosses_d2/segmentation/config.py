"""
The config keys of long-tailed semantic segmentation, under ``MODEL.EQLOSSES.SEM_SEG`` and
``TEST.EQLOSSES.SEM_SEG`` (our own nodes; no upstream leaf name reused).

:func:`add_sem_seg_config` adds the keys every segmentation run shares (the pixel loss by its
registry name, the frequency groups); each pixel loss declares its own node
(``MODEL.EQLOSSES.SEM_SEG.<NODE>``) in ``add_config`` and calls this function first, so that
:func:`eqlosses_d2.add_eqlosses_config` (which collects every registered class's ``add_config``)
adds everything. The heads themselves are Detectron2's ``MODEL.SEM_SEG_HEAD`` (``NAME``,
``NUM_CLASSES``, ``IGNORE_VALUE``, ``COMMON_STRIDE``, ``LOSS_WEIGHT``, ...).
"""
from ..registry import config_node

__all__ = ["SEM_SEG_HEADS", "add_sem_seg_config", "is_semantic_segmentation"]

#: the heads of this package (``MODEL.SEM_SEG_HEAD.NAME``), whose pixel loss comes from the registry
SEM_SEG_HEADS = ("LongTailSemSegFPNHead", "LongTailDeepLabV3PlusHead")


def is_semantic_segmentation(cfg) -> bool:
    """Whether ``cfg`` trains a semantic segmenter (Detectron2's ``SemanticSegmentor``)."""
    return cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"


def add_sem_seg_config(cfg):
    """The shared keys (idempotent: an existing node is left as it is)."""
    node = config_node(cfg, "MODEL.EQLOSSES.SEM_SEG")
    if "LOSS" in node:
        return cfg
    # Pixel loss of the semantic segmentation head, by its name in PIXEL_LOSS_REGISTRY.
    node.LOSS = "softmax"
    # Frequency groups of the classes by training images containing them: rare if at most RARE_MAX_IMAGES,
    # common if at most COMMON_MAX_IMAGES, else frequent (stored with the class statistics in the model;
    # the evaluator reports the mIoU of each group).
    node.RARE_MAX_IMAGES = 10
    node.COMMON_MAX_IMAGES = 100
    return cfg
