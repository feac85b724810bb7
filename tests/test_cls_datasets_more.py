"""iNaturalist 2018 registration (a tiny constructed json set: records, class counts, the
decoupling lists, one-line errors) and the CIFAR ResNet backbone with its CIFAR-100-LT recipe
(parameter count from the architecture, shapes, a forward written independently, the recipe's
schedule in iterations, the padding crop, two training iterations through train_net)."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.backbones import CifarResNet
from eqlosses_d2.classification.data import ClassificationDatasetMapper
from eqlosses_d2.classification.data import datasets as cls_datasets
from eqlosses_d2.classification.data.inaturalist import load_coco_classification_records, register_inaturalist2018
from eqlosses_d2.config import ConfigError, merge_config_file, validate_config
from eqlosses_d2.data import DatasetError, get_class_statistics
from eqlosses_d2.modeling.class_stats import ClassStatsBuffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- iNaturalist 2018 ----------------------------------------------------------------------------

#: class -> training images of the tiny set (category ids 0..3 as iNaturalist's, listed out of order)
TRAIN_COUNTS = {0: 4, 1: 1, 2: 2, 3: 3}


def _inat_json(counts, start_id=0):
    images, annotations = [], []
    image_id = start_id
    for category, n in counts.items():
        for k in range(n):
            images.append({"license": 1, "file_name": f"train_val2018/Plantae/{category}/{image_id:04x}.jpg",
                           "rights_holder": "someone", "height": 600 + k, "width": 800, "id": image_id})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": category})
            image_id += 1
    order = np.random.default_rng(0).permutation(len(images))  # the file's image order is kept
    images = [images[i] for i in order]
    categories = [{"id": c, "name": f"species {c}", "supercategory": "Plantae", "kingdom": "k", "genus": "g"}
                  for c in (2, 0, 3, 1)]
    return {"info": {"year": 2018}, "images": images, "annotations": annotations, "categories": categories,
            "licenses": [{"id": 1, "name": "x", "url": ""}]}


@pytest.fixture
def inat(tmp_path, monkeypatch):
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "inaturalist2018"
    directory.mkdir()
    train, val = _inat_json(TRAIN_COUNTS), _inat_json({c: 1 for c in range(4)}, start_id=100)
    for name, data in (("train2018.json", train), ("val2018.json", val)):
        (directory / name).write_text(json.dumps(data))
    # the decoupling code's lists, as its gen_lists.py writes them: "<file_name> <category_id>", json order
    for name, data in (("iNaturalist18_train.txt", train), ("iNaturalist18_val.txt", val)):
        label = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        (directory / name).write_text("".join(f"{i['file_name']} {label[i['id']]}\n" for i in data["images"]))
    prefix = f"pytest_inat_{tmp_path.name}"
    names = register_inaturalist2018(prefix, str(directory))
    return {"prefix": prefix, "names": names, "dir": directory, "train": train, "val": val}


def test_inaturalist_registered_lazily_with_the_standard_layout(tmp_path):
    for split, file_name in (("train", "train2018.json"), ("val", "val2018.json")):
        meta = MetadataCatalog.get(f"inaturalist2018_{split}")
        assert meta.json_file.endswith(os.path.join("inaturalist2018", file_name))
        assert meta.evaluator_type == "classification" and meta.class_count_dataset == "inaturalist2018_train"
        assert MetadataCatalog.get(f"inaturalist2018_list_{split}").list_file.endswith(
            os.path.join("inaturalist2018", f"iNaturalist18_{split}.txt"))
    # registering a directory that does not exist reads nothing and raises nothing
    names = register_inaturalist2018(f"pytest_inat_absent_{tmp_path.name}", str(tmp_path / "absent"))
    assert len(names) == 4


def test_inaturalist_records_and_class_counts(inat):
    prefix = inat["prefix"]
    assert inat["names"] == [f"{prefix}_train", f"{prefix}_list_train", f"{prefix}_val", f"{prefix}_list_val"]
    records = DatasetCatalog.get(f"{prefix}_train")
    label_of = {a["image_id"]: a["category_id"] for a in inat["train"]["annotations"]}
    assert [r["image_id"] for r in records] == [i["id"] for i in inat["train"]["images"]]
    for record, image in zip(records, inat["train"]["images"]):
        assert record["file_name"] == os.path.join(str(inat["dir"]), image["file_name"])
        assert record["label"] == label_of[image["id"]]  # ids 0..3: label = category id
        assert (record["height"], record["width"]) == (image["height"], image["width"])
    # the same records as the house's generic (json.load) reader
    assert records == cls_datasets.load_classification_json(MetadataCatalog.get(f"{prefix}_train").json_file,
                                                            str(inat["dir"]) + os.sep)
    # per-class image counts: the class statistics and the model's buffers
    stats = get_class_statistics(f"{prefix}_train")
    assert stats.image_count.tolist() == [4, 1, 2, 3] and stats.num_images == 10
    buffers = ClassStatsBuffers(4).set_from(stats)
    assert buffers.image_count.tolist() == [4, 1, 2, 3]
    assert get_class_statistics(f"{prefix}_val").image_count.tolist() == [1, 1, 1, 1]
    assert MetadataCatalog.get(f"{prefix}_val").class_count_dataset == f"{prefix}_train"


def test_inaturalist_lists_give_the_same_records(inat):
    prefix = inat["prefix"]
    for split in ("train", "val"):
        from_json = DatasetCatalog.get(f"{prefix}_{split}")
        from_list = DatasetCatalog.get(f"{prefix}_list_{split}")
        assert [(r["file_name"], r["label"]) for r in from_list] == [(r["file_name"], r["label"]) for r in from_json]
    stats = cls_datasets.prepare_classification_dataset(f"{prefix}_list_train").class_statistics
    assert stats.image_count.tolist() == [4, 1, 2, 3]


def test_labels_follow_sorted_category_ids(tmp_path):
    data = {"images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "b.jpg"}, {"id": 7, "file_name": "c.jpg"}],
            "annotations": [{"image_id": 5, "category_id": 30}, {"image_id": 6, "category_id": 10},
                            {"image_id": 7, "category_id": 20}],
            "categories": [{"id": 30}, {"id": 10}, {"id": 20}]}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    records = load_coco_classification_records(str(path), "/root/")
    assert [r["label"] for r in records] == [2, 0, 1]
    assert records[0] == {"file_name": "/root/a.jpg", "image_id": 5, "label": 2}  # no size in the file: none given


def test_inaturalist_missing_file_is_one_line(tmp_path):
    prefix = f"pytest_inat_missing_{tmp_path.name}"
    register_inaturalist2018(prefix, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get(f"{prefix}_train")
    message = str(e.value)
    assert "\n" not in message and os.path.join(str(tmp_path / "nowhere"), "train2018.json") + " not found" in message
    assert "$DETECTRON2_DATASETS/inaturalist2018/" in message
    # the training path's check (class statistics before OUTPUT_DIR is written) gives the same hint
    from eqlosses_d2.data.datasets import prepare_dataset

    with pytest.raises(DatasetError) as e:
        prepare_dataset(f"{prefix}_train")
    assert "\n" not in str(e.value) and "inaturalist2018/{train2018.json" in str(e.value)
    assert "for LVIS" not in str(e.value)


_GOOD = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
         "annotations": [{"image_id": 1, "category_id": 0}, {"image_id": 2, "category_id": 1}],
         "categories": [{"id": 0}, {"id": 1}]}


def _with(**changes):
    data = json.loads(json.dumps(_GOOD))
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("text, expected", [
    ('{"images": [', "malformed"),  # truncated
    (_with(images=[{"id": "one", "file_name": "a.jpg"}]), "$.images[0].id"),
    (json.dumps({"images": [], "annotations": []}), "categories"),
    (_with(annotations=[{"image_id": 1, "category_id": 7}, {"image_id": 2, "category_id": 1}]),
     "an annotation of image 1 has unknown category_id 7"),
    (_with(annotations=[{"image_id": 1, "category_id": 0}]), "image 2 (b.jpg) has no annotation"),
    (_with(annotations=[{"image_id": 1, "category_id": 0}, {"image_id": 1, "category_id": 1},
                        {"image_id": 2, "category_id": 1}]), "image 1 has several annotations"),
    (_with(annotations=_GOOD["annotations"] + [{"image_id": 9, "category_id": 1}]),
     "an annotation refers to image 9, which is not in 'images'"),
    (_with(images=_GOOD["images"] + [{"id": 2, "file_name": "c.jpg"}]), "image 2 is listed twice"),
], ids=["truncated", "wrong-type", "missing-list", "unknown-category", "no-label", "two-labels", "no-image",
        "image-twice"])
def test_malformed_file_is_one_line_naming_it(tmp_path, text, expected):
    path = tmp_path / "val2018.json"
    path.write_text(text)
    with pytest.raises(DatasetError) as e:
        load_coco_classification_records(str(path), str(tmp_path), name="inat_val")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"dataset 'inat_val': {path}: ") and expected in message


def test_malformed_file_through_the_catalog(inat):
    (inat["dir"] / "val2018.json").write_text(_with(images=[{"id": "one", "file_name": "a.jpg"}]))
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get(f"{inat['prefix']}_val")
    assert "\n" not in str(e.value) and "val2018.json" in str(e.value)


# -- CIFAR ResNet ----------------------------------------------------------------------------------


def _hand_count(depth, num_classes=None):
    """Parameters of He et al.'s CIFAR ResNet from the architecture: 3x3 convolutions without bias,
    BN (weight and bias) after each, parameter-free option-A shortcuts, a linear classifier."""
    n = (depth - 2) // 6
    conv = lambda c_in, c_out: 9 * c_in * c_out  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 16) + bn(16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(c_in, width) + bn(width) + conv(width, width) + bn(width)
            c_in = width
    if num_classes:
        total += 64 * num_classes + num_classes
    return total


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_parameter_count_is_the_literature(depth, millions):
    model = CifarResNet(depth)
    count = sum(p.numel() for p in model.parameters())
    assert count == _hand_count(depth)
    with_classifier = _hand_count(depth, num_classes=10)  # the table's models are CIFAR-10's
    assert round(with_classifier / 1e6, 2 if depth < 110 else 1) == millions
    if depth == 32:
        assert count == 463504 and with_classifier == 464154


def test_output_shapes_and_forward():
    model = CifarResNet(32, out_features=("stem", "res2", "res3", "res4"))
    shapes = model.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stem": (16, 1), "res2": (16, 1), "res3": (32, 2), "res4": (64, 4)}
    out = model(torch.randn(3, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stem": (3, 16, 32, 32), "res2": (3, 16, 32, 32), "res3": (3, 32, 16, 16), "res4": (3, 64, 8, 8)}
    assert all((v >= 0).all() for v in out.values())  # each output follows a ReLU
    # stages after the last requested output are not built
    assert not hasattr(CifarResNet(20, out_features=("res3",)), "res4")


def _reference_forward(params, buffers, x, n):
    """The network written again with torch.nn.functional, BN in eval mode, from the parameter names."""
    def bn(y, prefix):
        return F.batch_norm(y, buffers[prefix + ".running_mean"], buffers[prefix + ".running_var"],
                            params[prefix + ".weight"], params[prefix + ".bias"], training=False, eps=1e-5)

    y = F.relu(bn(F.conv2d(x, params["stem_conv.weight"], padding=1), "stem_norm"))
    for s, name in enumerate(("res2", "res3", "res4")):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"{name}.{b}"
            h = F.relu(bn(F.conv2d(y, params[p + ".conv1.weight"], stride=stride, padding=1), p + ".norm1"))
            h = bn(F.conv2d(h, params[p + ".conv2.weight"], padding=1), p + ".norm2")
            if stride == 2:  # option A: subsample, then zero channels on both sides
                short = y[:, :, ::2, ::2]
                extra = h.shape[1] - short.shape[1]
                zeros = torch.zeros(short.shape[0], extra // 2, *short.shape[2:], dtype=y.dtype)
                short = torch.cat([zeros, short, zeros], dim=1)
            else:
                short = y
            y = F.relu(h + short)
    return y


def test_forward_matches_an_independent_implementation():
    torch.manual_seed(0)
    model = CifarResNet(20).double()
    for module in model.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = _reference_forward(dict(model.named_parameters()), dict(model.named_buffers()), x, n=3)
    assert torch.allclose(model(x)["res4"], expected, rtol=1e-10, atol=1e-10)


def test_initialisation_is_kaiming_normal():
    torch.manual_seed(0)
    model = CifarResNet(32)
    weight = model.res4[1].conv1.weight  # 64 x 64 x 3 x 3: fan-in 576
    assert abs(weight.std().item() / math.sqrt(2.0 / 576) - 1) < 0.03 and abs(weight.mean().item()) < 0.01
    stem = model.stem_conv.weight  # fan-in 27
    assert abs(stem.std().item() / math.sqrt(2.0 / 27) - 1) < 0.25
    assert torch.equal(model.res2[0].norm1.weight, torch.ones(16)) and torch.equal(model.res2[0].norm1.bias, torch.zeros(16))


@pytest.mark.parametrize("kwargs, key", [({"depth": 33}, "MODEL.RESNETS.DEPTH"), ({"norm": "FrozenBN"}, "MODEL.RESNETS.NORM"),
                                         ({"out_features": ("res5",)}, "MODEL.RESNETS.OUT_FEATURES")])
def test_bad_backbone_keys_are_one_line(kwargs, key):
    with pytest.raises(ValueError) as e:
        CifarResNet(**kwargs)
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


# -- CIFAR-100-LT recipe ---------------------------------------------------------------------------

CIFAR_DIR = os.path.join(ROOT, "configs", "CIFAR-100-LT")
CIFAR_RECIPES = ["softmax_R32_200ep.yaml", "balanced_softmax_R32_200ep.yaml", "softmax_eql_R32_200ep.yaml"]


def _recipe(name):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, os.path.join(CIFAR_DIR, name))
    return cfg


@pytest.mark.parametrize("name", CIFAR_RECIPES)
def test_cifar_recipe_merges_and_builds(name):
    cfg = _recipe(name)
    cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg)
    assert cfg.DATASETS.TRAIN == ("cifar100_lt_train",) and cfg.DATASETS.TEST == ("cifar100_lt_test",)
    assert "cifar100_lt_train" in DatasetCatalog.list()
    model = build_model(cfg)
    assert isinstance(model.backbone, CifarResNet) and model.backbone.depth == 32
    assert sum(p.numel() for p in model.parameters()) == _hand_count(32, num_classes=100)
    assert model.loss.name == name.split("_R32")[0]


def test_cifar_schedule_is_ldam_drw_in_iterations():
    """Their lr per epoch e (1-based): 0.1·e/5 for e ≤ 5, 0.1 to 160, 0.001 to 180, 1e-5 after;
    epochs of 10,847 images (imbalance 100) at batch 128."""
    cfg = _recipe("softmax_R32_200ep.yaml")
    train_images = sum(cls_datasets.cifar_lt_counts(100, 500, 100))
    per_epoch = train_images / cfg.SOLVER.IMS_PER_BATCH
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == (128, 0.1, 2e-4)
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 2e-4  # their weight decay applies to every parameter
    assert cfg.SOLVER.MAX_ITER == math.floor(200 * per_epoch) == 16948
    assert list(cfg.SOLVER.STEPS) == [math.ceil(160 * per_epoch), math.ceil(180 * per_epoch)]

    def ldam_lr(epoch):
        return 0.1 * epoch / 5 if epoch <= 5 else 0.1 * (1e-4 if epoch > 180 else 1e-2 if epoch > 160 else 1)

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the first iteration of each warm-up epoch has theirs, to the ramp's step of one iteration
    # (the epoch starts between two iterations); then the linear ramp reaches 0.1 at epoch 5's start
    step = cfg.SOLVER.BASE_LR * (1 - cfg.SOLVER.WARMUP_FACTOR) / cfg.SOLVER.WARMUP_ITERS
    for epoch in (1, 2, 3, 4, 5):
        first = math.ceil((epoch - 1) * per_epoch)
        assert abs(lrs[first] - ldam_lr(epoch)) <= step, epoch
    assert lrs[0] == pytest.approx(0.02) and lrs[cfg.SOLVER.WARMUP_ITERS] == pytest.approx(0.1)
    # and every iteration of epochs 6..160, 162..180, 182..200 has it too
    for epoch in list(range(6, 161)) + list(range(162, 181)) + list(range(182, 201)):
        start, end = math.ceil((epoch - 1) * per_epoch), min(math.ceil(epoch * per_epoch), cfg.SOLVER.MAX_ITER)
        assert np.allclose(lrs[start:end], ldam_lr(epoch), rtol=1e-9), epoch


def test_padding_crop_of_the_recipe():
    """4 zero pixels on each side then a random 32 crop (and a flip): each output is one of the
    9 x 9 x 2 crops of the zero-padded image, and several offsets occur."""
    cfg = _recipe("softmax_R32_200ep.yaml")
    mapper = ClassificationDatasetMapper(cfg, is_train=True)
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zero inside: padding is visible
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = {}
    for y in range(9):
        for x in range(9):
            crop = padded[y:y + 32, x:x + 32]
            candidates[crop.tobytes()] = (y, x, False)
            candidates[crop[:, ::-1].tobytes()] = (y, x, True)
    seen = set()
    np.random.seed(0)
    import unittest.mock as mock

    with mock.patch("detectron2.data.detection_utils.read_image", return_value=image):
        for _ in range(30):
            out = mapper({"file_name": "x.png", "label": 0})["image"].permute(1, 2, 0).numpy()
            assert out.shape == (32, 32, 3)
            seen.add(candidates[np.ascontiguousarray(out).tobytes()])
    assert len({(y, x) for y, x, _ in seen}) > 5 and {f for _, _, f in seen} == {False, True}
    # evaluation: the image itself
    test_mapper = ClassificationDatasetMapper(cfg, is_train=False)
    with mock.patch("detectron2.data.detection_utils.read_image", return_value=image):
        assert np.array_equal(test_mapper({"file_name": "x.png", "label": 0})["image"].permute(1, 2, 0).numpy(), image)


def test_negative_padding_is_a_config_error():
    cfg = _recipe("softmax_R32_200ep.yaml")
    cfg.INPUT.EQLOSSES.CLASSIFICATION.TRAIN_PAD = -1
    with pytest.raises(ConfigError, match=r"^INPUT.EQLOSSES.CLASSIFICATION.TRAIN_PAD must be >= 0, got -1$"):
        validate_config(cfg)


def test_two_iterations_of_the_recipe_on_a_tiny_fake_cifar(tmp_path, monkeypatch):
    """torchvision-format CIFAR-100 pickles with 2 training images per class (the long-tailed
    subset keeps min(2, n_c) = 2 of each) and 1 test image per class, trained 2 iterations by
    train_net with the recipe, then evaluated."""
    import train_net

    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name, per_class in (("train", 2), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels}, f)
    cls_datasets.cifar_images.cache_clear()
    prefix = f"pytest_cifar100_lt_{tmp_path.name}"
    train, test = cls_datasets.register_cifar_lt(prefix, "cifar100", 100, str(tmp_path))
    out = tmp_path / "run"
    argv = ["--config-file", os.path.join(CIFAR_DIR, "softmax_eql_R32_200ep.yaml"),
            "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)", "MODEL.DEVICE", "cpu",
            "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
            "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", str(out)]
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    results = train_net.main(args)
    assert 0.0 <= results["classification"]["top1"] <= 100.0
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 1
    assert state["model"]["class_stats.image_count"].tolist() == [2] * 100
    assert state["model"]["loss.pos_grad"].sum() > 0  # Softmax-EQL's statistics moved
    assert "backbone.res4.4.conv2.weight" in state["model"]
