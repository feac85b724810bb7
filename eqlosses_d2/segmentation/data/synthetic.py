"""
The embedded long-tailed semantic segmentation set: the procedural scenes of the detection set
(:mod:`eqlosses_d2.data.synthetic`: its smooth backgrounds, its ``shape x colour`` polygons, its
non-overlapping layout and its exact image-count assignment, imported, not copied) as per-pixel
class maps, so that the quickstart needs no download. It is clearly synthetic: not ADE20K.

Content
-------
- Class 0, ``"background"``, is every pixel no object covers (the stuff class: ~90% of the
  labelled pixels, in every image). Classes 1..C-1 are things, ``"<colour>_<shape>"`` in the
  classification set's order (:mod:`eqlosses_d2.classification.data.synthetic`: neighbours differ
  in shape and colour), so that several classes share a colour and rare ones can be confused with
  frequent ones (quickstart: red is classes 1, 10 and 18).
- Each thing class has a typical size (a fraction of the image side, drawn once from the seed in
  ``[min_object_frac, max_object_frac]``); each instance is that size times ``U(0.8, 1.2)``, with a
  random rotation and a small brightness jitter. Pixel counts are therefore long-tailed like the
  image counts but ordered differently (a prior from pixel counts is not one from image counts).
- With probability ``unlabelled_probability`` an image holds one more object, of a random thing
  class, whose pixels are labelled 255 (ignore), as ADE20K's unlabelled regions: the model sees
  it, training and evaluation skip it, and it counts in no class's statistics.
- Masks are uint8 PNGs (class index, 255 = ignore); images RGB PNGs drawn with the same integer
  polygons, so a mask's pixels are exactly the drawn ones. Objects never overlap and lie inside
  the image, so every planned (image, class) pair is visible in the mask.

Long tail (train split)
-----------------------
Thing class i (i = 0..K-1, class index i+1, K = C-1) is present in exactly
``n_i = round(n_max · ρ^(−i/(K−1)))`` training images ("exponential", CIFAR-LT's profile) or
``round(n_max · (i+1)^(−log ρ / log K))`` ("pareto"), ρ = ``imbalance_ratio`` = n_0 / n_{K−1},
n_max = ``max_images_per_class`` (the formula of
:func:`eqlosses_d2.classification.data.synthetic.train_counts`, called here); an image holds up to
``max_objects_per_image`` thing classes (one instance each), at least one where the (image, class)
pairs are at least the images (both presets). The val split is balanced: every
thing class is in exactly ``val_images_per_class`` images.

Layout: ``<data root>/synthetic_lt_sem_seg_<spec key>/{images,masks}/{train,val}/<id:06d>.png`` and
``spec.json`` (written last; the directory appears whole, renamed from a temporary sibling under
a file lock: :func:`eqlosses_d2.data.synthetic_spec.generate_once`). ``python -m
eqlosses_d2.segmentation.data.synthetic [--tiny] [--root DIR]`` generates and prints the counts.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from ...classification.data.synthetic import SyntheticClassificationSpec, _categories, train_counts
from ...data.synthetic_spec import _MIN_OBJECT_PX, COLOURS, SHAPES, default_data_root, generate_once

__all__ = ["SyntheticSemSegSpec", "QUICKSTART_SEM_SEG_SPEC", "TINY_SEM_SEG_SPEC", "SPLITS", "IGNORE_LABEL",
           "BACKGROUND", "thing_image_counts", "class_names", "plan_synthetic_sem_seg", "dataset_dir_for",
           "ensure_synthetic_sem_seg", "image_file", "mask_file"]

#: bump when the generated content changes for an unchanged spec (a new directory name)
FORMAT_VERSION = 2  # 2: the classification set's class order
SPLITS = ("train", "val")
PROFILES = ("exponential", "pareto")
IGNORE_LABEL = 255
BACKGROUND = "background"
_SPLIT_CODES = {"train": 1, "val": 2}
_SIZE_JITTER = 0.2  # an instance is its class's typical size times U(1 - j, 1 + j)


@dataclasses.dataclass(frozen=True)
class SyntheticSemSegSpec:
    """Everything that determines the embedded segmentation set; invalid values raise ValueError."""

    seed: int = 0
    #: classes including the background (class 0)
    num_classes: int = 20
    num_train_images: int = 400
    num_val_images: int = 100
    image_size: int = 128
    #: training images of the most frequent thing class
    max_images_per_class: int = 300
    #: n_max / n_min over the thing classes' training image counts
    imbalance_ratio: float = 100.0
    profile: str = "exponential"
    val_images_per_class: int = 12
    #: thing classes (= objects) per image, at most
    max_objects_per_image: int = 5
    #: range of the classes' typical sizes (circumscribed diameter / image side)
    min_object_frac: float = 0.14
    max_object_frac: float = 0.36
    #: probability that an image holds one more object labelled 255 (ignore)
    unlabelled_probability: float = 0.1
    #: minimal gap in pixels between the boxes of two objects
    placement_margin: int = 2

    def __post_init__(self):
        _validate(self)

    @property
    def num_thing_classes(self) -> int:
        return self.num_classes - 1

    def key(self) -> str:
        """Short stable hash of all fields and FORMAT_VERSION (names the dataset directory)."""
        payload = json.dumps({"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]


def _fail(field, message):
    raise ValueError(f"SyntheticSemSegSpec.{field}: {message}")


def _validate(spec):
    ints = ("seed", "num_classes", "num_train_images", "num_val_images", "image_size", "max_images_per_class",
            "val_images_per_class", "max_objects_per_image", "placement_margin")
    for field in ints:
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            _fail(field, f"must be an int (got {value!r})")
    for field in ("imbalance_ratio", "min_object_frac", "max_object_frac", "unlabelled_probability"):
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            _fail(field, f"must be a number (got {value!r})")
    combos = len(SHAPES) * len(COLOURS)
    if not 2 <= spec.num_classes <= combos + 1:
        _fail("num_classes", f"must be in [2, {combos + 1}] (the background and shape x colour things; "
                             f"got {spec.num_classes})")
    if not 32 <= spec.image_size <= 2048:
        _fail("image_size", f"must be in [32, 2048] (got {spec.image_size})")
    if spec.seed < 0:
        _fail("seed", f"must be >= 0 (got {spec.seed})")
    if not 1 <= spec.max_objects_per_image <= 12:
        _fail("max_objects_per_image", f"must be in [1, 12] (got {spec.max_objects_per_image})")
    if not 1 <= spec.max_images_per_class <= spec.num_train_images:
        _fail("max_images_per_class", f"must be in [1, num_train_images={spec.num_train_images}] "
                                      f"(got {spec.max_images_per_class})")
    if not 1.0 <= spec.imbalance_ratio <= spec.max_images_per_class:
        _fail("imbalance_ratio", f"must be in [1, max_images_per_class={spec.max_images_per_class}] "
                                 f"(every class keeps >= 1 image; got {spec.imbalance_ratio})")
    if spec.profile not in PROFILES:
        _fail("profile", f"must be one of {', '.join(PROFILES)} (got {spec.profile!r})")
    if not 1 <= spec.val_images_per_class <= spec.num_val_images:
        _fail("val_images_per_class", f"must be in [1, num_val_images={spec.num_val_images}] "
                                      f"(got {spec.val_images_per_class})")
    if not 0.0 <= spec.unlabelled_probability <= 1.0:
        _fail("unlabelled_probability", f"must be in [0, 1] (got {spec.unlabelled_probability})")
    if not 0.02 <= spec.min_object_frac <= spec.max_object_frac <= 0.6:
        _fail("min_object_frac", f"need 0.02 <= min_object_frac <= max_object_frac <= 0.6 "
                                 f"(got {spec.min_object_frac}, {spec.max_object_frac})")
    if spec.max_object_frac * spec.image_size < _MIN_OBJECT_PX:
        _fail("max_object_frac", f"objects must be able to reach {_MIN_OBJECT_PX} px "
                                 f"(max_object_frac * image_size = {spec.max_object_frac * spec.image_size:g})")
    if not 0 <= spec.placement_margin <= spec.image_size // 8:
        _fail("placement_margin", f"must be in [0, image_size // 8] (got {spec.placement_margin})")
    k = spec.max_objects_per_image
    total = int(thing_image_counts(spec).sum())
    if total > spec.num_train_images * k:
        _fail("num_train_images", f"too small: the thing classes' image counts sum to {total} (image, class) pairs but "
                                  f"{spec.num_train_images} images x max_objects_per_image={k} hold only "
                                  f"{spec.num_train_images * k}")
    if spec.num_thing_classes * spec.val_images_per_class > spec.num_val_images * k:
        _fail("num_val_images", f"too small: {spec.num_thing_classes} thing classes x val_images_per_class="
                                f"{spec.val_images_per_class} do not fit into {spec.num_val_images} images x "
                                f"max_objects_per_image={k}")


def thing_image_counts(spec: SyntheticSemSegSpec) -> np.ndarray:
    """(C-1,) int64 planned training images of thing classes 1..C-1 (class 1 the most frequent)."""
    profile = SyntheticClassificationSpec(num_classes=spec.num_thing_classes,
                                          max_images_per_class=spec.max_images_per_class,
                                          imbalance_ratio=float(spec.imbalance_ratio), profile=spec.profile)
    return train_counts(profile)


#: the quickstart set: 20 classes (background + 19 things, 300 .. 3 training images, exponential,
#: 1,320 (image, thing) pairs), 400 train + 100 val images of 128 px, 12 val images per thing class
QUICKSTART_SEM_SEG_SPEC = SyntheticSemSegSpec()
#: for tests: 8 classes (background + 7 things, 20 .. 2 training images), 24 train + 8 val images
#: of 64 px, 3 val images per thing class (generated in about a second)
TINY_SEM_SEG_SPEC = SyntheticSemSegSpec(num_classes=8, num_train_images=24, num_val_images=8, image_size=64,
                                        max_images_per_class=20, imbalance_ratio=10.0, val_images_per_class=3,
                                        max_objects_per_image=4, min_object_frac=0.2, max_object_frac=0.4,
                                        unlabelled_probability=0.25)


def plan_synthetic_sem_seg(spec: SyntheticSemSegSpec) -> dict:
    """
    The plan, without drawing: ``classes`` (per thing class: name, shape, colour, typical size in
    pixels, planned train / val image counts; index 0 of the list is thing class 1) and, per split,
    ``present``: for each image the sorted class indices (1..C-1) of its objects.
    """
    from ...data.synthetic import _assign

    rng = np.random.Generator(np.random.PCG64(spec.seed))
    k = spec.num_thing_classes
    combos = _thing_categories(spec)
    typical = rng.uniform(spec.min_object_frac, spec.max_object_frac, size=k) * spec.image_size
    targets = {"train": thing_image_counts(spec), "val": np.full(k, spec.val_images_per_class, dtype=np.int64)}
    sizes = {"train": spec.num_train_images, "val": spec.num_val_images}
    splits = {}
    for split in SPLITS:
        assignment = _assign(rng, targets[split], sizes[split], spec.max_objects_per_image)
        splits[split] = {"present": [[c + 1 for c in cats] for cats in assignment]}
    classes = [{"name": f"{colour}_{shape}", "shape": shape, "colour": colour, "size_px": float(typical[i]),
                "train_image_count": int(targets["train"][i]), "val_image_count": int(targets["val"][i])}
               for i, (shape, colour) in enumerate(combos)]
    return {"classes": classes, "splits": splits}


def _thing_categories(spec):
    """(shape, colour) of thing classes 1..C-1: the classification set's order (shapes vary fastest,
    the colour shifts by one each round of shapes: neighbours differ in both, and every colour is
    shared by classes far apart in frequency: red is classes 1, 10 and 18 of the quickstart)."""
    return _categories(SyntheticClassificationSpec(num_classes=spec.num_thing_classes))


def class_names(spec: SyntheticSemSegSpec) -> list:
    """``["background", "<colour>_<shape>", ...]`` (C names; no drawing, no generator loaded)."""
    return [BACKGROUND] + [f"{colour}_{shape}" for shape, colour in _thing_categories(spec)]


def _render(spec, classes, present, rng):
    """One image with one object of each class in ``present`` (and maybe an unlabelled one):
    (PIL RGB image, (H, W) uint8 label map)."""
    from PIL import Image, ImageDraw

    from ...data.synthetic import _BRIGHTNESS_JITTER, _background, _Layout

    size = spec.image_size
    min_px = float(_MIN_OBJECT_PX)
    objects = [(c, c) for c in present]  # (class, label)
    if rng.random() < spec.unlabelled_probability:
        objects.append((int(rng.integers(1, spec.num_classes)), IGNORE_LABEL))
    wanted = [classes[c - 1]["size_px"] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER) for c, _ in objects]
    background = _background(rng, size)
    labelled = [j for j, (_, label) in enumerate(objects) if label != IGNORE_LABEL]
    for attempt in range(40):
        scale = 0.85 ** attempt
        layout = _Layout(size, spec.placement_margin)
        placed = []
        for j in sorted(labelled, key=lambda j: (-wanted[j], j)):
            c = objects[j][0]
            ints = layout.try_place(rng, SHAPES[classes[c - 1]["shape"]], max(min_px, wanted[j] * scale), 48, min_px)
            if ints is None:
                break
            placed.append((objects[j], ints))
        else:
            break
    else:  # pragma: no cover - excluded by max_objects_per_image <= 12 and the shrinking
        raise RuntimeError(f"could not place {len(labelled)} objects in a {size} px image")
    for j, (c, label) in enumerate(objects):
        if label == IGNORE_LABEL:  # placed if room is left; an unplaced one is simply not drawn
            ints = layout.try_place(rng, SHAPES[classes[c - 1]["shape"]], max(min_px, wanted[j]), 24, min_px)
            if ints is not None:
                placed.append(((c, label), ints))
    image = Image.fromarray(background, "RGB")
    mask = Image.new("L", (size, size), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for (c, label), ints in placed:
        base = np.array(COLOURS[classes[c - 1]["colour"]], dtype=np.float64)
        factor = rng.uniform(1 - _BRIGHTNESS_JITTER, 1 + _BRIGHTNESS_JITTER)
        colour = tuple(int(v) for v in np.clip(np.rint(base * factor), 0, 255))
        polygon = [tuple(p) for p in ints.tolist()]
        draw.polygon(polygon, fill=colour)
        draw_mask.polygon(polygon, fill=int(label))
    return image, np.asarray(mask, dtype=np.uint8)


def image_file(dataset_dir: str, split: str, index: int) -> str:
    return os.path.join(dataset_dir, "images", split, f"{index:06d}.png")


def mask_file(dataset_dir: str, split: str, index: int) -> str:
    return os.path.join(dataset_dir, "masks", split, f"{index:06d}.png")


def _spec_record(spec):
    return {"format_version": FORMAT_VERSION, "key": spec.key(), "name": "synthetic_lt_sem_seg",
            "spec": dataclasses.asdict(spec)}


def _write(spec, out_dir):
    from PIL import Image

    plan = plan_synthetic_sem_seg(spec)
    classes = plan["classes"]
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, "images", split))
        os.makedirs(os.path.join(out_dir, "masks", split))
        image_count = np.zeros(spec.num_classes, dtype=np.int64)
        for index, present in enumerate(plan["splits"][split]["present"], 1):
            rng = np.random.Generator(np.random.PCG64([spec.seed, _SPLIT_CODES[split], index]))
            image, mask = _render(spec, classes, present, rng)
            image.save(image_file(out_dir, split, index), format="PNG", compress_level=1)
            Image.fromarray(mask, "L").save(mask_file(out_dir, split, index), format="PNG", compress_level=1)
            labels = np.unique(mask)
            image_count[labels[labels != IGNORE_LABEL]] += 1
        expected = [c[f"{split}_image_count"] for c in classes]
        if image_count[1:].tolist() != expected:  # pragma: no cover - objects never overlap
            raise RuntimeError(f"synthetic {split} split: image counts {image_count[1:].tolist()} != planned {expected}")
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump(_spec_record(spec), f, sort_keys=True)


def dataset_dir_for(spec: SyntheticSemSegSpec, root: str = None) -> str:
    """``<root>/synthetic_lt_sem_seg_<spec.key()>`` (root: :func:`default_data_root`)."""
    return os.path.abspath(os.path.join(root or default_data_root(), f"synthetic_lt_sem_seg_{spec.key()}"))


def _is_complete(dataset_dir, spec):
    try:
        with open(os.path.join(dataset_dir, "spec.json")) as f:
            return json.load(f) == json.loads(json.dumps(_spec_record(spec)))
    except (OSError, ValueError):
        return False


def _generate(spec, dataset_dir):
    """Write ``spec``'s set into a temporary sibling of ``dataset_dir`` and rename it into place."""
    parent, name = os.path.split(dataset_dir)
    tmp_dir = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    try:
        _write(spec, os.path.join(tmp_dir, "data"))
        if os.path.lexists(dataset_dir):  # an incomplete or stale directory of this name
            shutil.move(dataset_dir, os.path.join(tmp_dir, "old"))
        os.replace(os.path.join(tmp_dir, "data"), dataset_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_synthetic_sem_seg(spec: SyntheticSemSegSpec = QUICKSTART_SEM_SEG_SPEC, root: str = None) -> str:
    """The dataset directory of ``spec``, generated unless complete (see the module docstring)."""
    return generate_once(dataset_dir_for(spec, root), lambda d: _is_complete(d, spec), lambda d: _generate(spec, d))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eqlosses_d2.segmentation.data.synthetic",
                                     description="Generate the embedded long-tailed semantic segmentation set.")
    parser.add_argument("--root", default=None,
                        help="data root (default: $EQLOSSES_D2_DATA or ~/.cache/eqlosses_d2/datasets)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny set")
    args = parser.parse_args(argv)
    spec = TINY_SEM_SEG_SPEC if args.tiny else QUICKSTART_SEM_SEG_SPEC
    out = ensure_synthetic_sem_seg(spec, args.root)
    print(f"{out}\nclasses: {class_names(spec)}\ntrain images per thing class: {thing_image_counts(spec).tolist()}")
    return out


if __name__ == "__main__":
    main()
