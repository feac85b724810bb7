"""Difficulty-Net (Sinha & Ohashi, WACV 2023) as its authors' code computes it: three training
steps against a reference written the authors' way (an ``nn.Module`` MLP, ``torch.optim.Adam``,
their pseudo-model step and meta-set loss with the batch weights copied by ``torch.tensor``),
which also shows that their meta-set term gives the MLP no gradient; the loss value and gradient
in float64; the state-dict round trip; the configs; a train_net run (measured before training,
then every UPDATE_PERIOD; an exact --resume)."""
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import train_net
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.data import TINY_CLS_SPEC, register_synthetic_classification
from eqlosses_d2.classification.difficulty import build_classification_hooks, class_accuracy_counts
from eqlosses_d2.classification.losses.difficulty_net import DifficultyNetCE
from eqlosses_d2.config import merge_config_file, validate_config

C, H = 5, 8


class _Counts:
    def __init__(self, counts):
        self.image_count = counts


class _AuthorsMLP(nn.Module):
    """Their ``Difficulty_Net``: Linear, ReLU, Linear, ReLU, Linear, sigmoid."""

    def __init__(self):
        super().__init__()
        self.linear1, self.linear2, self.linear3 = nn.Linear(C, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):
        return torch.sigmoid(self.linear3(F.relu(self.linear2(F.relu(self.linear1(x))))))


def _authors_step(mlp, optimizer, pseudo, accs, logits, labels, meta_x, meta_y, balanced_log_counts, lam=0.3):
    """One iteration of their train(): pseudo step with detached weights, meta loss + λ driver, Adam,
    then the weighted loss of the main model. Returns (weights, loss, MLP grads)."""
    class_weights = mlp(accs[None])
    driver = F.mse_loss(class_weights, (1 - accs / (accs.sum() + 1e-12))[None])
    class_weights = class_weights[0] / class_weights[0].sum() * C
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = torch.tensor(class_weights).float()  # their compute_batch_weights: copies and detaches
    pseudo_opt = torch.optim.SGD(pseudo.parameters(), lr=0.1)
    pseudo_loss = torch.mean(weights[labels] * F.cross_entropy(pseudo(meta_x[: len(labels)]), labels, reduction="none"))
    pseudo_opt.zero_grad()
    pseudo_loss.backward()
    pseudo_opt.step()
    optimizer.zero_grad()
    meta_loss = F.cross_entropy(pseudo(meta_x), meta_y) + lam * driver
    meta_loss.backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    optimizer.step()
    with torch.no_grad():
        class_weights = mlp(accs[None])[0]
    class_weights = class_weights / class_weights.sum() * C
    z = logits + balanced_log_counts
    loss = torch.mean(class_weights[labels] * F.cross_entropy(z, labels, reduction="none"))
    return class_weights, loss, grads


@pytest.mark.parametrize("balanced", [False, True])
def test_three_steps_match_the_authors_code(balanced):
    counts = torch.tensor([50.0, 20.0, 8.0, 3.0, 1.0])
    loss = DifficultyNetCE(C, class_stats=_Counts(counts), hidden=H, balanced_softmax=balanced, init_seed=3).train()
    mlp = _AuthorsMLP()
    with torch.no_grad():  # the same initial MLP
        for mine, theirs in zip(("fc1", "fc2", "fc3"), (mlp.linear1, mlp.linear2, mlp.linear3)):
            theirs.weight.copy_(getattr(loss, f"{mine}_weight"))
            theirs.bias.copy_(getattr(loss, f"{mine}_bias"))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4, foreach=False)
    torch.manual_seed(0)
    pseudo = nn.Linear(3, C)
    meta_x, meta_y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 0])
    log_counts = counts.log() if balanced else torch.zeros(C)
    accuracies = [torch.zeros(C), torch.tensor([0.9, 0.6, 0.3, 0.1, 0.0]), torch.tensor([0.8, 0.7, 0.5, 0.25, 0.05])]
    for step, accs in enumerate(accuracies):
        loss.update_class_accuracy(accs * 20, torch.full((C,), 20.0))
        logits = torch.randn(4, C)
        labels = torch.tensor([0, 2, 4, step % C])
        weights, expected, grads = _authors_step(mlp, optimizer, pseudo, accs, logits, labels, meta_x, meta_y, log_counts)
        assert any(g.abs().sum() > 0 for g in grads)
        x = logits.clone().requires_grad_()
        out = loss(x, labels)["loss_cls"]
        assert int(loss.adam_step) == step + 1
        assert torch.allclose(loss.class_weights.float(), weights, rtol=1e-5, atol=1e-6), step
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), step
        for mine, theirs in zip(("fc1", "fc2", "fc3"), (mlp.linear1, mlp.linear2, mlp.linear3)):
            assert torch.allclose(getattr(loss, f"{mine}_weight"), theirs.weight, rtol=1e-5, atol=1e-7)
            assert torch.allclose(getattr(loss, f"{mine}_bias"), theirs.bias, rtol=1e-5, atol=1e-7)
    # three steps moved the MLP toward 1 − a/Σa: the weights are not uniform
    assert float(loss.class_weights.max() - loss.class_weights.min()) > 1e-4


def test_meta_term_gives_the_mlp_no_gradient():
    """Their meta_loss = CE(pseudo model on the meta set) + λ·driver: the CE part alone has no
    path to the MLP (the pseudo step used detached weights)."""
    mlp = _AuthorsMLP()
    accs = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.0])
    class_weights = mlp(accs[None])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = torch.tensor(class_weights / class_weights.sum() * C).float()
    pseudo = nn.Linear(3, C)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    torch.mean(weights[y] * F.cross_entropy(pseudo(x), y, reduction="none")).backward()
    with torch.no_grad():
        for p in pseudo.parameters():
            p -= 0.1 * p.grad
    meta = F.cross_entropy(pseudo(x), y)
    grads = torch.autograd.grad(meta, list(mlp.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


def test_loss_value_and_gradient_against_float64_reference():
    loss = DifficultyNetCE(4, hidden=H, init_seed=1).eval()  # eval: no MLP step, the stored weights
    loss.class_weights.copy_(torch.tensor([0.5, 1.5, 1.25, 0.75], dtype=torch.float64))
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 4)) * 2.0
    y = [0, 1, 3, 2, 1]
    w = [0.5, 1.5, 1.25, 0.75]
    value, grad = 0.0, np.zeros_like(z)
    for i, t in enumerate(y):
        log_norm = math.log(sum(math.exp(v) for v in z[i]))
        value += w[t] * (log_norm - z[i][t]) / len(y)
        for j in range(4):
            grad[i, j] = w[t] * (math.exp(z[i][j] - log_norm) - (j == t)) / len(y)
    x = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    out = loss(x, torch.tensor(y))["loss_cls"]
    out.backward()
    assert float(out.detach()) == pytest.approx(value, rel=1e-6)
    assert np.allclose(x.grad.numpy(), grad, atol=1e-6)


def test_state_dict_round_trip_and_unseen_classes():
    loss = DifficultyNetCE(3, hidden=4).train()
    loss.update_class_accuracy(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([4.0, 4.0, 0.0]))
    assert loss.accuracy.tolist() == [0.5, 0.25, 0.0]
    loss.update_class_accuracy(torch.tensor([0.0, 3.0, 1.0]), torch.tensor([0.0, 4.0, 2.0]))
    assert loss.accuracy.tolist() == [0.5, 0.75, 0.5]  # class 0 unseen: kept
    loss(torch.randn(2, 3), torch.tensor([0, 1]))
    state = loss.state_dict()
    assert int(state["adam_step"]) == 1 and state["accuracy"].dtype == state["class_weights"].dtype == torch.float64
    fresh = DifficultyNetCE(3, hidden=4, init_seed=5).train()
    fresh.load_state_dict(state)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    a, b = loss(logits, labels)["loss_cls"], fresh(logits, labels)["loss_cls"]
    assert torch.equal(a, b) and torch.equal(loss.class_weights, fresh.class_weights)
    with pytest.raises(ValueError, match="DIFFICULTY_NET.DRIVER_LOSS_WEIGHT must be > 0"):
        DifficultyNetCE(3, driver_loss_weight=0.0)


def _cfg(config_file):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("config_file, period, dataset", [
    ("configs/quickstart/difficulty_net_R18_synthetic_cls.yaml", 32, "synthetic_cls_lt_val"),
    ("configs/ImageNet-LT/difficulty_net_R50_180ep.yaml", 453, "imagenet_lt_val"),
])
def test_configs_build_with_their_hook(config_file, period, dataset):
    cfg = _cfg(config_file)
    validate_config(cfg)
    model = build_model(cfg)
    assert isinstance(model.loss, DifficultyNetCE) and model.loss.balanced_softmax and model.loss.hidden == 1024
    assert model.loss.driver_loss_weight == 0.3 and model.loss.lr == 1e-3 and model.loss.weight_decay == 1e-4
    # the MLP is buffers: Detectron2's optimizer and DDP see no new parameter
    assert not any(name.startswith("loss.") for name, _ in model.named_parameters())
    hooks = build_classification_hooks(cfg)
    assert len(hooks) == 1 and hooks[0]._period == period and hooks[0]._dataset_name == dataset


# -- through train_net ----------------------------------------------------------------------------

CONFIG = "configs/quickstart/difficulty_net_R18_synthetic_cls.yaml"


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_cls_dnet"))
    train, val, test = register_synthetic_classification("pytest_dnet_tiny", TINY_CLS_SPEC, root=root)
    return {"train": train, "val": val, "test": test}


def _opts(data, out):
    return [
        "DATASETS.TRAIN", f"('{data['train']}',)",
        "DATASETS.TEST", "()",
        "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(TINY_CLS_SPEC.num_classes),
        "MODEL.EQLOSSES.CLASSIFICATION.DIFFICULTY_NET.DIFFICULTY_DATASET", data["val"],
        "MODEL.EQLOSSES.CLASSIFICATION.DIFFICULTY_NET.HIDDEN", "16",
        "MODEL.EQLOSSES.CLASSIFICATION.DIFFICULTY_NET.UPDATE_PERIOD", "3",
        "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.MAX_ITER", "5",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "1",
        "OUTPUT_DIR", str(out),
    ]


def _run(argv):
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    return train_net.main(args)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_net_measures_before_training_and_resumes_exactly(tiny_cls, tmp_path):
    # the initial weights, saved: what the measurement before training must see
    cfg = train_net.setup_cfg(train_net.default_argument_parser().parse_args(
        ["--config-file", CONFIG] + _opts(tiny_cls, tmp_path / "x")))
    from eqlosses_d2.classification.data import build_classification_test_loader

    train_net.prepare_datasets(cfg)
    torch.manual_seed(4)
    initial = train_net.Trainer.build_model(cfg)
    torch.save({"model": initial.state_dict()}, tmp_path / "initial.pth")
    correct, count = class_accuracy_counts(initial, build_classification_test_loader(cfg, tiny_cls["val"]),
                                           TINY_CLS_SPEC.num_classes)
    weights = ["MODEL.WEIGHTS", str(tmp_path / "initial.pth")]

    full = tmp_path / "full"
    _run(["--config-file", CONFIG] + _opts(tiny_cls, full) + weights)
    first = _state(full / "model_0000001.pth")  # after 2 steps; measured before training only
    final = _state(full / "model_final.pth")  # measured again after the 3rd step
    assert int(first["loss.adam_step"]) == 2 and int(final["loss.adam_step"]) == 5
    assert count.tolist() == [float(TINY_CLS_SPEC.val_images_per_class)] * TINY_CLS_SPEC.num_classes
    assert correct.sum() > 0 and torch.equal(first["loss.accuracy"], correct / count)  # not the initial zeros
    third = _state(full / "model_0000003.pth")  # the 4th checkpoint position: after the measurement at step 3
    assert int(third["loss.adam_step"]) == 4 and torch.equal(third["loss.accuracy"], final["loss.accuracy"])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000001.pth", resumed / "model_0000001.pth")
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    _run(["--config-file", CONFIG, "--resume"] + _opts(tiny_cls, resumed) + weights)
    again = _state(resumed / "model_final.pth")
    for key in final:
        assert torch.equal(again[key], final[key]), key
