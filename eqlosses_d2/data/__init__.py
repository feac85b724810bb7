from . import cdb_sampler as _cdb_sampler  # noqa: F401  # its config check
from .class_stats import ClassStatistics, compute_class_statistics, load_class_statistics
from .copy_paste import CopyPasteDatasetMapper, merge_lvis_id_lists, paste_source_weights
from .datasets import DatasetError, get_class_statistics, prepare_dataset, register_synthetic_lvis
from .synthetic_spec import QUICKSTART_SPEC, TINY_SPEC, SyntheticLVISSpec


def __getattr__(name):
    """``ensure_synthetic_lvis``: the generator (:mod:`.synthetic`), imported on first use, not by
    ``import eqlosses_d2``."""
    if name == "ensure_synthetic_lvis":
        from .synthetic import ensure_synthetic_lvis

        return ensure_synthetic_lvis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
