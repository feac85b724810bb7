"""
Long-tailed semantic segmentation on Detectron2 (issue 20): Detectron2's ``SemanticSegmentor``
with heads registered in its ``SEM_SEG_HEADS_REGISTRY`` (:mod:`.heads`) whose per-pixel loss comes
from ``PIXEL_LOSS_REGISTRY`` (:mod:`.losses`, one file per method), data (:mod:`.data`: the
embedded long-tailed segmentation set, ADE20K's per-class counts) and evaluation (:mod:`.evaluator`).
``import eqlosses_d2`` registers all of it.
"""
from .config import add_sem_seg_config, is_semantic_segmentation
from .losses import PixelLoss, build_pixel_loss
from .stats import SemSegClassStatistics, SemSegClassStatsBuffers

__all__ = ["add_sem_seg_config", "is_semantic_segmentation", "PixelLoss", "build_pixel_loss",
           "SemSegClassStatistics", "SemSegClassStatsBuffers"]

from .heads import LongTailDeepLabV3PlusHead, LongTailSemSegFPNHead  # noqa: E402  # registration: SEM_SEG_HEADS_REGISTRY
from . import checks as _checks  # noqa: F401,E402  # registration: the config check

__all__ += ["LongTailSemSegFPNHead", "LongTailDeepLabV3PlusHead"]
from . import data as _data  # noqa: F401,E402  # registration: the embedded segmentation sets, ADE20K's metadata
from .data import get_sem_seg_class_statistics, prepare_sem_seg_dataset  # noqa: E402
from .evaluator import LongTailSemSegEvaluator, format_sem_seg_table  # noqa: E402

__all__ += ["get_sem_seg_class_statistics", "prepare_sem_seg_dataset", "LongTailSemSegEvaluator",
            "format_sem_seg_table"]
