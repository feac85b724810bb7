"""
Classifier heads of the long-tailed image classifier: pure PyTorch, one file per head,
registered by name in ``CLASSIFIER_HEAD_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.HEAD``);
interface in :mod:`.base`.
"""
from ...registry import CLASSIFIER_HEAD_REGISTRY
from .base import ClassifierHead, build_head

# registration: one module per head
from .linear import LinearHead  # noqa: E402
from .cosine import CosineHead  # noqa: E402
from .tau_norm import TauNormHead  # noqa: E402
from .lws import LearnableWeightScalingHead  # noqa: E402
from .marc import MarginCalibrationHead  # noqa: E402
from .tde import TDEHead  # noqa: E402
from .vmf import VMFHead  # noqa: E402

__all__ = ["CLASSIFIER_HEAD_REGISTRY", "ClassifierHead", "LinearHead", "CosineHead", "build_head"]
