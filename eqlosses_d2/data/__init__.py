from .class_stats import ClassStatistics, compute_class_statistics, load_class_statistics
from .copy_paste import CopyPasteDatasetMapper, merge_lvis_id_lists, paste_source_weights
from .datasets import DatasetError, get_class_statistics, prepare_dataset, register_synthetic_lvis
from .synthetic import QUICKSTART_SPEC, TINY_SPEC, SyntheticLVISSpec, ensure_synthetic_lvis

__all__ = [
    "ClassStatistics",
    "compute_class_statistics",
    "load_class_statistics",
    "CopyPasteDatasetMapper",
    "merge_lvis_id_lists",
    "paste_source_weights",
    "DatasetError",
    "get_class_statistics",
    "prepare_dataset",
    "register_synthetic_lvis",
    "QUICKSTART_SPEC",
    "TINY_SPEC",
    "SyntheticLVISSpec",
    "ensure_synthetic_lvis",
]
