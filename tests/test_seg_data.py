"""Semantic segmentation data: the per-class statistics of constructed masks (counted by hand,
ignored pixels included), their cache (hit, miss, invalidation), one-line errors for bad masks,
the embedded set (deterministic, the planned long tail exactly, registration and records) and
ADE20K's path through Detectron2's own registration on a small constructed directory tree (fake
masks named as ADE's; no real data)."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from eqlosses_d2.data import DatasetError
from eqlosses_d2.data.synthetic_spec import COLOURS
from eqlosses_d2.segmentation import data as seg_data
from eqlosses_d2.segmentation.data import statistics as seg_statistics
from eqlosses_d2.segmentation.data import synthetic
from eqlosses_d2.segmentation.data.datasets import register_ade20k_sem_seg, training_split_of
from eqlosses_d2.segmentation.data.statistics import (compute_sem_seg_statistics, load_sem_seg_statistics,
                                                      statistics_cache_file)
from eqlosses_d2.segmentation.data.synthetic import TINY_SEM_SEG_SPEC, SyntheticSemSegSpec, thing_image_counts


def _save(path, array, mode="L"):
    array = np.asarray(array, dtype=np.uint8)
    image = Image.fromarray(array, "L")
    if mode == "P":  # a palette PNG (as VOC's masks): read back as its indices
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        image.putdata(array.reshape(-1).tolist())
    image.save(path)
    return str(path)


# three masks of 4 classes (class 3 never appears), counted by hand:
#   m1 [[0 0 1] [255 1 2]]    -> class 0: 2, class 1: 2, class 2: 1, ignored 1
#   m2 all 255 (2 x 2)       -> nothing labelled
#   m3 [[2 2] [2 0] [255 0]] -> class 2: 3, class 0: 2, ignored 1 (saved as a palette PNG)
M1 = [[0, 0, 1], [255, 1, 2]]
M2 = [[255, 255], [255, 255]]
M3 = [[2, 2], [2, 0], [255, 0]]
PIXELS = [4, 2, 4, 0]
IMAGES = [2, 1, 2, 0]


@pytest.fixture
def masks(tmp_path, monkeypatch):
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    return [_save(tmp_path / "m1.png", M1), _save(tmp_path / "m2.png", M2), _save(tmp_path / "m3.png", M3, mode="P")]


@pytest.mark.parametrize("num_workers", [1, 3])
def test_statistics_of_constructed_masks(masks, num_workers):
    assert np.asarray(Image.open(masks[2])).tolist() == M3 and Image.open(masks[2]).mode == "P"
    stats = compute_sem_seg_statistics(masks, num_classes=4, ignore_label=255, num_workers=num_workers)
    assert stats.pixel_count == PIXELS and stats.image_count == IMAGES
    assert stats.num_images == 3 and stats.num_images_with_annotations == 2
    assert stats.frequency == ["r", "r", "r", "r"]  # <= 10 images
    assert stats.with_thresholds(0, 1).frequency == ["f", "c", "f", "r"]


def test_statistics_cache_hit_miss_and_invalidation(masks, monkeypatch, tmp_path):
    calls = []
    real = seg_statistics.compute_sem_seg_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(seg_statistics, "compute_sem_seg_statistics", counting)
    first = load_sem_seg_statistics(masks, 4)
    cache_file = statistics_cache_file(masks, 4)
    assert calls == [1] and os.path.isfile(cache_file) and cache_file.startswith(str(tmp_path / "cache"))
    assert load_sem_seg_statistics(masks, 4) == first and calls == [1]  # hit
    # another number of classes, ignore value or mask list is another key: a miss
    assert load_sem_seg_statistics(masks[:2], 4).pixel_count == [2, 2, 1, 0] and calls == [1, 1]
    assert load_sem_seg_statistics(masks, 5).pixel_count == PIXELS + [0] and len(calls) == 3
    # a changed mask (new size / modification time) invalidates: m2 becomes all class 3
    _save(masks[1], [[3, 3], [3, 3]])
    os.utime(masks[1], ns=(1, 1))
    stats = load_sem_seg_statistics(masks, 4)
    assert len(calls) == 4 and stats.pixel_count == [4, 2, 4, 4] and stats.image_count == [2, 1, 2, 1]
    assert stats.num_images_with_annotations == 3
    # a corrupt cache file is ignored and rewritten
    with open(statistics_cache_file(masks, 4), "w") as f:
        f.write("{not json")
    assert load_sem_seg_statistics(masks, 4) == stats and len(calls) == 5
    assert load_sem_seg_statistics(masks, 4) == stats and len(calls) == 5


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_masks_are_one_line_errors(masks, tmp_path):
    missing = str(tmp_path / "absent.png")
    with pytest.raises(DatasetError) as e:
        load_sem_seg_statistics(masks + [missing], 4, dataset_name="toy")
    assert _one_line(e) == f"dataset 'toy': mask {missing} not found"
    with pytest.raises(DatasetError) as e:
        compute_sem_seg_statistics([missing], 4)
    assert _one_line(e) == f"mask {missing} not found"
    # label 7 is neither a class (0..3) nor 255: 2 pixels of it
    bad = _save(tmp_path / "bad.png", [[0, 7], [7, 255]])
    with pytest.raises(DatasetError) as e:
        load_sem_seg_statistics(masks + [bad], 4, dataset_name="toy")
    assert _one_line(e) == (f"dataset 'toy': mask {bad} has label 7 at 2 pixels, neither a class (0..3) "
                            f"nor the ignore value 255")
    # 255 is a class when the ignore value is another one
    assert compute_sem_seg_statistics([masks[1]], 256, ignore_label=0).pixel_count[255] == 4
    rgb = str(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8), "RGB").save(rgb)
    with pytest.raises(DatasetError) as e:
        compute_sem_seg_statistics([rgb], 4)
    assert _one_line(e) == f"mask {rgb} has shape (2, 2, 3), not a single-channel label map"
    text = tmp_path / "text.png"
    text.write_text("not a png")
    with pytest.raises(DatasetError) as e:
        compute_sem_seg_statistics([str(text)], 4)
    assert _one_line(e).startswith(f"mask {text} is not a readable image (")


# -- the embedded set ------------------------------------------------------------------------------


def test_spec_long_tail_profiles_by_hand():
    # n_i = round(20 * 10^(-i/6)): 20, 13.6, 9.28, 6.32, 4.31, 2.94, 2
    assert thing_image_counts(TINY_SEM_SEG_SPEC).tolist() == [20, 14, 9, 6, 4, 3, 2]
    # pareto: round(20 * (i+1)^(-ln 10 / ln 7)): 20, 8.81, 5.45, 3.88, 2.98, 2.40, 2
    pareto = SyntheticSemSegSpec(**{**TINY_SEM_SEG_SPEC.__dict__, "profile": "pareto"})
    assert thing_image_counts(pareto).tolist() == [20, 9, 5, 4, 3, 2, 2]
    # the quickstart: 300 * 100^(-i/18), i = 0..18; groups by LVIS's thresholds with the background (400 images)
    counts = thing_image_counts(synthetic.QUICKSTART_SEM_SEG_SPEC).tolist()
    assert counts == [300, 232, 180, 139, 108, 83, 65, 50, 39, 30, 23, 18, 14, 11, 8, 6, 5, 4, 3]
    groups = [sum(1 for n in [400] + counts if lo < n <= hi) for lo, hi in ((100, 1e9), (10, 100), (0, 10))]
    assert groups == [6, 9, 5]
    assert synthetic.class_names(TINY_SEM_SEG_SPEC)[0] == "background"
    assert len(set(synthetic.class_names(synthetic.QUICKSTART_SEM_SEG_SPEC))) == 20


@pytest.mark.parametrize("field, value, words", [
    ("imbalance_ratio", 50.0, "imbalance_ratio: must be in [1, max_images_per_class=20]"),
    ("num_train_images", 12, "max_images_per_class: must be in [1, num_train_images=12]"),
    ("max_objects_per_image", 2, "num_train_images: too small: the thing classes' image counts sum to 58"),
    ("val_images_per_class", 9, "val_images_per_class: must be in [1, num_val_images=8]"),
    ("profile", "zipf", "profile: must be one of exponential, pareto"),
    ("num_classes", 1, "num_classes: must be in [2, 109]"),
])
def test_spec_refuses_bad_values(field, value, words):
    with pytest.raises(ValueError, match=r"^SyntheticSemSegSpec\.") as e:
        SyntheticSemSegSpec(**{**TINY_SEM_SEG_SPEC.__dict__, field: value})
    assert words in _one_line(e)


def _digest(directory):
    digest = hashlib.sha256()
    for base, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(base, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seg_data"))
    cache = str(tmp_path_factory.mktemp("seg_cache"))
    old = os.environ.get("EQLOSSES_D2_CACHE")
    os.environ["EQLOSSES_D2_CACHE"] = cache
    try:
        train, val = seg_data.register_synthetic_sem_seg(f"pytest_seg_tiny_{os.path.basename(root)}",
                                                        TINY_SEM_SEG_SPEC, root=root)
        seg_data.prepare_sem_seg_dataset(train)
        seg_data.prepare_sem_seg_dataset(val)
        yield {"train": train, "val": val, "root": root, "dir": synthetic.dataset_dir_for(TINY_SEM_SEG_SPEC, root)}
    finally:
        if old is None:
            os.environ.pop("EQLOSSES_D2_CACHE", None)
        else:
            os.environ["EQLOSSES_D2_CACHE"] = old


def test_embedded_splits_are_registered_without_generating():
    for prefix, spec in seg_data.SYNTHETIC_SEM_SEG_DATASETS.items():
        for split in ("train", "val"):
            meta = MetadataCatalog.get(f"{prefix}_{split}")
            assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
            assert meta.stuff_classes == synthetic.class_names(spec)
            assert training_split_of(f"{prefix}_{split}") == f"{prefix}_train"
    assert seg_data.SYNTHETIC_SEM_SEG_DATASETS == {"synthetic_lt_sem_seg": synthetic.QUICKSTART_SEM_SEG_SPEC,
                                                   "synthetic_lt_sem_seg_tiny": TINY_SEM_SEG_SPEC}


def test_tiny_set_records_and_long_tail(tiny):
    records = DatasetCatalog.get(tiny["train"])
    assert len(records) == 24 and len(DatasetCatalog.get(tiny["val"])) == 8
    first = records[0]
    assert set(first) == {"file_name", "sem_seg_file_name", "height", "width", "image_id"}
    assert (first["height"], first["width"], first["image_id"]) == (64, 64, 1)
    image, mask = Image.open(first["file_name"]), Image.open(first["sem_seg_file_name"])
    assert image.mode == "RGB" and image.size == (64, 64) and mask.mode == "L" and mask.size == (64, 64)
    train = MetadataCatalog.get(tiny["train"]).class_statistics
    # planned exactly: the background in every image, the things 20 .. 2 images (long tail, ratio 10)
    assert train.image_count == [24, 20, 14, 9, 6, 4, 3, 2]
    assert train.num_images == train.num_images_with_annotations == 24
    assert train.frequency == ["c", "c", "c", "r", "r", "r", "r", "r"]
    # pixels: the background is most of them; things long-tailed (the most frequent thing has >= 5x the pixels
    # of the rarest); some pixels are ignored (the unlabelled objects)
    pixels = np.array(train.pixel_count)
    labelled = pixels.sum()
    assert pixels[0] > 0.8 * labelled and pixels[1:].min() > 0
    assert max(pixels[1:4]) > 5 * pixels[7]
    masks = np.stack([np.asarray(Image.open(r["sem_seg_file_name"])) for r in records])
    assert labelled + (masks == 255).sum() == 24 * 64 * 64 and (masks == 255).sum() > 0
    assert sorted(np.unique(masks).tolist()) == list(range(8)) + [255]
    # val: balanced, every thing in exactly 3 images
    val = MetadataCatalog.get(tiny["val"]).class_statistics
    assert val.image_count == [8] + [3] * 7
    # images and masks agree: every pixel of a thing has its class's colour (up to the 8% brightness jitter)
    plan = synthetic.plan_synthetic_sem_seg(TINY_SEM_SEG_SPEC)
    present = plan["splits"]["train"]["present"]
    assert all(1 <= len(p) <= 4 for p in present) and sum(map(len, present)) == 58  # 20 + 14 + ... + 2
    for record in records[:6]:
        rgb = np.asarray(Image.open(record["file_name"])).astype(float)
        labels = np.asarray(Image.open(record["sem_seg_file_name"]))
        present = sorted(set(np.unique(labels).tolist()) - {0, 255})
        assert present == plan["splits"]["train"]["present"][record["image_id"] - 1]
        for c in present:
            base = np.array(COLOURS[plan["classes"][c - 1]["colour"]], dtype=float)
            assert (np.abs(rgb[labels == c] - base) <= 0.08 * base + 1).all()


def test_generation_is_deterministic_and_atomic(tiny, tmp_path):
    again = synthetic.ensure_synthetic_sem_seg(TINY_SEM_SEG_SPEC, root=str(tmp_path))
    assert os.path.basename(again) == os.path.basename(tiny["dir"])
    assert _digest(again) == _digest(tiny["dir"])
    # an incomplete directory of the same name (an interrupted run without the lock) is replaced
    broken = synthetic.dataset_dir_for(TINY_SEM_SEG_SPEC, str(tmp_path / "other"))
    os.makedirs(os.path.join(broken, "images"))
    assert synthetic.ensure_synthetic_sem_seg(TINY_SEM_SEG_SPEC, root=str(tmp_path / "other")) == broken
    assert _digest(broken) == _digest(tiny["dir"])
    assert sorted(os.listdir(tmp_path / "other")) == [os.path.basename(broken), os.path.basename(broken) + ".lock"]
    # another seed is another dataset
    other = SyntheticSemSegSpec(**{**TINY_SEM_SEG_SPEC.__dict__, "seed": 1})
    assert other.key() != TINY_SEM_SEG_SPEC.key()


def test_prepare_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetError) as e:
        seg_data.prepare_sem_seg_dataset("pytest_no_such_dataset")
    assert "pytest_no_such_dataset' is not registered" in _one_line(e)
    with pytest.raises(DatasetError) as e:
        seg_data.prepare_sem_seg_dataset("coco_2017_val")  # registered, not semantic segmentation
    assert _one_line(e) == ("dataset 'coco_2017_val' is not a semantic segmentation dataset "
                            "(its metadata has no stuff_classes)")


# -- ADE20K through Detectron2's registration, on a constructed tree ------------------------------

# per file name: the mask (150 classes, 255 ignore) of a constructed tree named as ADE's
ADE_TRAIN = {
    "ADE_train_00000001": [[0, 0, 149], [255, 3, 3]],
    "ADE_train_00000002": [[3, 3, 3], [3, 255, 255]],
    "ADE_train_00000003": [[255, 255, 255], [255, 255, 255]],
}
ADE_VAL = {"ADE_val_00000001": [[0, 3, 3], [149, 149, 255]]}


@pytest.fixture
def ade_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "datasets" / "ADEChallengeData2016"
    for split, masks in (("training", ADE_TRAIN), ("validation", ADE_VAL)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations_detectron2" / split).mkdir(parents=True)
        for stem, mask in masks.items():
            Image.fromarray(np.full((2, 3, 3), 90, np.uint8), "RGB").save(base / "images" / split / f"{stem}.jpg")
            _save(base / "annotations_detectron2" / split / f"{stem}.png", mask)
    original = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    yield tmp_path / "datasets"
    register_ade20k_sem_seg(original)  # Detectron2's registration from $DETECTRON2_DATASETS again


def test_ade20k_statistics_from_detectron2_registration(ade_root, tmp_path):
    names = register_ade20k_sem_seg(str(ade_root))
    assert names == ["ade20k_sem_seg_train", "ade20k_sem_seg_val"]
    meta = MetadataCatalog.get("ade20k_sem_seg_train")
    assert len(meta.stuff_classes) == 150 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert training_split_of("ade20k_sem_seg_val") == "ade20k_sem_seg_train"
    stats = seg_data.get_sem_seg_class_statistics("ade20k_sem_seg_train")
    expected_pixels = [0] * 150
    expected_pixels[0], expected_pixels[3], expected_pixels[149] = 2, 6, 1
    expected_images = [0] * 150
    expected_images[0], expected_images[3], expected_images[149] = 1, 2, 1
    assert stats.pixel_count == expected_pixels and stats.image_count == expected_images
    assert stats.num_images == 3 and stats.num_images_with_annotations == 2
    assert os.listdir(tmp_path / "cache" / "class_stats" / "sem_seg")  # cached
    # a mask with label 150 (the raw ADE annotations' 1..150, not Detectron2's 0..149 + 255): one line
    _save(ade_root / "ADEChallengeData2016" / "annotations_detectron2" / "training" / "ADE_train_00000003.png",
          [[150, 0, 0], [0, 0, 0]])
    register_ade20k_sem_seg(str(ade_root))
    with pytest.raises(DatasetError) as e:
        seg_data.prepare_sem_seg_dataset("ade20k_sem_seg_train")
    assert "ADE_train_00000003.png has label 150 at 1 pixels, neither a class (0..149)" in _one_line(e)


def test_ade20k_missing_is_one_line_naming_the_path(tmp_path):
    original = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    try:
        register_ade20k_sem_seg(str(tmp_path / "nowhere"))
        with pytest.raises(DatasetError) as e:
            seg_data.prepare_sem_seg_dataset("ade20k_sem_seg_train")
        message = _one_line(e)
        assert str(tmp_path / "nowhere" / "ADEChallengeData2016" / "annotations_detectron2" / "training") in message
        assert "$DETECTRON2_DATASETS" in message and "prepare_ade20k_sem_seg.py" in message
    finally:
        register_ade20k_sem_seg(original)
