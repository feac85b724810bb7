"""
A deterministic generator of a small, clearly *synthetic* detection dataset with the
long-tailed structure of LVIS v1, written in the LVIS v1 json format.

This is NOT LVIS. The project cannot download LVIS, so it ships this generator: it
draws procedural objects on smooth backgrounds, and a Mask R-CNN trained from scratch
on two CPU cores learns it in minutes (``QUICKSTART_SPEC``: 900 training images of
128 px, 30 categories). Everything is named "synthetic" (directories, json files,
category synsets), so it can never be mistaken for the real dataset.

Content
-------
- Categories are ``shape x colour`` combinations ("red_circle", "cyan_arrow", ...): 12
  hole-free polygon shapes (``SHAPES``) times 9 colours far apart in RGB (``COLOURS``).
  The ``num_categories`` combinations are picked from a seeded shuffle of all of them,
  balancing shape and colour use, so that consecutive categories differ in both.
- Each instance gets a random rotation, size (``min_object_frac`` .. ``max_object_frac``
  of the image side) and a small brightness jitter of its colour. Backgrounds are smooth,
  low-contrast, low-saturation gradients with mild noise.
- Instances never overlap (rejection sampling on their boxes, with a margin) and lie
  fully inside the image. Every shape is drawn with ``PIL.ImageDraw.polygon`` from
  integer vertices, and its annotation is the same polygon in COCO pixel coordinates
  (vertex + 0.5, i.e. pixel centres), so the segmentation is exactly the drawn pixels
  and the pixel at every annotated location has the category's colour.

Long-tail rules (train split)
-----------------------------
LVIS groups categories by the number of *training images* they are annotated in:
rare ``'r'`` 1-10 images, common ``'c'`` 11-100, frequent ``'f'`` more than 100
(``RARE_MAX_IMAGES``, ``COMMON_MAX_IMAGES``). The generator gives each category a group
in LVIS v1's proportions (337 r / 461 c / 405 f of 1203; at least one of each when
``num_categories >= 3``) and a target image count drawn log-uniformly inside the group's
range (frequent: 101 .. ``min(max_frequent_images, num_train_images)``), then assigns
categories to images so that every target is met *exactly* and every image contains at
least one and at most ``max_categories_per_image`` categories. Per (image, category) pair
there is one instance most of the time and sometimes 2-3 (``mean_instances_per_pair``).
The validation split is not long-tailed: every category appears in at least
``min_val_images_per_category`` validation images, so AP is measurable for rare ones too.

LVIS fields written, and why
----------------------------
``<dataset dir>/annotations/synthetic_lvis_v1_{train,val}.json`` hold ``info``,
``licenses``, ``images``, ``annotations`` and ``categories`` as in LVIS v1:

- images: ``id``, ``file_name``, ``coco_url`` = ``"<split>/<file_name>"`` (Detectron2's
  ``load_lvis_json`` joins the last two parts of ``coco_url`` to its ``image_root``, so
  with ``image_root = "<dataset dir>/"`` the images live in ``<dataset dir>/<split>/``),
  ``height``, ``width``, and the two federated-annotation lists LVIS evaluation uses:
  ``neg_category_ids`` (categories verified absent; never a present one) and
  ``not_exhaustive_category_ids`` (present categories with some instances left
  unannotated: for a ``not_exhaustive_fraction`` of the pairs one extra, unannotated
  instance is drawn). LVIS evaluation only scores a category on images where it is
  annotated or listed as negative, and ignores unmatched detections of not-exhaustive
  categories.
- annotations: ``id``, ``image_id``, ``category_id`` (1..C), ``bbox`` ``[x, y, w, h]``
  (tight box of the polygon), ``area`` (shoelace area of the polygon) and
  ``segmentation`` (one polygon).
- categories: ``id`` (1..C), ``name``, ``synonyms``, ``synset``, ``def``, ``frequency``,
  ``image_count``, ``instance_count``. In BOTH jsons the last three are the TRAIN split's
  values, as in real LVIS (the evaluator groups APr/APc/APf by ``frequency``, and
  Detectron2's repeat-factor sampler and the equalization losses read the counts).

``<dataset dir>/spec.json`` records the spec and ``FORMAT_VERSION``;
:func:`ensure_synthetic_lvis` reuses a dataset whose ``spec.json`` matches. Output is
byte-identical for the same spec. Only numpy, Pillow and tqdm are used (no torch, no
Detectron2).

CLI: ``python -m eqlosses_d2.data.synthetic --out ROOT [--preset quickstart|tiny]
[--seed N] [--num-categories N] [--num-train-images N] [--num-val-images N]
[--image-size N]`` writes ``ROOT/synthetic_lvis_<key>`` (or reuses it) and prints a
per-group summary.
"""
import argparse
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from .class_stats import COMMON_MAX_IMAGES, RARE_MAX_IMAGES, frequency_group
from .synthetic_spec import (  # the spec, its presets and the data root (light: no generator, no PIL)
    COLOURS,
    FORMAT_VERSION,
    GROUPS,
    LVIS_V1_GROUP_SIZES,
    QUICKSTART_SPEC,
    SHAPES,
    SPLITS,
    TINY_SPEC,
    SyntheticLVISSpec,
    _group_sizes,
    _MIN_OBJECT_PX,
    _train_ranges,
    default_data_root,
    generate_once,
)

__all__ = [
    "FORMAT_VERSION",
    "RARE_MAX_IMAGES",
    "COMMON_MAX_IMAGES",
    "LVIS_V1_GROUP_SIZES",
    "SHAPES",
    "COLOURS",
    "SPLITS",
    "SyntheticLVISSpec",
    "QUICKSTART_SPEC",
    "TINY_SPEC",
    "frequency_group",
    "plan_synthetic_lvis",
    "generate_synthetic_lvis",
    "default_data_root",
    "dataset_dir_for",
    "annotation_file",
    "ensure_synthetic_lvis",
    "summarize",
    "main",
]

_SPLIT_CODES = {"train": 1, "val": 2}
_ANN_NAME = "synthetic_lvis_v1_{split}.json"
_BRIGHTNESS_JITTER = 0.08  # colour *= uniform(1 - j, 1 + j)


# ----------------------------------------------------------------------------- planning


def _pick_categories(rng, n):
    """n (shape, colour) combos from a seeded shuffle, balancing shape/colour use and
    keeping consecutive categories different in both."""
    shapes, colours = list(SHAPES), list(COLOURS)
    combos = [(s, c) for s in shapes for c in colours]
    order = rng.permutation(len(combos))
    pool = [combos[i] for i in order]
    shape_use = dict.fromkeys(shapes, 0)
    colour_use = dict.fromkeys(colours, 0)
    picked = []
    for _ in range(n):
        prev = picked[-1] if picked else (None, None)

        def cost(combo):
            s, c = combo
            return (shape_use[s] + colour_use[c], int(s == prev[0]) + int(c == prev[1]))

        best = min(range(len(pool)), key=lambda i: (cost(pool[i]), i))
        s, c = pool.pop(best)
        shape_use[s] += 1
        colour_use[c] += 1
        picked.append((s, c))
    return picked


def _log_uniform_int(rng, lo, hi, size):
    if hi <= lo:
        return np.full(size, lo, dtype=np.int64)
    x = np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=size))
    return np.clip(np.floor(x).astype(np.int64), lo, hi)


def _fit_total(targets, lo, hi, min_total, max_total):
    """Move targets inside their [lo, hi] ranges until min_total <= sum <= max_total."""
    targets, lo, hi = (np.asarray(a, dtype=np.int64) for a in (targets, lo, hi))
    if targets.sum() > max_total:
        def f(a):
            return lo + np.floor((targets - lo) * a).astype(np.int64)
        good, bad = 0.0, 1.0  # f(good) fits
        for _ in range(60):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if f(mid).sum() <= max_total else (good, mid)
        targets = f(good)
    elif targets.sum() < min_total:
        def f(a):
            return targets + np.ceil((hi - targets) * a).astype(np.int64)
        bad, good = 0.0, 1.0
        for _ in range(60):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if f(mid).sum() >= min_total else (good, mid)
        targets = f(good)
    assert min_total <= targets.sum() <= max_total, "infeasible targets (spec validation missed it)"
    return targets


def _capacities(rng, n_images, total, k):
    """Random number of categories per image: each in [1, k], summing to total."""
    cap = np.ones(n_images, dtype=np.int64)
    extra = total - n_images
    while extra > 0:
        open_ = np.flatnonzero(cap < k)
        add = rng.multinomial(extra, np.full(len(open_), 1.0 / len(open_)))
        cap[open_] += add
        over = np.maximum(cap - k, 0)
        cap -= over
        extra = int(over.sum())
    return cap


def _realise(rng, targets, capacities):
    """Bipartite assignment with exact degrees: category c goes to targets[c] distinct
    images, image i gets capacities[i] categories. Greedy on the largest remaining
    capacity (Gale-Ryser), random tie-break. Returns a list of category lists or None."""
    remaining = capacities.astype(np.int64).copy()
    per_image = [[] for _ in range(len(capacities))]
    for c in np.argsort(-targets, kind="stable"):
        t = int(targets[c])
        if t <= 0:
            continue
        key = remaining + rng.random(len(remaining)) * 0.5
        chosen = np.argsort(-key, kind="stable")[:t]
        if t > len(remaining) or remaining[chosen].min() <= 0:
            return None
        remaining[chosen] -= 1
        for i in chosen:
            per_image[i].append(int(c))
    return [sorted(cats) for cats in per_image]


def _assign(rng, targets, n_images, k):
    total = int(targets.sum())
    assignment = _realise(rng, targets, _capacities(rng, n_images, total, k))
    if assignment is None:  # the balanced degree sequence is feasible whenever any is
        q, r = divmod(total, n_images)
        cap = np.full(n_images, q, dtype=np.int64)
        cap[rng.permutation(n_images)[:r]] += 1
        assignment = _realise(rng, targets, cap)
    if assignment is None:  # pragma: no cover - excluded by validation
        raise ValueError("SyntheticLVISSpec.num_train_images: cannot realise the image counts")
    return assignment


def plan_synthetic_lvis(spec: SyntheticLVISSpec) -> dict:
    """
    The image-level plan of a dataset, without drawing anything: categories (name, shape,
    colour, frequency group, target train/val image counts) and, per split, the sorted
    category indices (0-based) present in each image and its negative categories.
    """
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    n = spec.num_categories
    combos = _pick_categories(rng, n)
    sizes = _group_sizes(n)
    perm = rng.permutation(n)
    groups = np.empty(n, dtype="<U1")
    groups[perm[: sizes["r"]]] = "r"
    groups[perm[sizes["r"]: sizes["r"] + sizes["c"]]] = "c"
    groups[perm[sizes["r"] + sizes["c"]:]] = "f"

    ranges = _train_ranges(spec)
    lo = np.array([ranges[g][0] for g in groups], dtype=np.int64)
    hi = np.array([ranges[g][1] for g in groups], dtype=np.int64)
    train_targets = np.zeros(n, dtype=np.int64)
    for g in GROUPS:
        idx = np.flatnonzero(groups == g)
        train_targets[idx] = _log_uniform_int(rng, ranges[g][0], ranges[g][1], len(idx))
    k = spec.max_categories_per_image
    n_train, n_val = spec.num_train_images, spec.num_val_images
    train_targets = _fit_total(train_targets, lo, hi, n_train, n_train * k)

    m = spec.min_val_images_per_category
    val_targets = rng.integers(m, min(2 * m, n_val) + 1, size=n)
    val_targets = _fit_total(val_targets, np.full(n, m), np.full(n, n_val), n_val, n_val * k)

    splits = {}
    for split, targets, n_images in (("train", train_targets, n_train), ("val", val_targets, n_val)):
        present = _assign(rng, targets, n_images, k)
        negatives = []
        for cats in present:
            absent = np.setdiff1d(np.arange(n), cats)
            if split == "train":
                count = min(int(rng.integers(0, spec.max_train_neg_categories + 1)), len(absent))
                neg = rng.choice(absent, size=count, replace=False) if count else []
            else:
                neg = absent[rng.random(len(absent)) < spec.val_neg_probability]
            negatives.append(sorted(int(c) for c in neg))
        splits[split] = {"present": present, "negatives": negatives,
                         "targets": [int(t) for t in targets]}

    categories = []
    for i, (shape, colour) in enumerate(combos):
        categories.append({
            "name": f"{colour}_{shape}", "shape": shape, "colour": colour,
            "frequency": str(groups[i]),
            "train_image_count": int(train_targets[i]), "val_image_count": int(val_targets[i]),
        })
    return {"categories": categories, "splits": splits}


# ------------------------------------------------------------------------------ drawing


def _background(rng, size):
    """Smooth low-contrast, low-saturation colour gradient plus mild noise (uint8 HxWx3)."""
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    xx, yy = t[None, :], t[:, None]
    base = rng.uniform(95, 165) + rng.uniform(-10, 10, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(15, 40)
    chroma = 1 + rng.uniform(-0.3, 0.3, size=3)
    w_angle, freq, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
    w_amp = rng.uniform(2, 8)
    field = (np.float32(np.cos(angle) * amp) * xx + np.float32(np.sin(angle) * amp) * yy
             + np.float32(w_amp) * np.sin(np.float32(2 * np.pi * freq * np.cos(w_angle)) * xx
                                          + np.float32(2 * np.pi * freq * np.sin(w_angle)) * yy
                                          + np.float32(phase)))
    img = field[:, :, None] * chroma.astype(np.float32)
    img += (base + 0.5 - 5.0).astype(np.float32)  # + 0.5: truncation below rounds
    img += rng.random((size, size, 3), dtype=np.float32) * np.float32(10.0)  # noise +-5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _rasterisable(unit, size_px, angle, cx, cy):
    """Integer (PIL) vertices of a shape, consecutive duplicates removed."""
    c, s = np.cos(angle), np.sin(angle)
    pts = unit @ np.array([[c, s], [-s, c]]) * (size_px / 2.0) + (cx, cy)
    # PIL fills pixel (i, j) when the point (i, j) is inside; in COCO coordinates that
    # pixel's centre is (i + .5, j + .5), so PIL vertex v is COCO vertex v + 0.5.
    ints = np.rint(pts - 0.5).astype(np.int64)
    keep = np.empty(len(ints), dtype=bool)
    keep[0] = (ints[0] != ints[-1]).any()
    keep[1:] = (ints[1:] != ints[:-1]).any(1)
    return ints[keep]


def _shoelace(xy):
    """Area of a polygon given as an (N, 2) array of vertices."""
    x, y = xy[:, 0], xy[:, 1]
    twice = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1])
    return 0.5 * abs(twice)


class _Layout:
    def __init__(self, image_size, margin):
        self.size = image_size
        self.margin = margin
        self.boxes = []  # inclusive pixel boxes x0, y0, x1, y1

    def fits(self, box):
        x0, y0, x1, y1 = box
        if x0 < 1 or y0 < 1 or x1 > self.size - 2 or y1 > self.size - 2:
            return False
        m = self.margin
        for a0, b0, a1, b1 in self.boxes:
            if not (x0 > a1 + m or a0 > x1 + m or y0 > b1 + m or b0 > y1 + m):
                return False
        return True

    def try_place(self, rng, unit, size_px, tries, min_px):
        for t in range(tries):
            if t and t % 12 == 0:
                size_px = max(min_px, size_px * 0.85)
            angle = rng.uniform(0, 2 * np.pi)
            half = size_px / 2.0 + 1
            if 2 * half >= self.size - 2:
                continue
            cx, cy = rng.uniform(half, self.size - half, size=2)
            ints = _rasterisable(unit, size_px, angle, cx, cy)
            if len(ints) < 3:
                continue
            box = (*ints.min(0).tolist(), *ints.max(0).tolist())
            if _shoelace(ints) <= 0 or not self.fits(box):
                continue
            self.boxes.append(box)
            return ints
        return None


def _render_image(spec, plan_cats, cats, image_rng):
    """Draw one image containing the (0-based) categories ``cats``.
    Returns (uint8 array, [(category, ints)] annotated, not-exhaustive categories)."""
    size = spec.image_size
    min_px = max(_MIN_OBJECT_PX, spec.min_object_frac * size)
    max_px = max(min_px, spec.max_object_frac * size)
    bg = _background(image_rng, size)

    # what to draw: one mandatory instance per category, extra annotated instances,
    # and rarely one unannotated instance (-> not exhaustive)
    p_extra = (spec.mean_instances_per_pair - 1.0) / 1.5
    extras = []
    for c in cats:
        if image_rng.random() < p_extra:
            extras += [c] * int(image_rng.integers(1, 3))
    room = spec.max_objects_per_image - len(cats)
    if len(extras) > room:
        extras = [extras[i] for i in sorted(image_rng.permutation(len(extras))[:room])]
    unannotated = [c for c in cats if image_rng.random() < spec.not_exhaustive_fraction]
    unannotated = unannotated[: max(0, room - len(extras))]

    mandatory_sizes = image_rng.uniform(min_px, max_px, size=len(cats))
    for attempt in range(40):
        scale = 0.85 ** attempt
        layout = _Layout(size, spec.placement_margin)
        placed = []
        for j in np.argsort(-mandatory_sizes, kind="stable"):
            c = cats[j]
            ints = layout.try_place(image_rng, SHAPES[plan_cats[c]["shape"]],
                                    max(min_px, mandatory_sizes[j] * scale), 48, min_px)
            if ints is None:
                break
            placed.append((c, ints, True))
        else:
            break
    else:  # pragma: no cover - max_categories_per_image objects always fit after shrinking
        raise RuntimeError(f"could not place {len(cats)} objects in a {size} px image; "
                           f"lower max_categories_per_image or the object sizes")
    for c, annotated in [(c, True) for c in extras] + [(c, False) for c in unannotated]:
        ints = layout.try_place(image_rng, SHAPES[plan_cats[c]["shape"]],
                                image_rng.uniform(min_px, max_px), 24, min_px)
        if ints is not None:
            placed.append((c, ints, annotated))

    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for c, ints, _ in placed:
        base = np.array(COLOURS[plan_cats[c]["colour"]], dtype=np.float64)
        factor = image_rng.uniform(1 - _BRIGHTNESS_JITTER, 1 + _BRIGHTNESS_JITTER)
        colour = tuple(int(v) for v in np.clip(np.rint(base * factor), 0, 255))
        draw.polygon([tuple(p) for p in ints.tolist()], fill=colour)
    annotated = [(c, ints) for c, ints, a in placed if a]
    annotated.sort(key=lambda item: item[0])  # stable: placement order within a category
    not_exhaustive = sorted({c for c, _, a in placed if not a})
    return img, annotated, not_exhaustive


def _annotation(ann_id, image_id, category_id, ints):
    xy = ints.astype(np.float64) + 0.5
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": _shoelace(xy),
        "segmentation": [[float(v) for v in xy.reshape(-1)]],
    }


def _category_entries(plan, train_annotations):
    n = len(plan["categories"])
    images = [set() for _ in range(n)]
    instances = [0] * n
    for ann in train_annotations:
        images[ann["category_id"] - 1].add(ann["image_id"])
        instances[ann["category_id"] - 1] += 1
    entries = []
    for i, cat in enumerate(plan["categories"]):
        shape_words = cat["shape"].replace("_", "-")
        entries.append({
            "id": i + 1,
            "name": cat["name"],
            "synonyms": [cat["name"]],
            "synset": f"synthetic.{cat['name']}.n.01",
            "def": f"synthetic procedural object: a {cat['colour']} {shape_words} polygon "
                   f"(not an LVIS category)",
            "frequency": cat["frequency"],
            "image_count": len(images[i]),
            "instance_count": instances[i],
        })
    return entries


def _spec_record(spec):
    return {"format_version": FORMAT_VERSION, "key": spec.key(), "name": "synthetic_lvis",
            "spec": dataclasses.asdict(spec)}


def _dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def _write_dataset(spec, tmp_dir, progress):
    plan = plan_synthetic_lvis(spec)
    cats = plan["categories"]
    os.makedirs(os.path.join(tmp_dir, "annotations"))
    total = spec.num_train_images + spec.num_val_images
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="synthetic LVIS", unit="img", leave=False)
    results = {}
    try:
        for split in SPLITS:
            os.makedirs(os.path.join(tmp_dir, split))
            images, annotations = [], []
            split_plan = plan["splits"][split]
            for idx, present in enumerate(split_plan["present"]):
                image_id = idx + 1
                image_rng = np.random.Generator(
                    np.random.PCG64([spec.seed, _SPLIT_CODES[split], image_id]))
                img, annotated, not_exhaustive = _render_image(spec, cats, present, image_rng)
                file_name = f"{image_id:012d}.png"
                img.save(os.path.join(tmp_dir, split, file_name), format="PNG", compress_level=1)
                images.append({
                    "id": image_id,
                    "file_name": file_name,
                    "coco_url": f"{split}/{file_name}",
                    "height": spec.image_size,
                    "width": spec.image_size,
                    "neg_category_ids": [c + 1 for c in split_plan["negatives"][idx]],
                    "not_exhaustive_category_ids": [c + 1 for c in not_exhaustive],
                })
                for c, ints in annotated:
                    annotations.append(_annotation(len(annotations) + 1, image_id, c + 1, ints))
                if bar is not None:
                    bar.update(1)
            results[split] = (images, annotations)
    finally:
        if bar is not None:
            bar.close()

    categories = _category_entries(plan, results["train"][1])  # train counts in both splits
    for cat, planned in zip(categories, cats):
        assert cat["image_count"] == planned["train_image_count"], cat
        assert frequency_group(cat["image_count"]) == cat["frequency"], cat
    for split in SPLITS:
        images, annotations = results[split]
        _dump_json({
            "info": {
                "description": "SYNTHETIC long-tailed shapes dataset in the LVIS v1 format "
                               "(not LVIS), generated by eqlosses_d2.data.synthetic",
                "version": f"synthetic-{FORMAT_VERSION}",
                "split": split,
                "spec_key": spec.key(),
                "seed": spec.seed,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }, annotation_file(tmp_dir, split))
    _dump_json(_spec_record(spec), os.path.join(tmp_dir, "spec.json"))


def generate_synthetic_lvis(spec: SyntheticLVISSpec, out_dir: str, progress: bool = True) -> str:
    """
    Generate the dataset of ``spec`` into ``out_dir`` (replacing what is there). Everything
    is written into a temporary sibling directory that is renamed into place at the end,
    so an interrupted run never leaves a half-written dataset. Returns ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        _write_dataset(spec, tmp_dir, progress)
        os.chmod(tmp_dir, 0o755)
        if os.path.lexists(out_dir):
            trash = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "old"))
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------ caching


def dataset_dir_for(spec: SyntheticLVISSpec, root: str = None) -> str:
    """``<root>/synthetic_lvis_<spec.key()>`` (root defaults to :func:`default_data_root`)."""
    return os.path.join(root or default_data_root(), f"synthetic_lvis_{spec.key()}")


def annotation_file(dataset_dir: str, split: str) -> str:
    """Path of a split's json (``split`` in ``SPLITS``); its image_root is ``dataset_dir + '/'``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    return os.path.join(dataset_dir, "annotations", _ANN_NAME.format(split=split))


def _is_complete(dataset_dir, spec):
    try:
        with open(os.path.join(dataset_dir, "spec.json")) as f:
            if json.load(f) != _spec_record(spec):
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(annotation_file(dataset_dir, s)) and
               os.path.isdir(os.path.join(dataset_dir, s)) for s in SPLITS)


def ensure_synthetic_lvis(spec: SyntheticLVISSpec = QUICKSTART_SPEC, root: str = None,
                          progress: bool = True) -> str:
    """
    The dataset directory of ``spec`` under ``root`` (default :func:`default_data_root`),
    generated unless a complete one with the same ``spec.json`` is already there
    (:func:`generate_once`: several processes may call this at once).
    """
    return generate_once(
        os.path.abspath(dataset_dir_for(spec, root)),
        lambda dataset_dir: _is_complete(dataset_dir, spec),
        lambda dataset_dir: generate_synthetic_lvis(spec, dataset_dir, progress=progress),
    )


# ---------------------------------------------------------------------------------- CLI


def summarize(dataset_dir: str) -> str:
    """A per-frequency-group table (categories, images, instances) of a generated dataset."""
    data = {}
    for split in SPLITS:
        with open(annotation_file(dataset_dir, split)) as f:
            data[split] = json.load(f)
    freq = {c["id"]: c["frequency"] for c in data["train"]["categories"]}
    rows = []
    header = ("group", "categories", "img/cat (train)", "train images", "train inst",
              "val images", "val inst")
    for group in GROUPS + ("all",):
        cats = [c for c in data["train"]["categories"] if group in ("all", c["frequency"])]
        ids = {c["id"] for c in cats}
        counts = [c["image_count"] for c in cats]
        row = [group, str(len(cats)), f"{min(counts)}-{max(counts)}" if counts else "-"]
        for split in SPLITS:
            anns = [a for a in data[split]["annotations"] if a["category_id"] in ids]
            row += [str(len({a["image_id"] for a in anns})), str(len(anns))]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def fmt(r):
        return "  ".join(v.rjust(w) for v, w in zip(r, widths))

    lines = [fmt(header)] + [fmt(r) for r in rows]
    lines.append(f"({len(data['train']['images'])} train / {len(data['val']['images'])} val "
                 f"images; 'train images' counts images with >= 1 annotation of the group; "
                 f"groups: r <= {RARE_MAX_IMAGES} < c <= {COMMON_MAX_IMAGES} < f train images)")
    return "\n".join(lines)


_PRESETS = {"quickstart": QUICKSTART_SPEC, "tiny": TINY_SPEC}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m eqlosses_d2.data.synthetic",
        description="Generate (or reuse) the SYNTHETIC long-tailed dataset in LVIS v1 format.")
    parser.add_argument("--out", default=None,
                        help="datasets root; the dataset goes to ROOT/synthetic_lvis_<key> "
                             "(default: $EQLOSSES_D2_DATA or ~/.cache/eqlosses_d2/datasets)")
    parser.add_argument("--preset", choices=sorted(_PRESETS), default="quickstart")
    for flag, field in (("--seed", "seed"), ("--num-categories", "num_categories"),
                        ("--num-train-images", "num_train_images"),
                        ("--num-val-images", "num_val_images"), ("--image-size", "image_size")):
        parser.add_argument(flag, dest=field, type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {f: getattr(args, f) for f in ("seed", "num_categories", "num_train_images",
                                               "num_val_images", "image_size")
                 if getattr(args, f) is not None}
    try:
        spec = dataclasses.replace(_PRESETS[args.preset], **overrides)
    except ValueError as e:
        parser.error(str(e))
    dataset_dir = ensure_synthetic_lvis(spec, root=args.out, progress=not args.no_progress)
    print(dataset_dir)
    print(summarize(dataset_dir))
    return dataset_dir


if __name__ == "__main__":
    main()
