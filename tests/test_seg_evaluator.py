"""LongTailSemSegEvaluator on a constructed example (two images, five classes, ignored pixels, a class
predicted but absent from the ground truth) against hand-computed mIoU, group mIoU, fwIoU, mACC and
pACC; the per-class json and plot; the printed table; Detectron2's own SemSegEvaluator on v0.6 with
the compat patch (numpy-int-sem-seg); one-line errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

from eqlosses_d2 import compat
from eqlosses_d2.data import DatasetError
from eqlosses_d2.segmentation import SemSegClassStatistics
from eqlosses_d2.segmentation.evaluator import (LongTailSemSegEvaluator, format_sem_seg_table, group_mean_iou,
                                                per_class_iou_acc)

CLASSES = ["a", "b", "c", "d", "e"]
# ground truth (255 ignored) and predictions of two images
GT = [np.array([[0, 0, 1, 1], [2, 2, 255, 0]]), np.array([[0, 0], [3, 255]])]
PRED = [np.array([[0, 1, 1, 1], [2, 0, 3, 0]]), np.array([[0, 2], [4, 1]])]
# By hand, over the 10 pixels whose ground truth is not ignored (the two ignored ones predicted 3 and 1 do
# not count): (gt, pred) = (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0) | (0,0) (0,2) (3,4)
#   GT   = [5, 2, 2, 1, 0]     TP = [3, 2, 1, 0, 0]     PRED = [4, 3, 2, 0, 1]
#   IoU  = [3/6, 2/3, 1/3, 0/1, undefined]   ACC = [3/5, 2/2, 1/2, 0/1, undefined]
#   mIoU = (1/2 + 2/3 + 1/3 + 0) / 4 = 37.5 (v0.6's SemSegEvaluator divides by 5, e being predicted: 30.0)
#   fwIoU = .5 * 1/2 + .2 * 2/3 + .2 * 1/3 + .1 * 0 = 45.0; mACC = (.6 + 1 + .5 + 0) / 4 = 52.5; pACC = 6/10 = 60.0
IOU = [50.0, 200 / 3, 100 / 3, 0.0, float("nan")]
ACC = [60.0, 100.0, 50.0, 0.0, float("nan")]
#   training images [50, 5, 200, 8, 0] -> groups (10 / 100) c, r, f, r, r:
#   mIoU-r = (2/3 + 0) / 2 = 33.33 (e has no IoU), mIoU-c = 50, mIoU-f = 33.33
TRAIN = SemSegClassStatistics(image_count=[50, 5, 200, 8, 0], pixel_count=[9000, 40, 5000, 70, 0],
                              num_images=210, num_images_with_annotations=209)
EXPECTED = {"mIoU": 37.5, "fwIoU": 45.0, "mACC": 52.5, "pACC": 60.0,
            "mIoU-r": 100 / 3, "mIoU-c": 50.0, "mIoU-f": 100 / 3}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The masks' statistics (computed when an evaluator is built) go to a temporary cache."""
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))


def _register_toy(name, directory):
    records = [{"file_name": os.path.join(directory, f"image_{i}.png"),
                "sem_seg_file_name": os.path.join(directory, f"gt_{i}.png"),
                "height": gt.shape[0], "width": gt.shape[1], "image_id": i} for i, gt in enumerate(GT)]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=CLASSES, ignore_label=255, evaluator_type="sem_seg")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seg_eval")
    for i, gt in enumerate(GT):
        Image.fromarray(gt.astype(np.uint8), "L").save(directory / f"gt_{i}.png")
        Image.fromarray(np.zeros(gt.shape + (3,), np.uint8), "RGB").save(directory / f"image_{i}.png")
    name = f"pytest_sem_seg_toy_{directory.name}"
    _register_toy(name, str(directory))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _logits(pred, num_classes=5):
    return torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).permute(2, 0, 1).float()


def _run(evaluator, name):
    evaluator.reset()
    for record, pred in zip(DatasetCatalog.get(name), PRED):
        evaluator.process([record], [{"sem_seg": _logits(pred)}])
    return evaluator.evaluate()


def _close(a, b):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)


def test_confusion_matrix_functions_by_hand():
    conf = np.zeros((6, 6), dtype=np.int64)
    for gt, pred in zip(GT, PRED):
        gt = np.where(gt == 255, 5, gt)
        np.add.at(conf, (pred.reshape(-1), gt.reshape(-1)), 1)
    iou, acc = per_class_iou_acc(conf)
    assert all(_close(100 * x, y) for x, y in zip(iou, IOU)) and all(_close(100 * x, y) for x, y in zip(acc, ACC))
    groups = group_mean_iou(iou, TRAIN.frequency)
    assert list(groups) == ["mIoU-r", "mIoU-c", "mIoU-f"]
    assert all(_close(groups[k], EXPECTED[k]) for k in groups)
    # a group without classes, or without a class with ground truth: NaN
    empty = group_mean_iou(iou, ["c", "c", "f", "c", "r"])
    assert math.isnan(empty["mIoU-r"]) and _close(empty["mIoU-c"], 100 * (1 / 2 + 2 / 3 + 0) / 3)


def test_long_tail_evaluator_by_hand(toy, tmp_path):
    evaluator = LongTailSemSegEvaluator(toy, distributed=False, output_dir=str(tmp_path), class_statistics=TRAIN)
    res = _run(evaluator, toy)["sem_seg"]
    for key, value in EXPECTED.items():
        assert _close(res[key], value), (key, res[key], value)
    for name, iou, acc in zip(CLASSES, IOU, ACC):
        assert _close(res[f"IoU-{name}"], iou) and _close(res[f"ACC-{name}"], acc)
    with open(tmp_path / "per_class_iou.json") as f:
        records = json.load(f)
    assert [r["name"] for r in records] == CLASSES and [r["group"] for r in records] == ["c", "r", "f", "r", "r"]
    assert [r["train_image_count"] for r in records] == TRAIN.image_count
    assert [r["train_pixel_count"] for r in records] == TRAIN.pixel_count
    assert records[4]["IoU"] is None and records[4]["ACC"] is None and _close(records[1]["IoU"], 200 / 3)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    assert os.path.isfile(tmp_path / "per_class_iou.png") == (matplotlib is not None)
    # other thresholds (the statistics carry them): rare <= 4 < common <= 100: groups c, c, f, c, r
    evaluator = LongTailSemSegEvaluator(toy, distributed=False, class_statistics=TRAIN.with_thresholds(4, 100))
    res = _run(evaluator, toy)["sem_seg"]
    assert math.isnan(res["mIoU-r"])  # only e, which has no ground truth
    assert _close(res["mIoU-c"], 100 * (1 / 2 + 2 / 3 + 0) / 3) and _close(res["mIoU-f"], 100 / 3)
    table = format_sem_seg_table({"sem_seg": res}, "toy").splitlines()
    assert table[0] == "| dataset | mIoU | mIoU-r | mIoU-c | mIoU-f | fwIoU | mACC | pACC |"
    assert table[2] == "| toy | 37.50 | nan | 38.89 | 33.33 | 45.00 | 52.50 | 60.00 |"
    assert format_sem_seg_table({"x": {"sem_seg": res}, "y": {"sem_seg": res}}).count("| 37.50 |") == 2


def _evaluate_one_image_per_rank(name, directory, out):
    """One rank of two: evaluate only image <rank> with the gathering evaluator; save the result."""
    import detectron2.utils.comm as comm

    _register_toy(name, directory)  # a spawned process starts bare
    evaluator = LongTailSemSegEvaluator(name, distributed=True, class_statistics=TRAIN)
    evaluator.reset()
    rank = comm.get_rank()
    record = DatasetCatalog.get(name)[rank]
    evaluator.process([record], [{"sem_seg": _logits(PRED[rank])}])
    torch.save({"world_size": comm.get_world_size(), "results": evaluator.evaluate()}, f"{out}/rank{rank}.pt")


def test_two_processes_gather_before_the_groups(toy, tmp_path):
    """Two gloo processes, one image each: rank 0 reports the hand values of both images, rank 1 nothing."""
    from eqlosses_d2.compat import launch

    directory = os.path.dirname(DatasetCatalog.get(toy)[0]["sem_seg_file_name"])
    launch(_evaluate_one_image_per_rank, 2, dist_url="auto", args=(toy, directory, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and not ranks[1]["results"]
    res = ranks[0]["results"]["sem_seg"]
    for key, value in EXPECTED.items():
        assert _close(res[key], value), (key, res[key], value)


def test_statistics_from_the_training_split(toy, tmp_path, monkeypatch):
    """Without statistics the evaluator reads those of class_count_dataset, computed from its masks."""
    mask = str(tmp_path / "train.png")
    Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8), "L").save(mask)
    image = str(tmp_path / "train.jpg")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8), "RGB").save(image)
    train = f"pytest_sem_seg_toy_train_{tmp_path.name}"
    DatasetCatalog.register(train, lambda: [{"file_name": image, "sem_seg_file_name": mask}])
    MetadataCatalog.get(train).set(stuff_classes=CLASSES, ignore_label=255, evaluator_type="sem_seg")
    MetadataCatalog.get(toy).set(class_count_dataset=train)
    try:
        evaluator = LongTailSemSegEvaluator(toy, distributed=False)
        res = _run(evaluator, toy)["sem_seg"]
        assert evaluator.class_statistics().image_count == [1, 1, 1, 0, 0]
        # every class is rare (<= 10 images): mIoU-r is the mIoU, the others have no class
        assert _close(res["mIoU-r"], 37.5) and math.isnan(res["mIoU-c"]) and math.isnan(res["mIoU-f"])
    finally:
        DatasetCatalog.remove(train)
        MetadataCatalog.remove(train)
        del MetadataCatalog.get(toy).__dict__["class_count_dataset"]


def test_wrong_statistics_are_one_line(toy):
    three = SemSegClassStatistics(image_count=[1, 2, 3], pixel_count=[1, 2, 3], num_images=3,
                                  num_images_with_annotations=3)
    with pytest.raises(ValueError) as e:
        LongTailSemSegEvaluator(toy, distributed=False, class_statistics=three)
    assert str(e.value) == f"class_statistics have 3 classes but dataset '{toy}' has 5 (stuff_classes)"


def test_bad_evaluation_masks_fail_when_the_evaluator_is_built(tmp_path, monkeypatch):
    """A label that is no class (7 with 5 classes, not 255) or a missing mask: one line at construction."""
    for i, gt in enumerate(GT):
        Image.fromarray(np.where(gt == 3, 7, gt).astype(np.uint8), "L").save(tmp_path / f"gt_{i}.png")
        Image.fromarray(np.zeros(gt.shape + (3,), np.uint8), "RGB").save(tmp_path / f"image_{i}.png")
    name = f"pytest_sem_seg_bad_{tmp_path.name}"
    _register_toy(name, str(tmp_path))
    try:
        with pytest.raises(DatasetError) as e:
            LongTailSemSegEvaluator(name, distributed=False, class_statistics=TRAIN)
        assert str(e.value) == (f"dataset '{name}': mask {tmp_path / 'gt_1.png'} has label 7 at 1 pixels, neither "
                                f"a class (0..4) nor the ignore value 255")
        os.remove(tmp_path / "gt_1.png")
        MetadataCatalog.get(name).__dict__.pop("class_statistics", None)
        with pytest.raises(DatasetError) as e:
            LongTailSemSegEvaluator(name, distributed=False, class_statistics=TRAIN)
        assert str(e.value) == f"dataset '{name}': mask {tmp_path / 'gt_1.png'} not found"
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_detectron2_sem_seg_evaluator_runs_with_the_compat_patch(toy):
    """v0.6's SemSegEvaluator says np.int / np.float, which numpy >= 1.24 lacks: compat gives that
    module numpy with the two aliases (numpy itself unchanged). Its mIoU convention differs from main's
    (fixed upstream in 2022): both are checked against the hand values."""
    from detectron2.evaluation import sem_seg_evaluation

    source = compat._source("detectron2.evaluation.sem_seg_evaluation")
    names_alias = "dtype=np.int)" in source
    if names_alias and not hasattr(np, "int"):
        assert "numpy-int-sem-seg" in compat.apply_detectron2_patches()
        assert "numpy-int-sem-seg" in compat.needed_patches()
        assert sem_seg_evaluation.np.int is int and sem_seg_evaluation.np.float is float
        assert sem_seg_evaluation.np.bincount is np.bincount and not hasattr(np, "int")
    else:
        assert "numpy-int-sem-seg" not in compat.apply_detectron2_patches()
    res = _run(SemSegEvaluator(toy, distributed=False), toy)["sem_seg"]
    main_convention = "iou_valid = np.logical_and(acc_valid, union > 0)" in source
    assert _close(res["mIoU"], 37.5 if main_convention else 30.0)
    for key in ("fwIoU", "mACC", "pACC"):
        assert _close(res[key], EXPECTED[key])


def test_patch_is_not_applied_where_detectron2_says_int(monkeypatch):
    """Main's SemSegEvaluator (dtype=int / float): nothing to patch."""
    main_text = "            pred = np.array(output, dtype=int)\n        acc = np.full(n, np.nan, dtype=float)\n"
    real = compat._source
    monkeypatch.setattr(compat, "_source", lambda name: main_text if name.endswith("sem_seg_evaluation") else real(name))
    assert not compat._sem_seg_numpy_aliases_needed()
    assert "numpy-int-sem-seg" not in compat.needed_patches()
    v06_text = "            pred = np.array(output, dtype=np.int)\n"
    monkeypatch.setattr(compat, "_source", lambda name: v06_text if name.endswith("sem_seg_evaluation") else real(name))
    assert compat._sem_seg_numpy_aliases_needed() == (not hasattr(np, "int"))
