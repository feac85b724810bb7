"""
The embedded long-tailed classification set: procedural categories (a shape of
:data:`eqlosses_d2.data.synthetic_spec.SHAPES` in a colour of ``COLOURS``, one object per image,
at a random position, size and rotation on a noisy grey background), a long-tailed train split
and balanced val and test splits, generated on first use into the data root of the detection set
(``$EQLOSSES_D2_DATA``, else ``~/.cache/eqlosses_d2/datasets``), in
``synthetic_cls_<spec key>/`` (``{train,val,test}/*.png`` and ``annotations/<split>.json``).

Train counts: class i of C gets ``n_i = round(n_max · ρ^(−i/(C−1)))`` images with the
"exponential" profile (CIFAR-LT's), or ``round(n_max · (i+1)^(−log ρ / log C))`` with the
"pareto" profile (ImageNet-LT's Pareto shape); ρ = ``imbalance_ratio`` = n_0 / n_{C−1} in both.
The annotation files are COCO-style (``images``, ``annotations`` with one ``category_id`` per
image, ``categories``), so the house's class statistics (:mod:`eqlosses_d2.data.class_stats`)
read them unchanged: ``image_count`` is the number of training images per class.

Generation is atomic (a temporary sibling directory renamed into place) and serialised between
processes by an exclusive ``flock`` on ``<dataset dir>.lock``; ``python -m
eqlosses_d2.classification.data.synthetic`` generates the quickstart set.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np

from ...data.synthetic_spec import COLOURS, SHAPES, default_data_root, generate_once

__all__ = ["SyntheticClassificationSpec", "QUICKSTART_CLS_SPEC", "TINY_CLS_SPEC", "train_counts",
           "ensure_synthetic_classification", "dataset_dir_for", "SPLITS"]

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
PROFILES = ("exponential", "pareto")


@dataclasses.dataclass(frozen=True)
class SyntheticClassificationSpec:
    """Everything that determines a synthetic classification set; invalid values raise ValueError."""

    seed: int = 0
    num_classes: int = 30
    #: training images of the most frequent class
    max_images_per_class: int = 300
    #: n_max / n_min of the train split
    imbalance_ratio: float = 100.0
    profile: str = "exponential"
    val_images_per_class: int = 20
    test_images_per_class: int = 20
    image_size: int = 32

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(SHAPES) * len(COLOURS):
            raise ValueError(f"SyntheticClassificationSpec.num_classes must be in [1, {len(SHAPES) * len(COLOURS)}], "
                             f"got {self.num_classes}")
        if self.max_images_per_class < 1:
            raise ValueError(f"SyntheticClassificationSpec.max_images_per_class must be >= 1, got {self.max_images_per_class}")
        if not 1.0 <= self.imbalance_ratio <= self.max_images_per_class:
            raise ValueError(f"SyntheticClassificationSpec.imbalance_ratio must be in [1, max_images_per_class="
                             f"{self.max_images_per_class}] (every class keeps >= 1 image), got {self.imbalance_ratio}")
        if self.profile not in PROFILES:
            raise ValueError(f"SyntheticClassificationSpec.profile must be one of {', '.join(PROFILES)}, got '{self.profile}'")
        if self.val_images_per_class < 1 or self.test_images_per_class < 1:
            raise ValueError("SyntheticClassificationSpec.val/test_images_per_class must be >= 1")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"SyntheticClassificationSpec.image_size must be in [16, 1024], got {self.image_size}")

    def key(self) -> str:
        payload = json.dumps({"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]


#: the quickstart set: 30 classes, 300 .. 3 training images (ρ = 100, exponential: 7 many-shot
#: (> 100), 11 medium (20-100), 12 few-shot (< 20) classes; 2,028 images), 20 val and 20 test
#: images per class, 32 px
QUICKSTART_CLS_SPEC = SyntheticClassificationSpec()
#: for tests: 6 classes, 120 .. 6 training images, 4 val / 4 test per class
TINY_CLS_SPEC = SyntheticClassificationSpec(num_classes=6, max_images_per_class=120, imbalance_ratio=20.0,
                                            val_images_per_class=4, test_images_per_class=4)


def train_counts(spec: SyntheticClassificationSpec) -> np.ndarray:
    """(C,) int64 training images per class (class 0 the most frequent)."""
    c, n_max, rho = spec.num_classes, spec.max_images_per_class, spec.imbalance_ratio
    if c == 1:
        return np.array([n_max], dtype=np.int64)
    i = np.arange(c, dtype=np.float64)
    if spec.profile == "exponential":
        counts = n_max * rho ** (-i / (c - 1))
    else:
        counts = n_max * (i + 1) ** (-math.log(rho) / math.log(c))
    return np.maximum(1, np.floor(counts + 0.5)).astype(np.int64)


def _categories(spec):
    """Class i: the i-th (shape, colour) pair, shapes varying fastest (neighbouring classes differ in shape)."""
    shapes, colours = list(SHAPES), list(COLOURS)
    pairs = [(shapes[k % len(shapes)], colours[(k // len(shapes) + k) % len(colours)])
             for k in range(len(shapes) * len(colours))]
    seen, out = set(), []
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out[: spec.num_classes]


def _render(rng, size, shape, colour):
    from PIL import Image, ImageDraw

    grey = int(rng.integers(70, 180))
    pixels = np.clip(rng.normal(grey, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    radius = rng.uniform(0.25, 0.45) * size
    centre = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polygon = SHAPES[shape] @ rot.T * radius + centre
    jitter = rng.integers(-25, 26, 3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    ImageDraw.Draw(image).polygon([tuple(p) for p in polygon], fill=fill)
    return image


def _write(spec, out_dir):
    rng = np.random.default_rng(spec.seed)
    categories = _categories(spec)
    per_split = {"train": train_counts(spec),
                 "val": np.full(spec.num_classes, spec.val_images_per_class),
                 "test": np.full(spec.num_classes, spec.test_images_per_class)}
    os.makedirs(os.path.join(out_dir, "annotations"))
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split))
        labels = np.repeat(np.arange(spec.num_classes), per_split[split])
        labels = labels[rng.permutation(len(labels))]
        images, annotations = [], []
        for index, label in enumerate(labels.tolist()):
            file_name = f"{split}/{index:06d}.png"
            shape, colour = categories[label]
            _render(rng, spec.image_size, shape, colour).save(os.path.join(out_dir, file_name))
            images.append({"id": index + 1, "file_name": file_name, "width": spec.image_size, "height": spec.image_size})
            annotations.append({"id": index + 1, "image_id": index + 1, "category_id": label + 1})
        cats = [{"id": i + 1, "name": f"{colour}_{shape}"} for i, (shape, colour) in enumerate(categories)]
        with open(os.path.join(out_dir, "annotations", f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}, f)


def dataset_dir_for(spec, root=None) -> str:
    return os.path.abspath(os.path.join(root or default_data_root(), f"synthetic_cls_{spec.key()}"))


def _is_complete(dataset_dir):
    return os.path.isfile(os.path.join(dataset_dir, "spec.json"))  # written last, the directory renamed whole


def ensure_synthetic_classification(spec: SyntheticClassificationSpec = QUICKSTART_CLS_SPEC, root=None) -> str:
    """The dataset directory of ``spec``, generated unless complete (see the module docstring)."""
    return generate_once(dataset_dir_for(spec, root), _is_complete, lambda dataset_dir: _generate(spec, dataset_dir))


def _generate(spec, dataset_dir):
    """Write ``spec``'s set into a temporary sibling of ``dataset_dir`` and rename it into place."""
    parent, name = os.path.split(dataset_dir)
    shutil.rmtree(dataset_dir, ignore_errors=True)
    tmp_dir = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    try:
        _write(spec, os.path.join(tmp_dir, "data"))
        os.replace(os.path.join(tmp_dir, "data"), dataset_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the embedded long-tailed classification set.")
    parser.add_argument("--root", default=None, help="data root (default: $EQLOSSES_D2_DATA or ~/.cache/eqlosses_d2/datasets)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny set")
    args = parser.parse_args(argv)
    spec = TINY_CLS_SPEC if args.tiny else QUICKSTART_CLS_SPEC
    out = ensure_synthetic_classification(spec, args.root)
    print(f"{out}: train counts {train_counts(spec).tolist()}")


if __name__ == "__main__":
    main()
