"""
eqlosses_d2: long-tailed detection and instance segmentation (LVIS) on Detectron2.

``import eqlosses_d2`` applies the Detectron2 compatibility shims and registers
everything the configs name (RoI heads, datasets, evaluators).
"""
from .compat import apply_detectron2_patches

apply_detectron2_patches()  # before anything imports detectron2.layers

from .config import add_eqlosses_config  # noqa: E402
from . import data as _data  # noqa: E402,F401  # registration: datasets
from . import modeling as _modeling  # noqa: E402,F401  # registration: RoI heads
from . import model_zoo  # noqa: E402,F401  # registration: eqlosses_d2:// paths (Detectron2's PathManager)
from . import classification as _classification  # noqa: E402,F401  # registration: image classifier, its heads, losses, datasets
from . import segmentation as _segmentation  # noqa: E402,F401  # registration: semantic segmentation heads, pixel losses, datasets
from .data import ClassStatistics, get_class_statistics, prepare_dataset  # noqa: E402
from .data import CopyPasteDatasetMapper  # noqa: E402
from .modeling import ClassStatsBuffers, LongTailStandardROIHeads, find_class_stats  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "add_eqlosses_config",
    "apply_detectron2_patches",
    "ClassStatistics",
    "ClassStatsBuffers",
    "CopyPasteDatasetMapper",
    "LongTailStandardROIHeads",
    "find_class_stats",
    "get_class_statistics",
    "prepare_dataset",
]
