"""Long-tailed image classification (issue 19): heads and losses against hand-derived float64
values (value and gradient), Softmax-EQL against a transcription of its authors' classification
code, the split accuracies on a constructed example, the samplers, the embedded set's profile."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification import build_head, build_image_loss, format_accuracy_table, split_accuracies
from eqlosses_d2.classification.data.samplers import ClassAwareTrainingSampler
from eqlosses_d2.classification.data.synthetic import SyntheticClassificationSpec, train_counts
from eqlosses_d2.config import ConfigError, validate_config
from eqlosses_d2.registry import CLASSIFIER_HEAD_REGISTRY, IMAGE_CLS_LOSS_REGISTRY, names

from classification_helpers import Counts, classification_node


_node = classification_node


def _value_and_grad(loss, logits, labels):
    logits = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    value = loss(logits, torch.tensor(labels))["loss_cls"]
    value.backward()
    return value.item(), logits.grad.double()


def test_registries_hold_the_methods():
    # issue 19's methods (each file adds its name); a subset check, so a new method needs no edit here
    assert {"softmax", "balanced_softmax", "softmax_eql", "sigmoid", "eqlv2", "seesaw", "iif", "bal_bce",
            "cdb_w", "grw"} <= set(names(IMAGE_CLS_LOSS_REGISTRY))
    assert {"linear", "cosine", "tau_norm", "lws", "marc", "tde", "vmf"} <= set(names(CLASSIFIER_HEAD_REGISTRY))


# -- heads -------------------------------------------------------------------------------------


def test_linear_head():
    head = build_head(_node(HEAD="linear"), 2, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        head.fc.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    out = head(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(out, torch.tensor([[3.5, 4.0, -1.5]]))


def test_cosine_head_value_and_gradient():
    head = build_head(_node(**{"HEAD": "cosine", "COSINE.SCALE": 16.0}), 2, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    z = head(x)
    # s · cos: x/|x| = (0.6, 0.8), w/|w| = e1, e2
    assert torch.allclose(z, torch.tensor([[9.6, 12.8]], dtype=torch.float64))
    z[0, 0].backward()
    # ∂(s x̂·ŵ)/∂x = s (I − x̂x̂ᵀ) ŵ / |x| = 16 · (0.64, −0.48) / 5
    assert torch.allclose(x.grad, torch.tensor([[2.048, -1.536]], dtype=torch.float64))


def test_cosine_scale_must_be_positive():
    with pytest.raises(ValueError, match="COSINE.SCALE must be > 0"):
        build_head(_node(**{"HEAD": "cosine", "COSINE.SCALE": 0.0}), 2, 2)


# -- losses ------------------------------------------------------------------------------------


def test_softmax_ce_hand_values():
    loss = build_image_loss(_node(LOSS="softmax"), 3)
    value, grad = _value_and_grad(loss, [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [1, 2])
    e = math.e
    expected = (math.log(e + e * e + 1) - 2 + math.log(3)) / 2
    assert value == pytest.approx(expected, rel=1e-6)
    p0 = torch.tensor([e, e * e, 1.0], dtype=torch.float64) / (e + e * e + 1)
    expected_grad = torch.stack([p0 - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
                                 torch.tensor([1 / 3, 1 / 3, -2 / 3], dtype=torch.float64)]) / 2
    assert torch.allclose(grad, expected_grad, atol=1e-7)


@pytest.mark.parametrize("tau, expected_prob", [(1.0, 0.25), (2.0, 0.1), (0.0, 0.5)])
def test_balanced_softmax_hand_values(tau, expected_prob):
    # counts 3 : 1, prior 0.75 / 0.25; logits 0: p = π^τ / Σ π^τ
    # τ = 1: p_1 = 0.25; τ = 2: 0.0625 / 0.625 = 0.1; τ = 0: uniform (plain CE)
    loss = build_image_loss(_node(**{"LOSS": "balanced_softmax", "BALANCED_SOFTMAX.TAU": tau}), 2,
                            class_stats=Counts([3, 1]))
    value, grad = _value_and_grad(loss, [[0.0, 0.0]], [1])
    assert value == pytest.approx(-math.log(expected_prob), rel=1e-6)
    assert torch.allclose(grad, torch.tensor([[1 - expected_prob, expected_prob - 1]], dtype=torch.float64), atol=1e-7)
    # inference: the plain softmax of the logits
    assert torch.allclose(loss.predict_probs(torch.zeros(1, 2)), torch.tensor([[0.5, 0.5]]))


def test_balanced_softmax_equals_log_count_shift():
    """τ = 1 is Balanced Softmax as its authors write it: CE(z + log n_j)."""
    counts = [50, 20, 5, 1]
    loss = build_image_loss(_node(LOSS="balanced_softmax"), 4, class_stats=Counts(counts))
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    ours = loss(logits, labels)["loss_cls"].double()
    theirs = F.cross_entropy(logits + torch.tensor(counts, dtype=torch.float64).log(), labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_balanced_softmax_needs_counts():
    loss = build_image_loss(_node(LOSS="balanced_softmax"), 2)
    with pytest.raises(RuntimeError, match="needs the training set's per-class image counts"):
        loss(torch.zeros(1, 2), torch.tensor([0]))


def test_softmax_eql_hand_values_two_steps():
    loss = build_image_loss(_node(LOSS="softmax_eql"), 2).train()
    # step 1: no statistics, no margins: plain CE of zeros = log 2
    value, grad = _value_and_grad(loss, [[0.0, 0.0], [0.0, 0.0]], [0, 0])
    assert value == pytest.approx(math.log(2), rel=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.25, 0.25], [-0.25, 0.25]], dtype=torch.float64))
    # |g| = 0.25 everywhere: on the labels (class 0) twice, off the labels (class 1) twice
    assert torch.allclose(loss.pos_grad, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(loss.neg_grad, torch.tensor([0.0, 0.5], dtype=torch.float64))
    # step 2, G = pos_grad clamped at ε = 1e-4: (0.5, 1e-4)
    # row 0 (label 0): z'_1 = log(1e-4 / 0.5) -> CE = log(1 + 2e-4)
    # row 1 (label 1): z'_0 = log(0.5 / 1e-4) -> CE = log(5001)
    value, grad = _value_and_grad(loss, [[0.0, 0.0], [0.0, 0.0]], [0, 1])
    assert value == pytest.approx((math.log(1.0002) + math.log(5001)) / 2, rel=1e-6)
    q = 2e-4 / 1.0002
    expected_grad = torch.tensor([[-q, q], [5000 / 5001, -5000 / 5001]], dtype=torch.float64) / 2
    assert torch.allclose(grad, expected_grad, atol=1e-7)
    assert torch.allclose(loss.pos_grad, torch.tensor([0.5 + q / 2, 2500 / 5001], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(loss.neg_grad, torch.tensor([2500 / 5001, 0.5 + q / 2], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(loss.pos_neg, loss.pos_grad / (loss.neg_grad + 1e-10))


def test_softmax_eql_pos_and_neg_indicator_is_the_authors():
    """'pos_and_neg' reads pos_neg (the ratio) + neg_grad, as the authors' code."""
    loss = build_image_loss(_node(**{"LOSS": "softmax_eql", "SOFTMAX_EQL.INDICATOR": "pos_and_neg"}), 2).train()
    _value_and_grad(loss, [[0.0, 0.0], [0.0, 0.0]], [0, 0])  # pos (0.5, 0), neg (0, 0.5)
    g = loss.accumulated_grad()
    assert torch.allclose(g, torch.tensor([0.5 / 1e-10, 0.5], dtype=torch.float64))
    # label 1: z'_0 = log(5e9 / 0.5) = log 1e10
    value, _ = _value_and_grad(loss, [[0.0, 0.0]], [1])
    assert value == pytest.approx(math.log(1e10 + 1), rel=1e-6)


class AuthorsSoftmaxEQL(torch.nn.Module):
    """A float64 transcription of the authors' ``SoftmaxEQLLoss`` (ModelTC/United-Perception,
    up/tasks/cls/models/losses/cls_loss.py): margins from the indicator, CE, statistics from a
    backward hook on the logits."""

    def __init__(self, num_classes, indicator="pos", loss_weight=1.0, tau=1.0, eps=1e-4):
        super().__init__()
        self.num_classes, self.indicator, self.loss_weight, self.tau, self.eps = num_classes, indicator, loss_weight, tau, eps
        self.pos_grad = torch.zeros(num_classes, dtype=torch.float64)
        self.neg_grad = torch.zeros(num_classes, dtype=torch.float64)
        self.pos_neg = torch.ones(num_classes, dtype=torch.float64)

    def forward(self, logits, label):
        g = {"pos": self.pos_grad, "neg": self.neg_grad}.get(self.indicator)
        if g is None:
            g = self.pos_neg + self.neg_grad
        one_hot = F.one_hot(label, self.num_classes).double()
        self.targets = one_hot
        matrix = g[None, :].clamp(min=self.eps) / g[:, None].clamp(min=self.eps)
        factor = matrix[label, :].pow(self.tau)
        logits.register_hook(self.collect_grad)
        return F.cross_entropy(logits + factor.log() * (1 - one_hot), label) * self.loss_weight

    def collect_grad(self, grad):
        grad = grad.abs()
        self.pos_grad += (grad * self.targets).sum(0)
        self.neg_grad += (grad * (1 - self.targets)).sum(0)
        self.pos_neg = self.pos_grad / (self.neg_grad + 1e-10)


@pytest.mark.parametrize("indicator", ["pos", "neg", "pos_and_neg"])
def test_softmax_eql_matches_the_authors_code(indicator):
    num_classes = 5
    ours = build_image_loss(_node(**{"LOSS": "softmax_eql", "SOFTMAX_EQL.INDICATOR": indicator,
                                     "SOFTMAX_EQL.TAU": 0.7, "SOFTMAX_EQL.LOSS_WEIGHT": 1.5}), num_classes).train()
    theirs = AuthorsSoftmaxEQL(num_classes, indicator=indicator, loss_weight=1.5, tau=0.7)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        logits = torch.randn(16, num_classes, generator=gen, dtype=torch.float64) * 2
        labels = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 0.5]), 16, replacement=True, generator=gen)
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        value_ours = ours(a.float(), labels)["loss_cls"]
        value_ours.backward()
        value_theirs = theirs(b, labels)
        value_theirs.backward()
        assert value_ours.item() == pytest.approx(value_theirs.item(), rel=1e-5), step
        assert torch.allclose(a.grad, b.grad, atol=1e-6), step
        for name in ("pos_grad", "neg_grad"):
            assert torch.allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-7), (step, name)


def test_softmax_eql_loss_is_exact_where_the_label_probability_underflows():
    """The loss comes from the row maximum and the largest probability, not log p_y: a label
    logit 200 below the others (p_y = e^-200, 0 in float32) still gives CE = 200 + log 2."""
    loss = build_image_loss(_node(LOSS="softmax_eql"), 3).train()
    value, grad = _value_and_grad(loss, [[0.0, 200.0, 200.0], [3.0, -1.0, 0.5]], [0, 0])
    lse = math.log(math.exp(3.0) + math.exp(-1.0) + math.exp(0.5))
    assert value == pytest.approx((200.0 + math.log(2.0) + (lse - 3.0)) / 2, rel=1e-6)
    p = [math.exp(-1.0 - lse), math.exp(0.5 - lse)]
    expected = torch.tensor([[-1.0, 0.5, 0.5], [-(p[0] + p[1]), p[0], p[1]]], dtype=torch.float64) / 2
    assert torch.allclose(grad, expected, atol=1e-7)


def test_softmax_eql_keeps_state_in_eval_mode():
    loss = build_image_loss(_node(LOSS="softmax_eql"), 3).eval()
    loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert not loss.pos_grad.any() and not loss.neg_grad.any()


def test_unknown_names_and_bad_values_are_one_line():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "LongTailImageClassifier"
    cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS = "nope"
    with pytest.raises(ConfigError, match=r"MODEL.EQLOSSES.CLASSIFICATION.LOSS: unknown loss 'nope' \(known: .*balanced_softmax, .*softmax_eql"):
        validate_config(cfg)
    cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS = "softmax_eql"
    cfg.MODEL.EQLOSSES.CLASSIFICATION.SOFTMAX_EQL.INDICATOR = "both"
    with pytest.raises(ConfigError, match="MODEL.EQLOSSES.CLASSIFICATION.SOFTMAX_EQL.INDICATOR must be one of"):
        validate_config(cfg)
    cfg.MODEL.EQLOSSES.CLASSIFICATION.SOFTMAX_EQL.INDICATOR = "pos"
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    with pytest.raises(ConfigError, match="DATALOADER.SAMPLER_TRAIN: unknown 'RepeatFactorTrainingSampler' for classification"):
        validate_config(cfg)


@pytest.mark.parametrize("num_head", [1, 2, 3, 5, 8])
def test_config_check_takes_every_head_count_that_divides_a_real_feature_size(num_head):
    """The check builds the head on a toy size: TDE's NUM_HEAD must divide its features (2048 for
    ResNet-50, 512 for ResNet-18), and a toy size of 4 refused 3 or 8."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "LongTailImageClassifier"
    cfg.MODEL.EQLOSSES.CLASSIFICATION.HEAD = "tde"
    cfg.MODEL.EQLOSSES.CLASSIFICATION.TDE.NUM_HEAD = num_head
    validate_config(cfg)


# -- evaluation --------------------------------------------------------------------------------


def test_split_accuracies_constructed_example():
    # classes: 0 many (150 training images), 1 medium (100), 2 medium (20), 3 few (19), 4 few (0),
    # 5 few (2, no test image)
    counts = [150, 100, 20, 19, 0, 2]
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
    top = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [1, 2, 3, 4, 5],  # class 0: 2 / 4 top-1, 3 / 4 top-5
           [1, 0, 2, 3, 4], [0, 2, 3, 4, 5],  # class 1: 1 / 2 top-1, 1 / 2 top-5
           [2, 0, 1, 3, 4], [2, 0, 1, 3, 4],  # class 2: 2 / 2, 2 / 2
           [0, 1, 2, 4, 3], [4, 0, 1, 2, 3],  # class 3: 0 / 2, 2 / 2
           [4, 0, 1, 2, 3]]  # class 4: 1 / 1, 1 / 1
    metrics, per_class = split_accuracies(labels, top, counts)
    assert metrics["top1"] == pytest.approx(100 * 6 / 11)
    assert metrics["top5"] == pytest.approx(100 * 9 / 11)
    assert metrics["many"] == pytest.approx(50.0)
    assert metrics["medium"] == pytest.approx(75.0)  # 3 of the 4 images of classes 1 and 2
    assert metrics["few"] == pytest.approx(100 / 3)  # 1 of the 3 images of classes 3, 4 (and 5: none)
    assert np.allclose(per_class[:5], [50.0, 50.0, 100.0, 0.0, 100.0]) and math.isnan(per_class[5])
    table = format_accuracy_table({"classification": metrics}, "toy")
    assert table.splitlines()[2] == "| toy | 54.55 | 81.82 | 50.00 | 75.00 | 33.33 |"


def test_split_without_test_images_is_nan():
    metrics, per_class = split_accuracies([0, 0], [[0], [1]], [500, 3])
    assert metrics["many"] == 50.0 and math.isnan(metrics["few"]) and "top5" not in metrics
    assert math.isnan(per_class[1])


# -- data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["exponential", "pareto"])
def test_train_profile_ends(profile):
    spec = SyntheticClassificationSpec(num_classes=10, max_images_per_class=500, imbalance_ratio=50.0, profile=profile)
    counts = train_counts(spec)
    assert counts[0] == 500 and counts[-1] == 10
    assert (np.diff(counts) <= 0).all()
    if profile == "exponential":  # n_i = 500 · 50^(−i/9)
        assert counts[3] == round(500 * 50 ** (-3 / 9))
    else:  # n_i = 500 · (i + 1)^(−log 50 / log 10)
        assert counts[1] == round(500 * 2 ** (-math.log(50) / math.log(10)))


def test_spec_errors_are_one_line():
    with pytest.raises(ValueError, match=r"imbalance_ratio must be in \[1, max_images_per_class=10\]"):
        SyntheticClassificationSpec(max_images_per_class=10, imbalance_ratio=20.0)


@pytest.mark.parametrize("power, expected", [(0.0, [1 / 3] * 3), (0.5, np.sqrt([100, 25, 4]) / np.sqrt([100, 25, 4]).sum())])
def test_class_aware_sampler_class_frequencies(power, expected):
    labels = [0] * 100 + [1] * 25 + [2] * 4
    sampler = ClassAwareTrainingSampler(labels, power, seed=0)
    draws = np.array(labels)[np.fromiter(iter(sampler), dtype=np.int64, count=60000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, expected, atol=0.01)


# -- configs -----------------------------------------------------------------------------------

import glob  # noqa: E402
import os  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from eqlosses_d2.config import merge_config_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _classification_configs():
    out = []
    for f in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        if os.path.basename(f).startswith("Base-"):
            continue
        cfg = get_cfg()
        add_eqlosses_config(cfg)
        merge_config_file(cfg, f)
        if cfg.MODEL.META_ARCHITECTURE == "LongTailImageClassifier":
            out.append(f)
    return out


def test_there_are_classification_configs():
    names = [os.path.basename(f) for f in _classification_configs()]
    assert {"softmax_R18_synthetic_cls.yaml", "balanced_softmax_R18_synthetic_cls.yaml",
            "softmax_eql_R18_synthetic_cls.yaml"} <= set(names)


@pytest.mark.parametrize("config_file", _classification_configs(), ids=os.path.basename)
def test_classification_config_builds_and_runs(config_file):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg)
    model = build_model(cfg)
    num_classes = cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES
    assert model.class_stats.num_classes == num_classes and "class_stats.image_count" in model.state_dict()
    model.class_stats.image_count.copy_(torch.arange(1, num_classes + 1))
    model.class_stats.is_set.fill_(True)
    images = [{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), "label": i % num_classes} for i in range(4)]
    model.train()
    losses = model(images)
    # a head with its own training step (vmf) adds its losses (loss_icd) to the loss's
    assert "loss_cls" in losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 4 and out[0]["scores"].shape == (num_classes,)
    scores = torch.stack([o["scores"] for o in out])
    # softmax-family scores are a distribution; sigmoid heads (sigmoid, eqlv2, bal_bce) score each class alone
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()


# -- registration of the real benchmarks ---------------------------------------------------------

from detectron2.data import DatasetCatalog  # noqa: E402

from eqlosses_d2.classification.data import datasets as cls_datasets  # noqa: E402
from eqlosses_d2.classification.data import ClassificationDatasetMapper  # noqa: E402
from eqlosses_d2.data import DatasetError  # noqa: E402


def test_cifar_lt_counts_are_the_standard_profile():
    counts = cls_datasets.cifar_lt_counts(10, 5000, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406  # CIFAR-10-LT, imbalance 100, as the literature reports
    assert sum(cls_datasets.cifar_lt_counts(100, 500, 100)) == 10847  # CIFAR-100-LT


def test_list_dataset_missing_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    train, _, _ = cls_datasets.register_list_classification("pytest_lt_missing", str(tmp_path / "nope"), "X_{split}.txt")
    with pytest.raises(DatasetError) as e:
        cls_datasets.prepare_classification_dataset(train)
    assert "\n" not in str(e.value) and "split list" in str(e.value) and "X_train.txt not found" in str(e.value)


def test_list_dataset_records_and_counts(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imagenet_lt"
    (root / "train" / "a").mkdir(parents=True)
    lines = []
    for i, label in enumerate([0, 0, 0, 1, 2, 2]):
        Image.new("RGB", (40, 30), (i * 30, 0, 0)).save(root / "train" / "a" / f"{i}.png")
        lines.append(f"train/a/{i}.png {label}")
    for split in ("train", "val", "test"):
        (root / f"LT_{split}.txt").write_text("\n".join(lines) + "\n")
    train, val, _ = cls_datasets.register_list_classification("pytest_lt_list", str(root), "LT_{split}.txt")
    meta = cls_datasets.prepare_classification_dataset(train)
    assert meta.class_statistics.image_count.tolist() == [3, 1, 2]
    records = DatasetCatalog.get(train)
    assert [r["label"] for r in records] == [0, 0, 0, 1, 2, 2]
    assert records[3]["file_name"] == str(root) + "/train/a/3.png"
    (root / "LT_val.txt").write_text("train/a/0.png x\n")
    with pytest.raises(DatasetError, match=r"LT_val.txt line 1: expected '<path> <label>'"):
        cls_datasets.prepare_classification_dataset(val)


def test_cifar_lt_from_pickled_files(tmp_path, monkeypatch):
    """A small stand-in for torchvision's CIFAR files: the long-tailed subset and the images."""
    import pickle

    monkeypatch.setenv("EQLOSSES_D2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cls_datasets.CIFAR, "fake", ("fake-cifar", ["train_a", "train_b"], ["test"], b"labels", 3, 8))
    directory = tmp_path / "fake-cifar"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name, per_class in (("train_a", 4), ("train_b", 4), ("test", 2)):
        labels = [c for c in range(3) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    cls_datasets.cifar_images.cache_clear()
    train, test = cls_datasets.register_cifar_lt("pytest_fake_lt", "fake", 4.0, str(tmp_path))
    meta = cls_datasets.prepare_classification_dataset(train)
    assert meta.class_statistics.image_count.tolist() == cls_datasets.cifar_lt_counts(3, 8, 4.0) == [8, 4, 2]
    assert cls_datasets.prepare_classification_dataset(test).class_statistics.image_count.tolist() == [2, 2, 2]
    record = DatasetCatalog.get(train)[-1]
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.INPUT.EQLOSSES.CLASSIFICATION.TEST_SHORT_EDGE = 32
    cfg.INPUT.EQLOSSES.CLASSIFICATION.TEST_CROP = 32
    cfg.INPUT.FORMAT = "RGB"
    mapped = ClassificationDatasetMapper(cfg, is_train=False)(record)
    file_name = os.path.basename(record["array_file"])
    with open(directory / file_name, "rb") as f:
        raw = pickle.load(f)[b"data"][record["array_index"]]
    assert torch.equal(mapped["image"], torch.as_tensor(raw.reshape(3, 32, 32)))
    assert mapped["label"] == record["label"]
