"""
Per-class statistics of a semantic segmentation set, computed from its label masks
(:class:`~eqlosses_d2.segmentation.stats.SemSegClassStatistics`: ``pixel_count``, ``image_count``,
``num_images``, ``num_images_with_annotations``), and cached on disk.

A mask is a single-channel image of class indices (uint8 or 16-bit PNG, palette PNGs read as
their indices), ``ignore_label`` (255) where unlabelled; Detectron2's ADE20K masks
(``annotations_detectron2``) are of that kind. Ignored pixels count for no class; an image whose
pixels are all ignored counts in ``num_images`` but not in ``num_images_with_annotations``. A
label that is neither a class (``0 .. num_classes-1``) nor the ignore value, a missing, unreadable
or multi-channel mask is refused with a one-line :class:`~eqlosses_d2.data.DatasetError` naming
the file (a wrong ``num_classes`` or a mask set of another label convention would otherwise
train silently on wrong targets).

Reading ADE20K's 20,210 training masks takes about a minute, so the statistics are cached as json
in ``<cache_dir()>/sem_seg/`` (:func:`eqlosses_d2.data.class_stats.cache_dir`: ``$EQLOSSES_D2_CACHE``,
else ``$XDG_CACHE_HOME/eqlosses_d2``, else ``~/.cache/eqlosses_d2``; written atomically), keyed by
the number of classes, the ignore value and every mask's absolute path, size and modification
time, in order: a mask changed, added or removed is a new key. A cache that cannot be written
costs a warning, never the statistics.
"""
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...data.class_stats import _write_cache, cache_dir
from ...data.datasets import DatasetError
from ..stats import SemSegClassStatistics

__all__ = ["mask_histogram", "compute_sem_seg_statistics", "load_sem_seg_statistics", "statistics_cache_file"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


def _where(dataset_name):
    return f"dataset '{dataset_name}': " if dataset_name else ""


def mask_histogram(path: str, num_classes: int, ignore_label: int = 255, dataset_name: str = None) -> np.ndarray:
    """(num_classes,) int64 labelled pixels of each class in the mask ``path`` (ignored pixels
    left out); a bad mask raises :class:`DatasetError` (see the module docstring)."""
    from PIL import Image

    where = _where(dataset_name)
    try:
        with Image.open(path) as image:
            labels = np.asarray(image)
    except FileNotFoundError:
        raise DatasetError(f"{where}mask {path} not found") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(f"{where}mask {path} is not a readable image ({type(e).__name__}: {e})") from None
    if labels.ndim != 2:
        raise DatasetError(f"{where}mask {path} has shape {labels.shape}, not a single-channel label map")
    if labels.dtype.kind not in "ui" or (labels.dtype.kind == "i" and labels.size and labels.min() < 0):
        raise DatasetError(f"{where}mask {path} holds {labels.dtype} values, not non-negative class indices")
    counts = np.bincount(labels.reshape(-1), minlength=num_classes).astype(np.int64)
    outside = np.flatnonzero(counts[num_classes:]) + num_classes
    outside = outside[outside != ignore_label]
    if len(outside):
        bad = int(outside[0])
        raise DatasetError(
            f"{where}mask {path} has label {bad} at {int(counts[bad])} pixels, neither a class "
            f"(0..{num_classes - 1}) nor the ignore value {ignore_label}"
        )
    return counts[:num_classes]


def compute_sem_seg_statistics(mask_files, num_classes: int, ignore_label: int = 255, dataset_name: str = None,
                               num_workers: int = None) -> SemSegClassStatistics:
    """The statistics of a list of masks (one per training image), read with ``num_workers``
    threads (default: up to 8; PNG decoding releases the GIL)."""
    mask_files = list(mask_files)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    pixel_count = np.zeros(num_classes, dtype=np.int64)
    image_count = np.zeros(num_classes, dtype=np.int64)
    with_annotations = 0

    def histogram(path):
        return mask_histogram(path, num_classes, ignore_label, dataset_name)

    if num_workers > 1 and len(mask_files) > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            histograms = pool.map(histogram, mask_files, chunksize=16)
            for counts in histograms:
                pixel_count += counts
                image_count += counts > 0
                with_annotations += bool(counts.any())
    else:
        for path in mask_files:
            counts = histogram(path)
            pixel_count += counts
            image_count += counts > 0
            with_annotations += bool(counts.any())
    return SemSegClassStatistics(image_count=image_count.tolist(), pixel_count=pixel_count.tolist(),
                                 num_images=len(mask_files), num_images_with_annotations=int(with_annotations))


def statistics_cache_file(mask_files, num_classes: int, ignore_label: int = 255, dataset_name: str = None) -> str:
    """The cache file of these masks (see the module docstring); a missing mask raises
    :class:`DatasetError` naming it."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{num_classes}|{ignore_label}".encode())
    for path in mask_files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DatasetError(f"{_where(dataset_name)}mask {path} not found") from None
        digest.update(f"|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return os.path.join(cache_dir(), "sem_seg", digest.hexdigest()[:24] + ".json")


def load_sem_seg_statistics(mask_files, num_classes: int, ignore_label: int = 255, dataset_name: str = None,
                            use_cache: bool = True, num_workers: int = None) -> SemSegClassStatistics:
    """The statistics of these masks, from the cache when none changed, else computed (and
    cached)."""
    mask_files = list(mask_files)
    cache_file = statistics_cache_file(mask_files, num_classes, ignore_label, dataset_name)
    if use_cache and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                stats = SemSegClassStatistics.from_dict(json.load(f))
            if stats.num_classes == num_classes and stats.num_images == len(mask_files):
                return stats
        except (OSError, ValueError, TypeError, KeyError):
            pass
        logger.warning("Ignoring unreadable semantic segmentation statistics cache %s", cache_file)
    logger.info("Computing per-class pixel and image counts of %d masks%s", len(mask_files),
                f" ({dataset_name})" if dataset_name else "")
    stats = compute_sem_seg_statistics(mask_files, num_classes, ignore_label, dataset_name, num_workers)
    if use_cache:
        _write_cache(cache_file, stats)
    return stats
