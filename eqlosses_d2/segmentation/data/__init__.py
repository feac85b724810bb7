"""Data of long-tailed semantic segmentation: the embedded set (:mod:`.synthetic`), registration and
preparation (:mod:`.datasets`: the embedded splits, ADE20K's metadata), per-class statistics from
the masks (:mod:`.statistics`, cached)."""
from .datasets import (ADE20K_SEM_SEG_DATASETS, SYNTHETIC_SEM_SEG_DATASETS, get_sem_seg_class_statistics,
                       prepare_sem_seg_dataset, register_ade20k_sem_seg, register_synthetic_sem_seg,
                       training_split_of)
from .statistics import compute_sem_seg_statistics, load_sem_seg_statistics, mask_histogram
from .synthetic import QUICKSTART_SEM_SEG_SPEC, TINY_SEM_SEG_SPEC, SyntheticSemSegSpec

__all__ = ["ADE20K_SEM_SEG_DATASETS", "SYNTHETIC_SEM_SEG_DATASETS", "get_sem_seg_class_statistics",
           "prepare_sem_seg_dataset", "register_ade20k_sem_seg", "register_synthetic_sem_seg", "training_split_of",
           "compute_sem_seg_statistics", "load_sem_seg_statistics", "mask_histogram", "QUICKSTART_SEM_SEG_SPEC",
           "TINY_SEM_SEG_SPEC", "SyntheticSemSegSpec"]
