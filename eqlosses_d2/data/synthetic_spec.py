"""
The synthetic dataset's spec (:class:`SyntheticLVISSpec`, its validation and the presets
``QUICKSTART_SPEC`` / ``TINY_SPEC``) and where generated data lives (:func:`default_data_root`):
what dataset registration needs, without the generator (:mod:`.synthetic`, which imports
Pillow and draws the images), so that ``import eqlosses_d2`` does not load it.
"""
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil

import numpy as np

from .class_stats import COMMON_MAX_IMAGES, RARE_MAX_IMAGES

__all__ = [
    "COLOURS",
    "FORMAT_VERSION",
    "LVIS_V1_GROUP_SIZES",
    "QUICKSTART_SPEC",
    "SHAPES",
    "SPLITS",
    "generate_once",
    "SyntheticLVISSpec",
    "TINY_SPEC",
    "default_data_root",
]

#: bump when the generated content changes for an unchanged spec (invalidates caches)
FORMAT_VERSION = 1

#: LVIS frequency groups, by number of training images: r <= 10 < c <= 100 < f
FREQUENT_MIN_IMAGES = COMMON_MAX_IMAGES + 1
#: LVIS v1 category counts per group (1203 in all); the generator uses these proportions
LVIS_V1_GROUP_SIZES = {"r": 337, "c": 461, "f": 405}
GROUPS = ("r", "c", "f")

SPLITS = ("train", "val")


def _regular(n, start_deg=-90.0):
    a = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points=5, inner=0.42):
    outer = _regular(2 * points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radii[:, None]


def _semicircle(n=13):
    a = np.pi * np.arange(n) / (n - 1)  # 0..180 deg: the lower half (y grows downwards)
    return np.stack([np.cos(a), np.sin(a)], 1)


_RAW_SHAPES = {
    "circle": _regular(24),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
    "triangle": _regular(3),
    "diamond": np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], float),  # not a square
    "pentagon": _regular(5),
    "hexagon": _regular(6, 0.0),
    "star": _star(),
    "cross": np.array(
        [[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1], [-.3, 1],
         [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]], float),
    "l_shape": np.array([[-.6, -1], [-.05, -1], [-.05, .45], [.6, .45], [.6, 1], [-.6, 1]], float),
    "arrow": np.array(
        [[-1, -.22], [.15, -.22], [.15, -.6], [1, 0], [.15, .6], [.15, .22], [-1, .22]], float),
    "semicircle": _semicircle(),
    "chevron": np.array([[-1, -.65], [0, .15], [1, -.65], [1, -.05], [0, .75], [-1, -.05]], float),
}


def _normalise(poly):
    poly = poly - (poly.min(0) + poly.max(0)) / 2  # rotate about the box centre
    return poly / np.sqrt((poly ** 2).sum(1)).max()  # circumradius 1: size = diameter


#: unit polygons (circumradius 1, no holes), in a fixed order
SHAPES = {name: _normalise(p) for name, p in _RAW_SHAPES.items()}
#: RGB colours, far apart from each other and from the grey backgrounds
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 200),
    "cyan": (30, 210, 220),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
_MIN_OBJECT_PX = 10  # never draw an object smaller than this (polygons degenerate)


@dataclasses.dataclass(frozen=True)
class SyntheticLVISSpec:
    """Everything that determines a synthetic dataset. Invalid values raise ValueError."""

    seed: int = 0
    num_categories: int = 30
    num_train_images: int = 900
    num_val_images: int = 200
    image_size: int = 128
    #: object size (circumscribed diameter) as a fraction of the image side
    min_object_frac: float = 0.12
    max_object_frac: float = 0.40
    #: upper end of the frequent categories' image counts (capped at num_train_images)
    max_frequent_images: int = 300
    max_categories_per_image: int = 5
    max_objects_per_image: int = 8
    #: mean number of annotated instances per (image, category) pair, in [1, 2.5]
    mean_instances_per_pair: float = 1.2
    #: fraction of (image, category) pairs with one extra, unannotated instance
    not_exhaustive_fraction: float = 0.03
    #: train: each image lists 0..this many absent categories as negatives
    max_train_neg_categories: int = 5
    #: val: each absent category is listed as negative with this probability
    val_neg_probability: float = 0.5
    min_val_images_per_category: int = 8
    #: minimal gap in pixels between the boxes of two objects
    placement_margin: int = 2

    def __post_init__(self):
        _validate(self)

    def key(self) -> str:
        """Short stable hash of all fields and FORMAT_VERSION (names the cache directory)."""
        payload = json.dumps({"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(self)},
                             sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    def group_sizes(self):
        """Number of categories per frequency group: {'r': .., 'c': .., 'f': ..}."""
        return _group_sizes(self.num_categories)


def _fail(field, message):
    raise ValueError(f"SyntheticLVISSpec.{field}: {message}")


def _check_int(spec, field, lo=None, hi=None):
    value = getattr(spec, field)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        _fail(field, f"must be an int (got {value!r})")
    if lo is not None and value < lo:
        _fail(field, f"must be >= {lo} (got {value})")
    if hi is not None and value > hi:
        _fail(field, f"must be <= {hi} (got {value})")


def _check_float(spec, field, lo, hi):
    value = getattr(spec, field)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        _fail(field, f"must be a number (got {value!r})")
    if not (lo <= value <= hi):
        _fail(field, f"must be in [{lo}, {hi}] (got {value})")


def _validate(spec):
    n_combos = len(SHAPES) * len(COLOURS)
    _check_int(spec, "seed", 0)
    _check_int(spec, "num_categories", 1, n_combos)
    _check_int(spec, "image_size", 32, 4096)
    _check_int(spec, "num_train_images", 1)
    _check_int(spec, "num_val_images", 1)
    _check_int(spec, "max_frequent_images", FREQUENT_MIN_IMAGES)
    _check_int(spec, "max_objects_per_image", 1)
    _check_int(spec, "max_categories_per_image", 1, spec.max_objects_per_image)
    _check_int(spec, "max_train_neg_categories", 0)
    _check_int(spec, "min_val_images_per_category", 1, spec.num_val_images)
    _check_int(spec, "placement_margin", 0, spec.image_size // 8)
    _check_float(spec, "min_object_frac", 0.01, 0.6)
    _check_float(spec, "max_object_frac", spec.min_object_frac, 0.6)
    _check_float(spec, "mean_instances_per_pair", 1.0, 2.5)
    _check_float(spec, "not_exhaustive_fraction", 0.0, 1.0)
    _check_float(spec, "val_neg_probability", 0.0, 1.0)
    if spec.max_object_frac * spec.image_size < _MIN_OBJECT_PX:
        _fail("max_object_frac", f"objects must be able to reach {_MIN_OBJECT_PX} px "
                                  f"(max_object_frac * image_size = "
                                  f"{spec.max_object_frac * spec.image_size:g})")
    sizes = _group_sizes(spec.num_categories)
    n_train, k = spec.num_train_images, spec.max_categories_per_image
    if sizes["f"] and n_train < FREQUENT_MIN_IMAGES:
        _fail("num_train_images", f"must be >= {FREQUENT_MIN_IMAGES} so that frequent categories "
                                  f"(> {COMMON_MAX_IMAGES} training images) exist (got {n_train})")
    ranges = _train_ranges(spec)
    lo_total = sum(sizes[g] * ranges[g][0] for g in GROUPS)
    hi_total = sum(sizes[g] * ranges[g][1] for g in GROUPS)
    if lo_total > n_train * k:
        _fail("num_train_images", f"too small: the long tail needs >= {lo_total} (image, category) "
                                  f"pairs but {n_train} images x max_categories_per_image={k} "
                                  f"hold only {n_train * k}")
    if hi_total < n_train:
        _fail("num_train_images", f"too large: every image needs a category, but "
                                  f"{spec.num_categories} categories cover at most {hi_total} "
                                  f"images (got {n_train})")
    n_val = spec.num_val_images
    if spec.num_categories * spec.min_val_images_per_category > n_val * k:
        _fail("num_val_images", f"too small: {spec.num_categories} categories x "
                                f"min_val_images_per_category={spec.min_val_images_per_category} "
                                f"do not fit into {n_val} images x max_categories_per_image={k}")


def _group_sizes(n):
    """Split n categories into r/c/f in LVIS v1 proportions (largest remainder), >= 1 each
    when n >= 3."""
    total = sum(LVIS_V1_GROUP_SIZES.values())
    exact = {g: n * LVIS_V1_GROUP_SIZES[g] / total for g in GROUPS}
    sizes = {g: int(math.floor(exact[g])) for g in GROUPS}
    by_remainder = sorted(GROUPS, key=lambda g: (-(exact[g] - sizes[g]), GROUPS.index(g)))
    for g in by_remainder[: n - sum(sizes.values())]:
        sizes[g] += 1
    if n >= 3:
        for g in GROUPS:
            while sizes[g] == 0:
                donor = max(GROUPS, key=lambda h: sizes[h])
                sizes[donor] -= 1
                sizes[g] += 1
    return sizes


def _train_ranges(spec):
    n = spec.num_train_images
    return {
        "r": (1, min(RARE_MAX_IMAGES, n)),
        "c": (RARE_MAX_IMAGES + 1, min(COMMON_MAX_IMAGES, n)),
        "f": (FREQUENT_MIN_IMAGES, min(spec.max_frequent_images, n)),
    }


#: the quickstart data: 30 categories (8 r / 12 c / 10 f), 900 train + 200 val images of
#: 128 px; generates in well under 30 s on 2 CPU cores
QUICKSTART_SPEC = SyntheticLVISSpec()
#: for unit tests: 6 categories (2 r / 2 c / 2 f), 120 train + 24 val images of 64 px (~1 s)
TINY_SPEC = SyntheticLVISSpec(num_categories=6, num_train_images=120, num_val_images=24,
                              image_size=64, max_frequent_images=120, max_categories_per_image=4,
                              max_objects_per_image=6, min_val_images_per_category=6,
                              max_train_neg_categories=3)


def default_data_root() -> str:
    """``$EQLOSSES_D2_DATA`` if set, else ``$XDG_CACHE_HOME/eqlosses_d2/datasets``
    (``~/.cache/eqlosses_d2/datasets``)."""
    root = os.environ.get("EQLOSSES_D2_DATA")
    if root:
        return os.path.expanduser(root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "eqlosses_d2", "datasets")


def generate_once(dataset_dir: str, is_complete, generate) -> str:
    """
    ``dataset_dir``, made by ``generate(dataset_dir)`` unless ``is_complete(dataset_dir)``:
    the embedded datasets' one way of being generated on first use. Complete directories
    appear atomically (each generator writes a temporary sibling ``<name>.tmp-*`` and renames
    it into place), so the fast path takes no lock. Otherwise an exclusive ``flock`` on
    ``<dataset dir>.lock`` serialises the check and the generation between the processes
    that ask at once, and the holder first removes what interrupted runs left behind
    (``<name>.tmp-*``, ``<name>.old-*``: nobody else writes them while it holds the lock).
    """
    if is_complete(dataset_dir):
        return dataset_dir
    parent, name = os.path.split(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    with open(dataset_dir + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not is_complete(dataset_dir):
                for entry in os.listdir(parent):
                    if entry.startswith((name + ".tmp-", name + ".old-")):
                        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                generate(dataset_dir)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return dataset_dir
