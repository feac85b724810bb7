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

The annotations are checked on the way (a file is refused with a ``ValueError`` naming it
and the annotation): every ``category_id`` must be a category of the file, every box
``[x, y, width, height]`` must have a non-negative width and height (Detectron2 would
turn ``[x, y, -5, h]`` into another box beside the object and train on it), and with
``lvis_polygons`` every polygon must have at least 3 points (Detectron2's LVIS loader
asserts on one that has not; its COCO loader drops such an instance). A malformed file is
refused rather than cleaned: what is wrong with it is rarely one annotation, and a file
half used by statistics and training alike is no better than a fixed file.

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
_CACHE_VERSION = 2  # 2: annotations checked before statistics are cached


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


def _annotation_name(ann):
    return f"annotation {ann.get('id')} (image {ann.get('image_id')})"


def check_annotation(ann, lvis_polygons: bool = False) -> None:
    """Refuse (``ValueError`` naming the annotation) a box of negative width or height and,
    with ``lvis_polygons``, a polygon of fewer than 3 points (see the module docstring)."""
    bbox = ann.get("bbox")
    if bbox is not None:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{_annotation_name(ann)} has bbox {bbox!r}, not [x, y, width, height]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(
                f"{_annotation_name(ann)} has bbox {list(bbox)} of negative size ([x, y, width, height]; "
                f"Detectron2 would train another box beside the object)"
            )
    segmentation = ann.get("segmentation")
    if lvis_polygons and isinstance(segmentation, list):
        if not segmentation:
            raise ValueError(f"{_annotation_name(ann)} has an empty segmentation (Detectron2's LVIS loader refuses it)")
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)):
                raise ValueError(f"{_annotation_name(ann)} has a polygon {polygon!r} that is not a list of coordinates")
            if len(polygon) % 2 or len(polygon) < 6:
                raise ValueError(
                    f"{_annotation_name(ann)} has a polygon of {len(polygon)} coordinates (at least 3 x, y points "
                    f"are needed; Detectron2's LVIS loader refuses it)"
                )


def compute_class_statistics(dataset, lvis_polygons: bool = False) -> ClassStatistics:
    """Statistics of a loaded LVIS/COCO-format dict (``images``, ``annotations``,
    ``categories``), its annotations checked (see the module docstring)."""
    if not isinstance(dataset, dict):
        raise ValueError(f"annotation file holds a {type(dataset).__name__}, not a dict with 'images', "
                         f"'annotations' and 'categories'")
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
        c = index.get(ann.get("category_id"))
        if c is None:
            raise ValueError(f"annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}")
        check_annotation(ann, lvis_polygons)
        if ann.get("iscrowd", 0):
            continue
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


def load_class_statistics(json_file: str, use_cache: bool = True, lvis_polygons: bool = False) -> ClassStatistics:
    """Statistics of an annotation file, from the on-disk cache when the file is unchanged
    (and was checked the same way: ``lvis_polygons``, see the module docstring). A file
    that cannot be parsed or is malformed is refused with a ``ValueError`` naming it."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    cache_file = None
    if use_cache:
        directory = cache_dir()
        st = os.stat(json_file)
        key = f"{_CACHE_VERSION}|{os.path.abspath(json_file)}|{st.st_size}|{st.st_mtime_ns}"
        key += "|lvis_polygons" if lvis_polygons else ""
        cache_file = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if cache_file is not None and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                return ClassStatistics.from_dict(json.load(f))
        except (OSError, ValueError, TypeError, KeyError):
            logger.warning("Ignoring unreadable class-statistics cache %s", cache_file)
    logger.info("Computing per-class statistics of %s", json_file)
    with open(json_file, "rb") as f:
        try:
            dataset = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{json_file}: not valid JSON (truncated?): {e}") from None
    try:
        stats = compute_class_statistics(dataset, lvis_polygons=lvis_polygons)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        message = str(e) if isinstance(e, ValueError) else f"malformed ({type(e).__name__}: {e})"
        raise ValueError(f"{json_file}: {message}") from None
    if cache_file is not None:
        _write_cache(cache_file, stats)
    return stats
