"""
The config check of semantic segmentation (a registered ``CONFIG_CHECK_REGISTRY`` function, run by
:func:`eqlosses_d2.config.validate_config` with the others): one-line errors for the segmentation
keys, found before ``OUTPUT_DIR`` is written. It builds the configured pixel loss on a toy size, so
an unknown name or a bad hyper-parameter is caught here.
"""
from ..config import ConfigError
from ..registry import CONFIG_CHECK_REGISTRY
from .config import SEM_SEG_HEADS, is_semantic_segmentation
from .losses import build_pixel_loss
from .training import POLY_LR_SCHEDULER

__all__ = ["validate_sem_seg"]


@CONFIG_CHECK_REGISTRY.register()
def validate_sem_seg(cfg):
    """One-line errors for the semantic segmentation keys (of a ``SemanticSegmentor`` config only)."""
    if cfg.SOLVER.LR_SCHEDULER_NAME == POLY_LR_SCHEDULER:
        solver = cfg.SOLVER.EQLOSSES
        if solver.POLY_LR_POWER <= 0:
            raise ConfigError(f"SOLVER.EQLOSSES.POLY_LR_POWER must be > 0, got {solver.POLY_LR_POWER}")
        if not 0 <= solver.POLY_LR_END <= cfg.SOLVER.BASE_LR:
            raise ConfigError(
                f"SOLVER.EQLOSSES.POLY_LR_END must be in [0, SOLVER.BASE_LR {cfg.SOLVER.BASE_LR}], "
                f"got {solver.POLY_LR_END}"
            )
    if not is_semantic_segmentation(cfg):
        return
    head = cfg.MODEL.SEM_SEG_HEAD
    # the head name: eqlosses_d2.modeling.config_checks (every registry name of a config)
    if head.NUM_CLASSES < 1:
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be >= 1, got {head.NUM_CLASSES}")
    node = cfg.MODEL.EQLOSSES.SEM_SEG
    try:
        build_pixel_loss(node, 2, ignore_value=head.IGNORE_VALUE)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    except ValueError as e:
        raise ConfigError(f"MODEL.EQLOSSES.SEM_SEG.{e}") from None
    if head.NAME not in SEM_SEG_HEADS and node.LOSS != "softmax":
        raise ConfigError(
            f"MODEL.EQLOSSES.SEM_SEG.LOSS '{node.LOSS}' needs a head of eqlosses_d2 ({', '.join(SEM_SEG_HEADS)}); "
            f"MODEL.SEM_SEG_HEAD.NAME '{head.NAME}' computes its own loss"
        )
    if not 0 <= node.RARE_MAX_IMAGES <= node.COMMON_MAX_IMAGES:
        raise ConfigError(
            f"MODEL.EQLOSSES.SEM_SEG.RARE_MAX_IMAGES {node.RARE_MAX_IMAGES} must be in [0, COMMON_MAX_IMAGES "
            f"{node.COMMON_MAX_IMAGES}]"
        )
    if head.NAME == "LongTailDeepLabV3PlusHead":
        deeplab = node.DEEPLAB
        if len(deeplab.ASPP_DILATIONS) != 3:
            raise ConfigError(
                f"MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_DILATIONS needs 3 rates, got {list(deeplab.ASPP_DILATIONS)}"
            )
        if len(deeplab.PROJECT_CHANNELS) != len(head.IN_FEATURES) - 1:
            raise ConfigError(
                f"MODEL.EQLOSSES.SEM_SEG.DEEPLAB.PROJECT_CHANNELS has {len(deeplab.PROJECT_CHANNELS)} values for the "
                f"{len(head.IN_FEATURES) - 1} low-level features of MODEL.SEM_SEG_HEAD.IN_FEATURES "
                f"{list(head.IN_FEATURES)}"
            )
        if not 0 <= deeplab.ASPP_DROPOUT < 1:
            raise ConfigError(
                f"MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_DROPOUT must be in [0, 1), got {deeplab.ASPP_DROPOUT}"
            )
    area = cfg.INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA
    if not 0 < area <= 1:
        raise ConfigError(f"INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA must be in (0, 1], got {area}")
