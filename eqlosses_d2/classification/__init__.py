"""
Long-tailed image classification on Detectron2 (issue 19): ``LongTailImageClassifier``
(``META_ARCH_REGISTRY``), classifier heads (:mod:`.heads`), losses (:mod:`.losses`, one file per
method), data (:mod:`.data`: the embedded long-tailed set, ImageNet-LT / Places-LT registration, the
mapper, class-aware samplers, loaders) and evaluation (:mod:`.evaluator`). ``import eqlosses_d2``
registers all of it.
"""
from .config import add_classification_config, is_classification
from .heads import ClassifierHead, CosineHead, LinearHead, build_head
from .losses import ImageClassificationLoss, build_image_loss
from . import data as _data  # noqa: F401,E402  # registration: datasets
from . import backbones as _backbones  # noqa: F401,E402  # registration: BACKBONE_REGISTRY (CIFAR ResNet)
from .meta_arch import LongTailImageClassifier  # noqa: E402  # registration: META_ARCH_REGISTRY
from .evaluator import ClassificationEvaluator, format_accuracy_table, split_accuracies  # noqa: E402
from . import checks as _checks  # noqa: F401,E402  # registration: the config check
from . import difficulty as _difficulty  # noqa: F401,E402  # registration: the difficulty-set check

__all__ = ["add_classification_config", "is_classification", "ClassifierHead", "CosineHead", "LinearHead",
           "build_head", "ImageClassificationLoss", "build_image_loss", "LongTailImageClassifier",
           "ClassificationEvaluator", "format_accuracy_table", "split_accuracies"]
