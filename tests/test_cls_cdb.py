"""CDB-W (class-wise difficulty-balanced CE, Sinha et al. ACCV 2020): the weights from given
difficulties against a float64 hand formula (dynamic and fixed τ), the loss value and gradient
against a float64 reference, the difficulty hook on a tiny model and a constructed dataset, the
state-dict round trip, the configs, and train_net runs with the hook (the measurement saved with
the weights it was measured on, an exact --resume)."""
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import train_net
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.data import TINY_CLS_SPEC, register_synthetic_classification
from eqlosses_d2.classification.difficulty import ClassDifficultyHook, build_classification_hooks, class_accuracy_counts
from eqlosses_d2.classification.losses import build_image_loss
from eqlosses_d2.classification.losses.cdb import ClassDifficultyBalancedCE
from eqlosses_d2.config import ConfigError, merge_config_file, validate_config


def hand_tau(d):
    bias = (1.0 - min(d)) / (1.0 - max(d) + 0.01) - 1.0
    return 2.0 / (1.0 + math.exp(-bias))


def hand_weights(d, tau):
    powered = [x ** tau for x in d]
    return [len(d) * p / sum(powered) for p in powered]


def test_initial_state_is_uniform_plain_ce():
    loss = ClassDifficultyBalancedCE(5)
    assert loss.difficulty.dtype == loss.class_weights.dtype == loss.tau.dtype == torch.float64
    assert loss.class_weights.tolist() == [1.0] * 5
    assert float(loss.tau) == pytest.approx(2.0 / (1.0 + math.exp(1.0)))  # d = ones: b = -1
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 0])
    assert torch.allclose(loss(logits, labels)["loss_cls"], nn.functional.cross_entropy(logits, labels))


def test_weights_from_difficulties_dynamic_and_fixed_tau():
    count = torch.tensor([20.0, 20.0, 20.0, 20.0, 0.0])
    correct = torch.tensor([2.0, 10.0, 16.0, 19.0, 0.0])
    dynamic = ClassDifficultyBalancedCE(5)
    dynamic.update_class_accuracy(correct, count)
    d = [0.9, 0.5, 0.2, 0.05, 1.0]  # the unseen class keeps its initial difficulty 1
    assert dynamic.difficulty.tolist() == pytest.approx(d, abs=1e-15)
    tau = hand_tau(d)  # b = (1 - 0.05) / (1 - 1 + 0.01) - 1 = 94: τ = 2 · sigmoid(94) ≈ 2
    assert float(dynamic.tau) == pytest.approx(tau, rel=1e-14)
    assert dynamic.class_weights.tolist() == pytest.approx(hand_weights(d, tau), rel=1e-12)

    # τ in the middle of its range: difficulties without a class at 1
    count = torch.full((4,), 10.0)
    correct = torch.tensor([3.0, 6.0, 8.0, 9.0])
    dynamic = ClassDifficultyBalancedCE(4)
    dynamic.update_class_accuracy(correct, count)
    d = [0.7, 0.4, 0.2, 0.1]
    tau = hand_tau(d)
    assert 1.5 < tau < 2.0 and float(dynamic.tau) == pytest.approx(tau, rel=1e-14)
    assert dynamic.class_weights.tolist() == pytest.approx(hand_weights(d, tau), rel=1e-12)
    assert float(dynamic.class_weights.sum()) == pytest.approx(4.0, rel=1e-14)

    fixed = ClassDifficultyBalancedCE(4, dynamic_tau=False, tau=1.5)
    fixed.update_class_accuracy(correct, count)
    assert float(fixed.tau) == 1.5
    assert fixed.class_weights.tolist() == pytest.approx(hand_weights(d, 1.5), rel=1e-12)

    # a second measurement replaces the first; a class without images keeps the last value
    fixed.update_class_accuracy(torch.tensor([5.0, 0.0, 1.0, 0.0]), torch.tensor([10.0, 0.0, 4.0, 2.0]))
    d = [0.5, 0.4, 0.75, 1.0]
    assert fixed.difficulty.tolist() == pytest.approx(d, abs=1e-15)
    assert fixed.class_weights.tolist() == pytest.approx(hand_weights(d, 1.5), rel=1e-12)

    # every class right: uniform weights (the authors' code: 0/0)
    fixed.update_class_accuracy(torch.full((4,), 3.0), torch.full((4,), 3.0))
    assert fixed.difficulty.tolist() == [0.0] * 4 and fixed.class_weights.tolist() == [1.0] * 4


def test_loss_value_and_gradient_against_float64_reference():
    loss = ClassDifficultyBalancedCE(4, dynamic_tau=False, tau=2.0)
    loss.update_class_accuracy(torch.tensor([1.0, 3.0, 6.0, 10.0]), torch.tensor([10.0, 10.0, 10.0, 10.0]))
    w = hand_weights([0.9, 0.7, 0.4, 0.0], 2.0)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 4)) * 2.0
    y = [0, 1, 3, 2, 1, 3]
    # reference: Σ_i w_y CE_i / Σ_i w_y and its gradient w_y (p − onehot) / Σ w_y, float64 loops
    total_w = sum(w[t] for t in y)
    value, grad = 0.0, np.zeros_like(z)
    for i, t in enumerate(y):
        m = max(z[i])
        log_norm = m + math.log(sum(math.exp(v - m) for v in z[i]))
        value += w[t] * (log_norm - z[i][t]) / total_w
        for j in range(4):
            grad[i, j] = w[t] * (math.exp(z[i][j] - log_norm) - (1.0 if j == t else 0.0)) / total_w
    logits = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    out = loss(logits, torch.tensor(y))["loss_cls"]
    out.backward()
    assert out.dtype == torch.float32 and float(out.detach()) == pytest.approx(value, rel=1e-6)
    assert np.allclose(logits.grad.numpy(), grad, atol=1e-6)
    # a class of weight 0 (difficulty 0) contributes nothing; a batch of only such labels gives 0, not NaN
    zero = loss(torch.tensor(z[:2], dtype=torch.float32, requires_grad=True), torch.tensor([3, 3]))["loss_cls"]
    assert float(zero.detach()) == 0.0


def test_state_dict_round_trip():
    loss = ClassDifficultyBalancedCE(3)
    loss.update_class_accuracy(torch.tensor([1.0, 4.0, 2.0]), torch.tensor([5.0, 5.0, 4.0]))
    state = loss.state_dict()
    assert set(state) == {"difficulty", "class_weights", "tau"}
    assert all(v.dtype == torch.float64 for v in state.values())
    fresh = ClassDifficultyBalancedCE(3)
    assert not torch.equal(fresh.class_weights, loss.class_weights)
    fresh.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.state_dict()[key], state[key])
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    assert torch.equal(fresh(logits, labels)["loss_cls"], loss(logits, labels)["loss_cls"])


def test_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match="CDB.UPDATE_PERIOD must be >= 1"):
        ClassDifficultyBalancedCE(3, update_period=0)
    with pytest.raises(ValueError, match="CDB.TAU must be >= 0"):
        ClassDifficultyBalancedCE(3, tau=-1.0)
    cfg = _cfg("configs/quickstart/cdb_w_R18_synthetic_cls.yaml")
    cfg.MODEL.EQLOSSES.CLASSIFICATION.CDB.DIFFICULTY_DATASET = "no_such_split"
    with pytest.raises(ConfigError, match="DIFFICULTY_DATASET: dataset 'no_such_split' is not registered"):
        validate_config(cfg)
    cfg.MODEL.EQLOSSES.CLASSIFICATION.CDB.DIFFICULTY_DATASET = ""
    cfg.DATASETS.TRAIN = ("synthetic_cls_lt_test",)
    with pytest.raises(ConfigError, match="does not end in _train"):
        validate_config(cfg)


class _TinyClassifier(nn.Module):
    """records {"x": (2,), "label"} -> linear scores; remembers the mode of each call."""

    def __init__(self, loss):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.norm = nn.BatchNorm1d(2)
        self.loss = loss
        self.modes = []

    def forward(self, batch):
        self.modes.append(self.training)
        x = torch.stack([r["x"] for r in batch])
        return [{"scores": s} for s in torch.softmax(self.fc(self.norm(x)), dim=1)]


def test_hook_sets_the_hand_computed_class_accuracies():
    torch.manual_seed(0)
    loss = ClassDifficultyBalancedCE(3, dynamic_tau=False, tau=1.0)
    model = _TinyClassifier(loss)
    model.norm.running_mean.copy_(torch.tensor([0.5, -0.5]))
    model.norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    model.train()
    xs = torch.randn(11, 2)
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    records = [{"x": x, "label": t} for x, t in zip(xs, labels)]
    batches = [records[:4], records[4:8], [], records[8:]]
    # hand: eval-mode BatchNorm (running statistics), then the linear layer, argmax
    W, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    mean, var = np.array([0.5, -0.5]), np.array([4.0, 0.25])
    hits = np.zeros(3)
    for x, t in zip(xs.double().numpy(), labels):
        pred = int(np.argmax(W @ ((x - mean) / np.sqrt(var + 1e-5)) + b))
        hits[t] += pred == t
    accuracy = hits / np.array([4.0, 3.0, 4.0])
    assert 0 < hits.sum() < 11  # neither all right nor all wrong: the test can fail

    hook = ClassDifficultyHook(cfg=None, period=3, dataset_name="constructed")
    # a torch DataLoader, as the test loader: each pass draws its base seed from the CPU generator
    hook._loader = torch.utils.data.DataLoader(records, batch_size=4, collate_fn=list)
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(model=model, iter=0, max_iter=10, storage=storage)
        for it in (0, 1, 3, 9):  # next iterations 1, 2, 4, 10: no measurement (10 is the last)
            hook.trainer.iter = it
            hook.after_step()
        assert model.modes == [] and loss.difficulty.tolist() == [1.0, 1.0, 1.0]
        hook.trainer.iter = 2  # next iteration 3
        hook.after_step()
        assert storage.latest()["cdb/tau"][0] == 1.0
    assert model.modes == [False, False, False] and model.training and model.norm.training
    assert torch.equal(model.norm.running_mean, torch.tensor([0.5, -0.5]))  # eval mode: untouched
    assert loss.difficulty.tolist() == pytest.approx((1.0 - accuracy).tolist(), abs=1e-15)
    assert loss.class_weights.tolist() == pytest.approx(hand_weights((1.0 - accuracy).tolist(), 1.0), rel=1e-12)
    # the measurement leaves the CPU random stream as it was
    assert torch.equal(torch.get_rng_state(), rng_before)

    correct, count = class_accuracy_counts(model, batches, 3)
    assert count.tolist() == [4.0, 3.0, 4.0] and correct.tolist() == hits.tolist()


def _cfg(config_file):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("config_file, tau, period, dataset", [
    ("configs/quickstart/cdb_w_R18_synthetic_cls.yaml", "dynamic", 32, "synthetic_cls_lt_val"),
    ("configs/ImageNet-LT/cdb_w_R50_90ep.yaml", 1.0, 453, "imagenet_lt_val"),
])
def test_configs_build_with_their_hook(config_file, tau, period, dataset):
    cfg = _cfg(config_file)
    validate_config(cfg)
    model = build_model(cfg)
    assert isinstance(model.loss, ClassDifficultyBalancedCE)
    assert (model.loss.dynamic_tau and tau == "dynamic") or (not model.loss.dynamic_tau and model.loss.fixed_tau == tau)
    assert model.loss.difficulty.shape == (cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES,)
    hooks = build_classification_hooks(cfg)
    assert len(hooks) == 1 and hooks[0]._period == period and hooks[0]._dataset_name == dataset
    cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS = "softmax"
    assert build_classification_hooks(cfg) == []
    assert isinstance(build_image_loss(cfg.MODEL.EQLOSSES.CLASSIFICATION, 3), nn.Module)


# -- through train_net ----------------------------------------------------------------------------

CONFIG = "configs/quickstart/cdb_w_R18_synthetic_cls.yaml"


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_cls_cdb"))
    train, val, test = register_synthetic_classification("pytest_cdb_tiny", TINY_CLS_SPEC, root=root)
    return {"train": train, "val": val, "test": test}


def _opts(data, out, max_iter, **extra):
    opts = [
        "DATASETS.TRAIN", f"('{data['train']}',)",
        "DATASETS.TEST", "()",
        "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(TINY_CLS_SPEC.num_classes),
        "MODEL.EQLOSSES.CLASSIFICATION.CDB.DIFFICULTY_DATASET", "",  # the _val split of DATASETS.TRAIN
        "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.WARMUP_ITERS", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "1",
        "OUTPUT_DIR", str(out),
    ]
    for key, value in extra.items():
        opts += [key, value]
    return opts


def _run(argv):
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    return train_net.main(args)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_net_measures_with_the_checkpointed_weights_and_resumes_exactly(tiny_cls, tmp_path):
    def opts(out):
        return _opts(tiny_cls, out, max_iter=6, **{"SOLVER.CHECKPOINT_PERIOD": "3",
                                                  "MODEL.EQLOSSES.CLASSIFICATION.CDB.UPDATE_PERIOD": "3"})

    full = tmp_path / "full"
    _run(["--config-file", CONFIG] + opts(full))
    mid = _state(full / "model_0000002.pth")["model"]
    final = _state(full / "model_final.pth")["model"]
    # measured once, after iteration index 2 (the 3rd), before that iteration's checkpoint; not after the last
    assert not torch.equal(mid["loss.difficulty"], torch.ones(TINY_CLS_SPEC.num_classes, dtype=torch.float64))
    assert torch.equal(final["loss.difficulty"], mid["loss.difficulty"])
    assert not torch.equal(final["head.fc.weight"], mid["head.fc.weight"])

    # the saved difficulties are 1 − the accuracies of the saved weights on the val split
    cfg = train_net.setup_cfg(train_net.default_argument_parser().parse_args(["--config-file", CONFIG] + opts(full)))
    model = train_net.Trainer.build_model(cfg)
    model.load_state_dict(mid)
    from eqlosses_d2.classification.data import build_classification_test_loader

    correct, count = class_accuracy_counts(model, build_classification_test_loader(cfg, tiny_cls["val"]),
                                           TINY_CLS_SPEC.num_classes)
    assert count.tolist() == [float(TINY_CLS_SPEC.val_images_per_class)] * TINY_CLS_SPEC.num_classes
    assert torch.equal(mid["loss.difficulty"], 1.0 - correct / count)
    tau = float(mid["loss.tau"])
    assert tau == pytest.approx(hand_tau((1.0 - correct / count).tolist()), rel=1e-14)
    assert mid["loss.class_weights"].tolist() == pytest.approx(hand_weights((1.0 - correct / count).tolist(), tau),
                                                               rel=1e-12)

    # --resume from that checkpoint ends where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    _run(["--config-file", CONFIG, "--resume"] + opts(resumed))
    again = _state(resumed / "model_final.pth")["model"]
    assert again.keys() == final.keys()
    for key in final:
        assert torch.equal(again[key], final[key]), key


# -- two processes ----------------------------------------------------------------------------------


def _two_rank_measurement(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, records = _shared_model_and_records()
        shard = records[:7] if rank == 0 else records[7:]  # unequal shards, as InferenceSampler's
        hook = ClassDifficultyHook(cfg=None, period=1, dataset_name="constructed")
        hook._loader = [shard[:4], shard[4:]]
        with EventStorage() as storage:
            hook.trainer = SimpleNamespace(model=model, iter=0, max_iter=10, storage=storage)
            hook.after_step()
        torch.save({k: v.clone() for k, v in model.loss.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _shared_model_and_records():
    torch.manual_seed(11)
    model = _TinyClassifier(ClassDifficultyBalancedCE(3))
    xs = torch.randn(12, 2)
    labels = [0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0]
    return model, [{"x": x, "label": t} for x, t in zip(xs, labels)]


def test_hook_sums_the_counts_over_two_processes(tmp_path):
    """Two gloo processes, each measuring its shard, end with the same difficulties, equal to one
    process measuring every image."""
    torch.multiprocessing.spawn(_two_rank_measurement, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, records = _shared_model_and_records()
    correct, count = class_accuracy_counts(model, [records], 3)
    assert count.tolist() == [5.0, 3.0, 4.0] and 0 < correct.sum() < 12
    model.loss.update_class_accuracy(correct, count)
    assert not torch.equal(model.loss.difficulty, torch.ones(3, dtype=torch.float64))
    for key, value in model.loss.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]) and torch.equal(ranks[0][key], value), key
