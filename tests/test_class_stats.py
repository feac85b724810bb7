"""Per-class statistics from an annotation file, their cache, and their model buffers."""
import json
import os

import numpy as np
import pytest
import torch

from eqlosses_d2 import ClassStatsBuffers
from eqlosses_d2.data import compute_class_statistics, load_class_statistics
from eqlosses_d2.data.class_stats import frequency_group


def _lvis_like():
    # 5 images (image 5 has no annotation); categories out of id order, one crowd annotation
    return {
        "images": [{"id": i} for i in range(1, 6)],
        "categories": [
            {"id": 7, "name": "seven", "frequency": "c"},  # field wins over the count
            {"id": 2, "name": "two"},
            {"id": 3, "name": "three"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2},
            {"id": 2, "image_id": 1, "category_id": 2},
            {"id": 3, "image_id": 2, "category_id": 2},
            {"id": 4, "image_id": 2, "category_id": 7},
            {"id": 5, "image_id": 3, "category_id": 7},
            {"id": 6, "image_id": 4, "category_id": 3, "iscrowd": 1},
        ],
    }


def test_counts_from_annotations():
    stats = compute_class_statistics(_lvis_like())
    assert stats.category_ids == [2, 3, 7]  # contiguous index = sorted ids
    assert stats.class_names == ["two", "three", "seven"]
    assert stats.image_count.tolist() == [2, 0, 2]
    assert stats.instance_count.tolist() == [3, 0, 2]  # the crowd one is not counted
    assert stats.frequency == ["r", "r", "c"]
    assert stats.num_images == 5
    assert stats.num_images_with_annotations == 3  # image 4 has only a crowd annotation
    assert stats.class_image_count() == [
        {"id": 2, "image_count": 2}, {"id": 3, "image_count": 0}, {"id": 7, "image_count": 2}
    ]


def test_frequency_thresholds_are_lvis():
    assert [frequency_group(n) for n in (1, 10, 11, 100, 101)] == ["r", "r", "c", "c", "f"]


def test_unknown_category_is_reported():
    data = _lvis_like()
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 99})
    with pytest.raises(ValueError, match="annotation 9 has unknown category_id 99"):
        compute_class_statistics(data)


def test_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_lvis_like()))
    first = load_class_statistics(str(path))
    cached = os.listdir(tmp_path / "cache" / "eqlosses_d2" / "class_stats")
    assert len(cached) == 1
    again = load_class_statistics(str(path))
    assert again.image_count.tolist() == first.image_count.tolist() and again.frequency == first.frequency
    # a changed file is recomputed, not served from the cache
    data = _lvis_like()
    data["annotations"].append({"id": 10, "image_id": 5, "category_id": 3})
    path.write_text(json.dumps(data) + " ")
    os.utime(path, ns=(1, 10**18))
    changed = load_class_statistics(str(path))
    assert changed.image_count.tolist() == [2, 1, 2] and changed.num_images_with_annotations == 4


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_class_statistics(str(tmp_path / "nope.json"))


def test_buffers_round_trip_through_state_dict():
    stats = compute_class_statistics(_lvis_like())
    module = ClassStatsBuffers(3).set_from(stats)
    assert module.image_count.tolist() == [2, 0, 2]
    assert module.frequency_group.tolist() == [0, 0, 1]
    assert int(module.num_images) == 5 and int(module.num_images_with_annotations) == 3
    assert torch.allclose(module.image_frequency(), torch.tensor([2 / 3, 0.0, 2 / 3], dtype=torch.float64))
    restored = ClassStatsBuffers(3)
    restored.load_state_dict(module.state_dict())
    assert bool(restored.is_set) and restored.instance_count.tolist() == [3, 0, 2]


def test_buffers_reject_wrong_class_count():
    stats = compute_class_statistics(_lvis_like())
    with pytest.raises(ValueError, match="'toy' has 3 classes but the model has 4"):
        ClassStatsBuffers(4).set_from(stats, "toy")


def test_synthetic_metadata(tiny_dataset):
    from detectron2.data import MetadataCatalog

    from eqlosses_d2 import get_class_statistics

    stats = get_class_statistics(tiny_dataset["train"])
    meta = MetadataCatalog.get(tiny_dataset["train"])
    assert meta.evaluator_type == "lvis"
    assert meta.thing_classes == stats.class_names and len(stats.class_names) == 6
    with open(meta.json_file) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    # the generator's own counts agree with the ones recomputed from its annotations
    assert stats.image_count.tolist() == [c["image_count"] for c in categories]
    assert stats.instance_count.tolist() == [c["instance_count"] for c in categories]
    assert stats.frequency == [c["frequency"] for c in categories]
    assert set(stats.frequency) == {"r", "c", "f"}
    assert np.all(stats.image_count >= 1)


def test_cache_dir_setting(tmp_path, monkeypatch):
    """$EQLOSSES_D2_CACHE (eqlosses_d2's cache directory, the model zoo's too) names where
    the statistics are cached, before $XDG_CACHE_HOME; use_cache=False writes nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "mine"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_lvis_like()))
    assert load_class_statistics(str(path)).image_count.tolist() == [2, 0, 2]
    assert len(os.listdir(tmp_path / "mine" / "class_stats")) == 1
    assert not (tmp_path / "xdg").exists()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_lvis_like()))
    assert load_class_statistics(str(other), use_cache=False).instance_count.tolist() == [3, 0, 2]
    assert len(os.listdir(tmp_path / "mine" / "class_stats")) == 1 and not (tmp_path / "xdg").exists()
    monkeypatch.delenv("EQLOSSES_D2_CACHE")
    assert load_class_statistics(str(other)).num_images == 5
    assert len(os.listdir(tmp_path / "xdg" / "eqlosses_d2" / "class_stats")) == 1


def test_unwritable_cache_costs_one_warning(tmp_path, monkeypatch, caplog):
    """A home where the cache cannot be created (read-only, or here a file in the way, which
    stops root too): the statistics are computed, one warning says how to set the cache."""
    import logging

    blocker = tmp_path / "home"
    blocker.write_text("not a directory")
    monkeypatch.delenv("EQLOSSES_D2_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(blocker))
    if os.name == "posix" and os.getuid() != 0:  # and a really read-only directory where that bites
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        monkeypatch.setenv("XDG_CACHE_HOME", str(readonly))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_lvis_like()))
    with caplog.at_level(logging.WARNING, logger="eqlosses_d2.data.class_stats"):
        first = load_class_statistics(str(path))
        second = load_class_statistics(str(path))
    assert first.image_count.tolist() == second.image_count.tolist() == [2, 0, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "set EQLOSSES_D2_CACHE to a writable directory" in warnings[0], warnings
    assert "\n" not in warnings[0]
