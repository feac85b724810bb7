"""
Tests of the synthetic long-tailed LVIS-format dataset generator
(``eqlosses_d2/data/synthetic.py``): long-tail counts, LVIS v1 fields, exact polygons,
determinism, caching, the CLI, and loading with Detectron2's ``load_lvis_json``.
"""
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eqlosses_d2.data import synthetic as syn

TINY, QUICK = syn.TINY_SPEC, syn.QUICKSTART_SPEC
RANGES = {"r": (1, 10), "c": (11, 100), "f": (101, 10 ** 9)}


def _read(dataset_dir, split):
    with open(os.path.join(dataset_dir, "annotations", f"synthetic_lvis_v1_{split}.json")) as f:
        return json.load(f)


def _tree_digest(dataset_dir):
    h = hashlib.sha256()
    for path in sorted(pathlib.Path(dataset_dir).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(dataset_dir)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return syn.generate_synthetic_lvis(TINY, str(tmp_path_factory.mktemp("tiny") / "ds"),
                                       progress=False)


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    # ~8 s on 2 CPU cores: generated once for the whole module
    return syn.generate_synthetic_lvis(QUICK, str(tmp_path_factory.mktemp("quick") / "ds"),
                                       progress=False)


@pytest.fixture(params=["tiny", "quickstart"])
def dataset(request):
    spec = {"tiny": TINY, "quickstart": QUICK}[request.param]
    ds_dir = request.getfixturevalue({"tiny": "tiny_dir", "quickstart": "quick_dir"}[request.param])
    return spec, ds_dir, _read(ds_dir, "train"), _read(ds_dir, "val")


# ------------------------------------------------------------------------------- spec


def test_defaults_and_key():
    assert QUICK == syn.SyntheticLVISSpec()
    assert (QUICK.seed, QUICK.num_categories, QUICK.image_size) == (0, 30, 128)
    assert (QUICK.num_train_images, QUICK.num_val_images) == (900, 200)
    assert (TINY.num_categories, TINY.num_train_images, TINY.num_val_images, TINY.image_size) == (
        6, 120, 24, 64)
    key = QUICK.key()
    assert len(key) == 10 and key == syn.SyntheticLVISSpec().key()
    assert dataclasses.replace(QUICK, seed=1).key() != key
    assert TINY.key() != key
    # round trip through a plain dict, as the dataset registration stores it
    assert syn.SyntheticLVISSpec(**dataclasses.asdict(TINY)) == TINY
    assert (syn.RARE_MAX_IMAGES, syn.COMMON_MAX_IMAGES) == (10, 100)
    assert len(syn.SHAPES) >= 8 and len(syn.COLOURS) >= 6


@pytest.mark.parametrize("field, value", [
    ("num_train_images", 100),  # frequent categories need >= 101 training images
    ("num_train_images", 5000),  # more images than 30 categories can cover
    ("num_categories", 12 * 9 + 1),
    ("num_categories", 0),
    ("image_size", 31),
    ("num_val_images", 20),  # 30 categories x 8 images do not fit
    ("min_val_images_per_category", 0),
    ("max_frequent_images", 100),
    ("mean_instances_per_pair", 3.0),
    ("max_object_frac", 0.05),
    ("not_exhaustive_fraction", -0.1),
    ("seed", -1),
    ("max_categories_per_image", 9),  # > max_objects_per_image
])
def test_invalid_spec_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SyntheticLVISSpec\.{field}\b") as info:
        dataclasses.replace(QUICK, **{field: value})
    assert "\n" not in str(info.value)


def test_group_sizes_follow_lvis_v1():
    assert syn._group_sizes(1203) == {"r": 337, "c": 461, "f": 405}
    assert syn._group_sizes(30) == {"r": 8, "c": 12, "f": 10}
    assert syn._group_sizes(6) == {"r": 2, "c": 2, "f": 2}
    for n in range(3, 12 * 9 + 1):
        sizes = syn._group_sizes(n)
        assert sum(sizes.values()) == n and min(sizes.values()) >= 1, (n, sizes)


@pytest.mark.parametrize("spec", [TINY, QUICK, dataclasses.replace(QUICK, seed=7),
                                  dataclasses.replace(QUICK, num_categories=100,
                                                      num_train_images=3000)],
                         ids=["tiny", "quickstart", "seed7", "c100"])
def test_plan_realises_the_long_tail(spec):
    plan = syn.plan_synthetic_lvis(spec)
    cats = plan["categories"]
    assert len(cats) == spec.num_categories
    assert len({c["name"] for c in cats}) == len(cats)
    assert {c["frequency"] for c in cats} == {"r", "c", "f"}
    assert collections.Counter(c["frequency"] for c in cats) == collections.Counter(
        syn._group_sizes(spec.num_categories))
    # consecutive categories differ in shape and colour
    for a, b in zip(cats, cats[1:]):
        assert a["shape"] != b["shape"] and a["colour"] != b["colour"], (a, b)
    for split, n_images in (("train", spec.num_train_images), ("val", spec.num_val_images)):
        present = plan["splits"][split]["present"]
        assert len(present) == n_images
        assert all(1 <= len(p) <= spec.max_categories_per_image for p in present)
        counts = collections.Counter(c for p in present for c in p)
        key = f"{split}_image_count"
        assert [counts[i] for i in range(len(cats))] == [c[key] for c in cats]
    for c in cats:
        lo, hi = RANGES[c["frequency"]]
        assert lo <= c["train_image_count"] <= min(hi, spec.num_train_images)
        if c["frequency"] == "f":
            assert c["train_image_count"] <= spec.max_frequent_images
        assert c["val_image_count"] >= spec.min_val_images_per_category


# ------------------------------------------------------------------------- generation


def test_generation_is_deterministic(tmp_path, tiny_dir):
    again = syn.generate_synthetic_lvis(TINY, str(tmp_path / "again"), progress=False)
    assert _tree_digest(again) == _tree_digest(tiny_dir)
    for split in syn.SPLITS:
        a = pathlib.Path(syn.annotation_file(again, split)).read_bytes()
        assert a == pathlib.Path(syn.annotation_file(tiny_dir, split)).read_bytes()
    other = syn.generate_synthetic_lvis(dataclasses.replace(TINY, seed=1), str(tmp_path / "s1"),
                                        progress=False)
    assert _tree_digest(other) != _tree_digest(tiny_dir)
    assert _read(other, "train")["annotations"] != _read(tiny_dir, "train")["annotations"]


def test_files_and_format(dataset):
    spec, ds_dir, train, val = dataset
    assert sorted(os.listdir(ds_dir)) == ["annotations", "spec.json", "train", "val"]
    with open(os.path.join(ds_dir, "spec.json")) as f:
        record = json.load(f)
    assert record["format_version"] == syn.FORMAT_VERSION
    assert record["spec"] == dataclasses.asdict(spec) and record["key"] == spec.key()
    for split, data, n in (("train", train, spec.num_train_images),
                           ("val", val, spec.num_val_images)):
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert data["licenses"] == [] and "synthetic" in data["info"]["description"].lower()
        assert [im["id"] for im in data["images"]] == list(range(1, n + 1))
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
        assert sorted(os.listdir(os.path.join(ds_dir, split))) == [
            im["file_name"] for im in data["images"]]
        for im in data["images"]:
            assert im["coco_url"] == f"{split}/{im['file_name']}"
            assert im["height"] == im["width"] == spec.image_size
            for k in ("neg_category_ids", "not_exhaustive_category_ids"):
                assert im[k] == sorted(set(im[k]))
                assert all(isinstance(c, int) and 1 <= c <= spec.num_categories for c in im[k])
        img = Image.open(os.path.join(ds_dir, split, data["images"][0]["file_name"]))
        assert img.mode == "RGB" and img.size == (spec.image_size, spec.image_size)
    cat = train["categories"][0]
    assert set(cat) == {"id", "name", "synonyms", "synset", "def", "frequency", "image_count",
                        "instance_count"}
    assert cat["synset"] == f"synthetic.{cat['name']}.n.01" and cat["synonyms"] == [cat["name"]]
    assert [c["id"] for c in train["categories"]] == list(range(1, spec.num_categories + 1))


def test_train_long_tail_counts_are_exact(dataset):
    spec, _, train, val = dataset
    images = collections.defaultdict(set)
    instances = collections.Counter()
    for a in train["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    plan = syn.plan_synthetic_lvis(spec)
    for cat, planned in zip(train["categories"], plan["categories"]):
        lo, hi = RANGES[cat["frequency"]]
        assert lo <= cat["image_count"] <= hi, cat
        assert cat["image_count"] == len(images[cat["id"]]) == planned["train_image_count"]
        assert cat["instance_count"] == instances[cat["id"]] >= cat["image_count"]
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    # the val json carries the TRAIN frequency and counts, as real LVIS does
    assert val["categories"] == train["categories"]
    # every train image has at least one annotated category, none more than allowed
    per_image = collections.defaultdict(set)
    objects = collections.Counter()
    for a in train["annotations"]:
        per_image[a["image_id"]].add(a["category_id"])
        objects[a["image_id"]] += 1
    assert set(per_image) == {im["id"] for im in train["images"]}
    assert max(len(v) for v in per_image.values()) <= spec.max_categories_per_image
    assert max(objects.values()) <= spec.max_objects_per_image
    # mostly one instance per (image, category) pair, sometimes more
    pairs = collections.Counter((a["image_id"], a["category_id"]) for a in train["annotations"])
    multi = sum(v > 1 for v in pairs.values()) / len(pairs)
    assert 0.02 < multi < 0.4 and max(pairs.values()) <= 3


def test_val_covers_every_category(dataset):
    spec, _, _, val = dataset
    images = collections.defaultdict(set)
    for a in val["annotations"]:
        images[a["category_id"]].add(a["image_id"])
    for c in val["categories"]:
        assert len(images[c["id"]]) >= spec.min_val_images_per_category, c["name"]
    assert {a["image_id"] for a in val["annotations"]} == {im["id"] for im in val["images"]}


def test_negative_and_not_exhaustive_ids(dataset):
    spec, _, train, val = dataset
    for split, data in (("train", train), ("val", val)):
        present = collections.defaultdict(set)
        for a in data["annotations"]:
            present[a["image_id"]].add(a["category_id"])
        n_not_exhaustive = n_neg = 0
        for im in data["images"]:
            assert not set(im["neg_category_ids"]) & present[im["id"]]
            assert set(im["not_exhaustive_category_ids"]) <= present[im["id"]]
            n_not_exhaustive += len(im["not_exhaustive_category_ids"])
            n_neg += len(im["neg_category_ids"])
            if split == "train":
                assert len(im["neg_category_ids"]) <= spec.max_train_neg_categories
        assert n_neg > 0
        if split == "train":
            assert n_not_exhaustive > 0
    # val negatives are denser than train negatives
    mean_neg = {s: np.mean([len(im["neg_category_ids"]) for im in d["images"]])
                for s, d in (("train", train), ("val", val))}
    assert mean_neg["val"] > mean_neg["train"]


def test_not_exhaustive_instances_are_drawn_but_not_annotated(dataset):
    """For each not-exhaustive (image, category) pair, the PNG holds pixels of the
    category's colour outside every annotated box of the image."""
    spec, ds_dir, train, val = dataset
    for split, data in (("train", train), ("val", val)):
        colour_of = {c["id"]: np.array(syn.COLOURS[c["name"].split("_", 1)[0]], float)
                     for c in data["categories"]}
        boxes = collections.defaultdict(list)
        for a in data["annotations"]:
            boxes[a["image_id"]].append(a["bbox"])
        for im in data["images"]:
            if not im["not_exhaustive_category_ids"]:
                continue
            pixels = np.asarray(Image.open(os.path.join(ds_dir, split, im["file_name"]))).astype(float)
            outside = np.ones(pixels.shape[:2], bool)
            for x, y, w, h in boxes[im["id"]]:
                outside[int(y - 0.5):int(y + h - 0.5) + 1, int(x - 0.5):int(x + w - 0.5) + 1] = False
            for cat_id in im["not_exhaustive_category_ids"]:
                base = colour_of[cat_id]
                close = np.abs(pixels - base).max(-1) <= 0.08 * base.max() + 1
                assert (close & outside).sum() >= 10, (split, im["id"], cat_id)


def _shoelace(xy):
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_boxes_areas_and_polygons(dataset):
    spec, _, train, val = dataset
    size = spec.image_size
    for data in (train, val):
        boxes = collections.defaultdict(list)
        for a in data["annotations"]:
            assert len(a["segmentation"]) == 1
            poly = np.array(a["segmentation"][0], dtype=float).reshape(-1, 2)
            assert len(poly) >= 3
            assert poly.min() >= 0 and poly.max() <= size
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            assert a["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-9)
            assert all(isinstance(v, float) for v in a["bbox"])
            assert isinstance(a["area"], float) and a["area"] > 0
            assert a["area"] == pytest.approx(_shoelace(poly), abs=1e-6)
            assert a["area"] <= a["bbox"][2] * a["bbox"][3] + 1e-9
            boxes[a["image_id"]].append(a["bbox"])
        for image_boxes in boxes.values():
            for i, (ax, ay, aw, ah) in enumerate(image_boxes):
                for bx, by, bw, bh in image_boxes[i + 1:]:
                    overlap_w = min(ax + aw, bx + bw) - max(ax, bx)
                    overlap_h = min(ay + ah, by + bh) - max(ay, by)
                    assert overlap_w < 0 or overlap_h < 0, "annotated boxes overlap"


def test_pixels_match_annotations(dataset):
    """Inside each annotated polygon the PNG has one flat colour: the category's colour
    (up to the brightness jitter). Around it (box + 1 px) no other pixel has that colour,
    so the polygon is exactly the drawn object."""
    spec, ds_dir, train, val = dataset
    rng = np.random.default_rng(0)
    for split, data in (("train", train), ("val", val)):
        colour_of = {c["id"]: np.array(syn.COLOURS[c["name"].split("_", 1)[0]], float)
                     for c in data["categories"]}
        anns = data["annotations"]
        if len(anns) > 250:
            anns = [anns[i] for i in sorted(rng.choice(len(anns), 250, replace=False))]
        by_image = collections.defaultdict(list)
        for a in anns:
            by_image[a["image_id"]].append(a)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        for image_id, image_anns in by_image.items():
            pixels = np.asarray(Image.open(os.path.join(ds_dir, split, files[image_id])))
            for a in image_anns:
                poly = np.array(a["segmentation"][0]).reshape(-1, 2)
                mask_img = Image.new("L", (spec.image_size, spec.image_size), 0)
                # COCO coordinates: pixel (i, j) has its centre at (i + .5, j + .5)
                ImageDraw.Draw(mask_img).polygon([tuple(p) for p in (poly - 0.5).tolist()], fill=1)
                mask = np.asarray(mask_img).astype(bool)
                assert mask.sum() > 0
                inside = pixels[mask]
                assert (inside == inside[0]).all(), "object pixels are not one flat colour"
                base = colour_of[a["category_id"]]
                assert np.abs(inside[0] - base).max() <= 0.08 * base.max() + 1, (
                    a["category_id"], inside[0], base)
                # the centroid of a convex-ish shape, or any interior point, has the colour
                ys, xs = np.nonzero(mask)
                k = len(xs) // 2
                assert (pixels[ys[k], xs[k]] == inside[0]).all()
                x, y, w, h = a["bbox"]
                x0, y0 = int(x - 0.5) - 1, int(y - 0.5) - 1
                x1, y1 = int(x + w - 0.5) + 2, int(y + h - 0.5) + 2
                x0, y0 = max(x0, 0), max(y0, 0)
                same = (pixels[y0:y1, x0:x1] == inside[0]).all(-1)
                assert (same == mask[y0:y1, x0:x1]).all(), "polygon != drawn pixels"


def test_group_proportions_of_quickstart(quick_dir):
    train = _read(quick_dir, "train")
    groups = collections.Counter(c["frequency"] for c in train["categories"])
    assert groups == {"r": 8, "c": 12, "f": 10}
    inst = collections.Counter()
    freq = {c["id"]: c["frequency"] for c in train["categories"]}
    for a in train["annotations"]:
        inst[freq[a["category_id"]]] += 1
    # a long tail: the frequent group dominates, the rare group is tiny
    assert inst["f"] > 2 * inst["c"] > 10 * inst["r"] > 0


# ---------------------------------------------------------------------- Detectron2 loader

def test_detectron2_load_lvis_json(tiny_dir):
    import eqlosses_d2  # noqa: F401  # Detectron2 v0.6 compatibility shims
    from detectron2.data.datasets.lvis import load_lvis_json

    for split in ("train", "val"):
        data = _read(tiny_dir, split)
        dicts = load_lvis_json(syn.annotation_file(tiny_dir, split), image_root=tiny_dir + "/")
        assert len(dicts) == len(data["images"])
        assert all(os.path.isfile(d["file_name"]) for d in dicts)
        assert {os.path.dirname(d["file_name"]) for d in dicts} == {os.path.join(tiny_dir, split)}
        anns = [a for d in dicts for a in d["annotations"]]
        assert len(anns) == len(data["annotations"])
        assert sorted({a["category_id"] for a in anns}) == list(range(TINY.num_categories))
        first = data["annotations"][0]
        rec = next(d for d in dicts if d["image_id"] == first["image_id"])
        assert rec["annotations"][0]["bbox"] == first["bbox"]
        assert rec["annotations"][0]["category_id"] == first["category_id"] - 1  # 0-based
        assert sum(len(d["neg_category_ids"]) for d in dicts) == sum(
            len(im["neg_category_ids"]) for im in data["images"])
        assert sum(len(d["not_exhaustive_category_ids"]) for d in dicts) == sum(
            len(im["not_exhaustive_category_ids"]) for im in data["images"])


# ----------------------------------------------------------------- caching, CLI, failures


def test_ensure_reuses_and_leaves_no_temp_dirs(tmp_path):
    root = tmp_path / "root"
    ds_dir = syn.ensure_synthetic_lvis(TINY, root=str(root), progress=False)
    assert ds_dir == str(root / f"synthetic_lvis_{TINY.key()}")
    stamp = {p: os.stat(p).st_mtime_ns for p in (os.path.join(ds_dir, "spec.json"),
                                                 os.path.join(ds_dir, "train", "000000000001.png"))}
    digest = _tree_digest(ds_dir)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        syn.ensure_synthetic_lvis(TINY, root=str(root), progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [ds_dir, ds_dir]
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp  # not regenerated
    assert sorted(os.listdir(root)) == sorted([os.path.basename(ds_dir),
                                               os.path.basename(ds_dir) + ".lock"])
    # a dataset whose spec.json does not match is regenerated, atomically
    with open(os.path.join(ds_dir, "spec.json"), "w") as f:
        f.write("{}")
    os.makedirs(ds_dir + ".tmp-stale")  # leftover of a killed run
    assert syn.ensure_synthetic_lvis(TINY, root=str(root), progress=False) == ds_dir
    assert _tree_digest(ds_dir) == digest
    assert sorted(os.listdir(root)) == sorted([os.path.basename(ds_dir),
                                               os.path.basename(ds_dir) + ".lock"])


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = syn._render_image

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "_render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.generate_synthetic_lvis(TINY, str(tmp_path / "ds"), progress=False)
    assert os.listdir(tmp_path) == []


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EQLOSSES_D2_DATA", str(tmp_path / "data"))
    assert syn.default_data_root() == str(tmp_path / "data")
    monkeypatch.delenv("EQLOSSES_D2_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert syn.default_data_root() == str(tmp_path / "xdg" / "eqlosses_d2" / "datasets")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert syn.default_data_root() == os.path.join(
        os.path.expanduser("~"), ".cache", "eqlosses_d2", "datasets")


def test_cli_writes_a_dataset(tmp_path, capsys):
    out = syn.main(["--out", str(tmp_path), "--preset", "tiny", "--seed", "3",
                    "--num-train-images", "110", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    spec = dataclasses.replace(TINY, seed=3, num_train_images=110)
    assert lines[0] == out == str(tmp_path / f"synthetic_lvis_{spec.key()}")
    train = _read(out, "train")
    assert len(train["images"]) == 110
    header, rows = lines[1].split(), {line.split()[0]: line.split() for line in lines[2:6]}
    assert header[:2] == ["group", "categories"] and set(rows) == {"r", "c", "f", "all"}
    assert int(rows["all"][1]) == 6 and sum(int(rows[g][1]) for g in "rcf") == 6
    assert int(rows["all"][4]) == len(train["annotations"])  # train instances
    for g in "rcf":
        n_inst = sum(c["instance_count"] for c in train["categories"] if c["frequency"] == g)
        assert int(rows[g][4]) == n_inst
    # invalid values are reported naming the field
    with pytest.raises(SystemExit) as info:
        syn.main(["--out", str(tmp_path), "--num-train-images", "50"])
    assert info.value.code == 2 and "num_train_images" in capsys.readouterr().err
