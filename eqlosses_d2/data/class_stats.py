"""
Per-class statistics of an LVIS- or COCO-format training set, computed from its
annotation file (never from hard-coded tables).

- ``image_count[c]``: training images with at least one annotation of class c.
- ``instance_count[c]``: annotations of class c.
- ``frequency[c]``: LVIS group, 'r' (1-10 images), 'c' (11-100) or 'f' (>100); taken
  from the category's ``frequency`` field when the file has one (LVIS), else derived
  from ``image_count`` with the same thresholds.
- ``num_images``: all images in the file (IIF's M; 100,170 on LVIS v1 train).
- ``num_images_with_annotations``: images with at least one annotation (EQL/EQLv2/RFS
  normalise by it; 99,388 on LVIS v1 train).

Classes are indexed contiguously in the order of sorted category ids, as Detectron2's
loaders do. Parsing LVIS v1 train takes a while, so results are cached on disk, keyed by
the file's path, size and modification time, in ``$EQLOSSES_D2_CACHE/class_stats`` (the
environment variable that also places the model zoo's downloads), else
``$XDG_CACHE_HOME/eqlosses_d2/class_stats``, else ``~/.cache/eqlosses_d2/class_stats``.
A cache that cannot be written (a read-only home, a full disk) costs one warning and a
recomputation next time, never the statistics.
"""
import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from typing import List

import numpy as np

from ..atomic import atomic_write

__all__ = [
    "ClassStatistics",
    "compute_class_statistics",
    "load_class_statistics",
    "frequency_group",
    "FREQUENCY_GROUPS",
]

logger = logging.getLogger(__name__)

FREQUENCY_GROUPS = ("r", "c", "f")
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
_CACHE_VERSION = 1


def frequency_group(image_count: int) -> str:
    """LVIS frequency group of a class that appears in ``image_count`` training images."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


@dataclasses.dataclass
class ClassStatistics:
    category_ids: List[int]
    class_names: List[str]
    image_count: np.ndarray
    instance_count: np.ndarray
    frequency: List[str]
    num_images: int
    num_images_with_annotations: int

    @property
    def num_classes(self):
        return len(self.category_ids)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["image_count"] = self.image_count.tolist()
        d["instance_count"] = self.instance_count.tolist()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["image_count"] = np.asarray(d["image_count"], dtype=np.int64)
        d["instance_count"] = np.asarray(d["instance_count"], dtype=np.int64)
        return cls(**d)

    def class_image_count(self):
        """Detectron2 main's ``class_image_count`` metadata format."""
        return [{"id": i, "image_count": int(n)} for i, n in zip(self.category_ids, self.image_count)]


def compute_class_statistics(dataset) -> ClassStatistics:
    """Statistics of a loaded LVIS/COCO-format dict (``images``, ``annotations``, ``categories``)."""
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"annotation file has no '{key}' list")
    categories = sorted(dataset["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    num_classes = len(categories)
    images_per_class = defaultdict(set)
    instance_count = np.zeros(num_classes, dtype=np.int64)
    annotated_images = set()
    for ann in dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        c = index.get(ann["category_id"])
        if c is None:
            raise ValueError(f"annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        instance_count[c] += 1
        images_per_class[c].add(ann["image_id"])
        annotated_images.add(ann["image_id"])
    image_count = np.array([len(images_per_class[c]) for c in range(num_classes)], dtype=np.int64)
    frequency = [
        cat["frequency"] if cat.get("frequency") in FREQUENCY_GROUPS else frequency_group(int(n))
        for cat, n in zip(categories, image_count)
    ]
    return ClassStatistics(
        category_ids=[c["id"] for c in categories],
        class_names=[c["name"] for c in categories],
        image_count=image_count,
        instance_count=instance_count,
        frequency=frequency,
        num_images=len(dataset["images"]),
        num_images_with_annotations=len(annotated_images),
    )


#: environment variable naming eqlosses_d2's cache directory (the model zoo's downloads too)
CACHE_ENV = "EQLOSSES_D2_CACHE"
_UNWRITABLE_WARNED = set()


def cache_dir() -> str:
    """The class-statistics cache directory (see the module docstring)."""
    root = os.environ.get(CACHE_ENV, "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "eqlosses_d2")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "class_stats")


def _write_cache(cache_file, stats):
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        atomic_write(cache_file, lambda f: json.dump(stats.to_dict(), f), binary=False)
    except OSError as e:
        directory = os.path.dirname(cache_file)
        if directory not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add(directory)
            logger.warning(
                f"Class-statistics cache not written ({type(e).__name__}: {e}); the statistics are recomputed "
                f"each run: set {CACHE_ENV} to a writable directory"
            )


def load_class_statistics(json_file: str, use_cache: bool = True) -> ClassStatistics:
    """Statistics of an annotation file, from the on-disk cache when the file is unchanged."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    cache_file = None
    if use_cache:
        directory = cache_dir()
        st = os.stat(json_file)
        key = f"{_CACHE_VERSION}|{os.path.abspath(json_file)}|{st.st_size}|{st.st_mtime_ns}"
        cache_file = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if cache_file is not None and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                return ClassStatistics.from_dict(json.load(f))
        except (OSError, ValueError, TypeError, KeyError):
            logger.warning("Ignoring unreadable class-statistics cache %s", cache_file)
    logger.info("Computing per-class statistics of %s", json_file)
    with open(json_file) as f:
        stats = compute_class_statistics(json.load(f))
    if cache_file is not None:
        _write_cache(cache_file, stats)
    return stats
