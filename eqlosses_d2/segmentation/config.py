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
    _add_head_config(cfg)
    return cfg


def _add_head_config(cfg):
    """The keys of the heads (eqlosses_d2/segmentation/heads) and of their training (train_net.py)."""
    # LongTailDeepLabV3PlusHead (heads/deeplab.py); its other keys are Detectron2's MODEL.SEM_SEG_HEAD
    # (IN_FEATURES: ASPP on the last, decoder stages on the others; CONVS_DIM: decoder channels).
    deeplab = config_node(cfg, "MODEL.EQLOSSES.SEM_SEG.DEEPLAB")
    # ASPP output channels.
    deeplab.ASPP_CHANNELS = 256
    # ASPP's three atrous rates (6, 12, 18 at output stride 16).
    deeplab.ASPP_DILATIONS = [6, 12, 18]
    # Dropout on ASPP's output.
    deeplab.ASPP_DROPOUT = 0.1
    # ASPP's image pooling over a window of the training crop's size (Detectron2's DeepLab project, which
    # needs test feature maps divisible by it) instead of global average pooling (the paper, mmsegmentation).
    deeplab.ASPP_POOL_KERNEL_FROM_CROP = False
    # Channels of the 1x1 projection of each low-level feature (IN_FEATURES but the last; 48 in the paper).
    deeplab.PROJECT_CHANNELS = [48]
    # Depthwise-separable convs in ASPP and the decoder (one 5x5 per decoder stage instead of two 3x3).
    deeplab.USE_DEPTHWISE_SEPARABLE_CONV = False
    inputs = config_node(cfg, "INPUT.EQLOSSES.SEM_SEG")
    # With INPUT.CROP.ENABLED: random crops are redrawn (up to 10 times) until no single class covers more than
    # this fraction of the crop's labelled pixels (Detectron2's RandomCrop_CategoryAreaConstraint, mmsegmentation's
    # cat_max_ratio 0.75 on ADE20K); 1.0: plain random crops.
    inputs.CROP_SINGLE_CATEGORY_MAX_AREA = 1.0
    solver = config_node(cfg, "SOLVER.EQLOSSES")
    # SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR": lr = (BASE_LR - POLY_LR_END) * (1 - iter / MAX_ITER) ** POLY_LR_POWER
    # + POLY_LR_END (mmsegmentation's poly schedule; DeepLab's with POLY_LR_END 0), times Detectron2's warmup factor.
    solver.POLY_LR_POWER = 0.9
    # The learning rate the poly schedule ends at (mmsegmentation: min_lr 1e-4).
    solver.POLY_LR_END = 0.0
