"""
The config check of long-tailed image classification (a registered ``CONFIG_CHECK_REGISTRY``
function, run by :func:`eqlosses_d2.config.validate_config` with the others): one-line errors
for the classification keys, found before ``OUTPUT_DIR`` is written. It builds the configured
head and loss on a toy size, so an unknown name or a bad hyper-parameter is caught here.
"""
from ..config import ConfigError
from ..registry import CONFIG_CHECK_REGISTRY
from .config import is_classification
from .data.samplers import SAMPLERS
from .heads import build_head
from .losses import build_image_loss

__all__ = ["validate_classification"]


@CONFIG_CHECK_REGISTRY.register()
def validate_classification(cfg):
    """One-line errors for the classification keys (of a classifier config only)."""
    if not is_classification(cfg):
        return
    node = cfg.MODEL.EQLOSSES.CLASSIFICATION
    if node.NUM_CLASSES < 1:
        raise ConfigError(f"MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES must be >= 1, got {node.NUM_CLASSES}")
    # 840 features (divisible by every head count up to 8, e.g. TDE.NUM_HEAD) and 2 classes: small
    for what, build in (("HEAD", lambda: build_head(node, 840, 2)), ("LOSS", lambda: build_image_loss(node, 2))):
        try:
            build()
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        except ValueError as e:
            raise ConfigError(f"MODEL.EQLOSSES.CLASSIFICATION.{e}") from None
    if node.TEST_IMS_PER_BATCH < 1:
        raise ConfigError(f"MODEL.EQLOSSES.CLASSIFICATION.TEST_IMS_PER_BATCH must be >= 1, got {node.TEST_IMS_PER_BATCH}")
    inputs = cfg.INPUT.EQLOSSES.CLASSIFICATION
    if not inputs.TRAIN_SHORT_EDGE or min(inputs.TRAIN_SHORT_EDGE) < 1 or inputs.TEST_SHORT_EDGE < 1:
        raise ConfigError("INPUT.EQLOSSES.CLASSIFICATION.TRAIN_SHORT_EDGE / TEST_SHORT_EDGE must be >= 1")
    for key in ("TRAIN_PAD", "TRAIN_CROP", "TEST_CROP"):
        if inputs[key] < 0:
            raise ConfigError(f"INPUT.EQLOSSES.CLASSIFICATION.{key} must be >= 0, got {inputs[key]}")
    if inputs.TRAIN_CROP > min(inputs.TRAIN_SHORT_EDGE):
        raise ConfigError(
            f"INPUT.EQLOSSES.CLASSIFICATION.TRAIN_CROP {inputs.TRAIN_CROP} exceeds the smallest TRAIN_SHORT_EDGE "
            f"{min(inputs.TRAIN_SHORT_EDGE)}"
        )
    if inputs.TEST_CROP > inputs.TEST_SHORT_EDGE:
        raise ConfigError(
            f"INPUT.EQLOSSES.CLASSIFICATION.TEST_CROP {inputs.TEST_CROP} exceeds TEST_SHORT_EDGE {inputs.TEST_SHORT_EDGE}"
        )
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler not in SAMPLERS:
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN: unknown '{sampler}' for classification (known: {', '.join(SAMPLERS)})")
