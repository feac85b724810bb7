"""CDB-W in the RoI box predictor (``MODEL.EQLOSSES.LOSS cdb_w``, Sinha et al. ACCV 2020 / IJCV
2022): the loss value and gradient against float64 hand loops (and finite differences of the
hand reference), the per-class accuracy of the training foreground RoIs counted by hand over three
steps and the window update by hand (difficulties, dynamic τ, weights, reset), fixed τ, the
state-dict round trip mid-window (the continuation is identical), two gloo processes (identical
state, equal to one process fed both batches), empty, background-only and non-finite batches, the
config node and the configs, and a 10-iteration quickstart run that trains and evaluates."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import merge_config_file
from eqlosses_d2.losses import LOSS_REGISTRY, base as loss_base, build_loss, build_loss_from_cfg
from loss_helpers import fd_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 4
F64 = torch.float64


# -- hand references (float64 loops) ---------------------------------------------------------------


def hand_tau(d):
    bias = (1.0 - min(d)) / (1.0 - max(d) + 0.01) - 1.0
    return 2.0 / (1.0 + math.exp(-bias))


def hand_weights(d, tau):
    powered = [x ** tau for x in d]
    total = sum(powered)
    return [len(d) * p / total for p in powered] if total > 0 else [1.0] * len(d)


def ref_loss(z, y, w_fg):
    """Σ_i w_{y_i} CE(z_i, y_i) / Σ_i w_{y_i} with w = [w_fg..., 1], and its gradient w_y (p − onehot) / Σ w_y."""
    w = list(w_fg) + [1.0]
    total = sum(w[t] for t in y)
    value, grad = 0.0, np.zeros((len(z), len(z[0])))
    for i, t in enumerate(y):
        m = max(z[i])
        log_norm = m + math.log(sum(math.exp(v - m) for v in z[i]))
        value += w[t] * (log_norm - z[i][t]) / total
        for j in range(len(z[i])):
            grad[i, j] = w[t] * (math.exp(z[i][j] - log_norm) - (1.0 if j == t else 0.0)) / total
    return value, grad


def hand_counts(z, y, num_classes=C):
    """Per foreground class: RoIs whose first maximal logit is their label, and all RoIs."""
    correct, count = [0.0] * num_classes, [0.0] * num_classes
    for row, t in zip(z, y):
        if t == num_classes:
            continue
        best = 0
        for j in range(len(row)):
            if row[j] > row[best]:
                best = j
        count[t] += 1.0
        correct[t] += 1.0 if best == t else 0.0
    return correct, count



def _logits(rows, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C + 1, generator=g, dtype=F64).mul(scale).float()


# three training steps: class 3 has no RoI in step 0, class 2 none at all; background (C) in each
BATCHES = [
    [0, 0, 1, 0, C, C, 1, C, 0, C],
    [1, 3, 3, 0, C, C, 1, C],
    [0, 3, 1, 1, C, 0, C, C, 3, C, C],
]


def _batches(seed=0):
    return [(_logits(len(labels), seed + 10 * step), torch.tensor(labels)) for step, labels in enumerate(BATCHES)]


def _set_difficulty(loss, difficulty):
    """Make a window of counts with accuracy 1 − d (10 RoIs per class) and close it."""
    count = torch.full((C,), 10.0, dtype=F64)
    loss.window_count.copy_(count)
    loss.window_correct.copy_(count * (1.0 - torch.tensor(difficulty, dtype=F64)))
    loss.update_from_window()


# -- value, gradient, weights ----------------------------------------------------------------------


def test_initial_state_is_plain_softmax_ce():
    loss = build_loss("cdb_w", C)
    assert loss.num_logits == C + 1 and loss.update_period == 6260
    state = loss.state_dict()
    assert set(state) == {"difficulty", "class_weights", "tau", "window_correct", "window_count", "num_steps"}
    assert all(state[k].dtype == F64 for k in state if k != "num_steps") and state["num_steps"].dtype == torch.int64
    assert loss.class_weights.tolist() == [1.0] * C and loss.difficulty.tolist() == [1.0] * C
    assert float(loss.tau) == pytest.approx(hand_tau([1.0] * C), rel=1e-15)  # 2·sigmoid(−1)
    z, y = _batches()[0]
    assert torch.allclose(loss(z, y)["loss_cls"], F.cross_entropy(z, y), rtol=1e-6)


@pytest.mark.parametrize("policy", ["auto", "gpu"])
@pytest.mark.parametrize("tau", [None, 1.5])
def test_value_and_gradient_against_hand_reference(tau, policy, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    loss = build_loss("cdb_w", C, dynamic_tau=tau is None, tau=tau or 1.0)
    d = [0.75, 0.5, 0.25, 0.125]  # 1 − (10 · (1 − d)) / 10 is d exactly in binary
    _set_difficulty(loss, d)
    assert loss.difficulty.tolist() == d
    t = hand_tau(d) if tau is None else tau
    w = hand_weights(d, t)
    assert float(loss.tau) == pytest.approx(t, rel=1e-14)
    assert loss.class_weights.tolist() == pytest.approx(w, rel=1e-13)
    assert float(loss.class_weights.sum()) == pytest.approx(C, rel=1e-14)
    y = [0, 1, 3, 2, C, C, 1, C, 3, C, 0, C]
    z = _logits(len(y), seed=5).requires_grad_()
    out = loss(z, torch.tensor(y))["loss_cls"]
    assert out.dtype == torch.float32
    value, grad = ref_loss(z.detach().double().tolist(), y, w)
    assert out.item() == pytest.approx(value, rel=1e-6)
    out.backward()
    np.testing.assert_allclose(z.grad.double().numpy(), grad, rtol=1e-5, atol=1e-7)
    fd = fd_grad(lambda a: ref_loss(a.tolist(), y, w)[0], z.detach().double().numpy())
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)  # the hand gradient is the formula's
    torch.testing.assert_close(loss.predict_probs(z.detach()), F.softmax(z.detach(), dim=1))


def test_dynamic_tau_by_hand():
    from eqlosses_d2.classification.losses.cdb import tau_from_difficulty as cls_tau
    from eqlosses_d2.losses.class_difficulty import cdb_weights, dynamic_tau

    # b = (1 − 0.1) / (1 − 0.7 + 0.01) − 1 = 0.9 / 0.31 − 1
    d = [0.7, 0.4, 0.2, 0.1]
    b = 0.9 / 0.31 - 1.0
    assert float(dynamic_tau(torch.tensor(d, dtype=F64))) == pytest.approx(2.0 / (1.0 + math.exp(-b)), rel=1e-15)
    assert cls_tau(torch.tensor(d)) == pytest.approx(hand_tau(d), rel=1e-7)  # the classification loss's, shared
    # a class at difficulty 1: b = (1 − min d) / 0.01 − 1, τ → 2
    assert float(dynamic_tau(torch.tensor([1.0, 0.5], dtype=F64))) == pytest.approx(hand_tau([1.0, 0.5]), rel=1e-15)
    # every class right (d all 0): b = 1 / 1.01 − 1
    assert float(dynamic_tau(torch.zeros(3, dtype=F64))) == pytest.approx(hand_tau([0.0] * 3), rel=1e-15)
    # weights: a tensor τ gives the float τ's weights; all d^τ = 0 gives ones
    t = dynamic_tau(torch.tensor(d, dtype=F64))
    assert torch.equal(cdb_weights(torch.tensor(d, dtype=F64), t), cdb_weights(torch.tensor(d, dtype=F64), float(t)))
    assert cdb_weights(torch.zeros(3, dtype=F64), 1.0).tolist() == [1.0] * 3


# -- counting over three steps and the window update ----------------------------------------------


@pytest.mark.parametrize("policy", ["auto", "gpu"])
def test_counts_over_three_steps_and_window_update_by_hand(policy, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    loss = build_loss("cdb_w", C, update_period=3)
    batches = _batches()
    correct, count = [0.0] * C, [0.0] * C
    for step, (z, y) in enumerate(batches):
        # the weights of steps 1-3 are the initial ones: plain softmax CE
        value, _ = ref_loss(z.double().tolist(), y.tolist(), [1.0] * C)
        assert loss(z, y)["loss_cls"].item() == pytest.approx(value, rel=1e-6)
        c, n = hand_counts(z.double().tolist(), y.tolist())
        correct, count = [a + b for a, b in zip(correct, c)], [a + b for a, b in zip(count, n)]
        assert int(loss.num_steps) == step + 1
        if step < 2:
            assert loss.window_correct.tolist() == correct and loss.window_count.tolist() == count
            assert loss.class_weights.tolist() == [1.0] * C
    assert count == [7.0, 6.0, 0.0, 4.0] and 0.0 < sum(correct) < sum(count)  # a mix of right and wrong
    # after step 3 the window closed: d = 1 − correct / count (class 2, never seen, keeps d = 1), reset
    d = [1.0 - c / n if n else 1.0 for c, n in zip(correct, count)]
    assert loss.difficulty.tolist() == pytest.approx(d, abs=1e-15)
    tau = hand_tau(d)
    assert float(loss.tau) == pytest.approx(tau, rel=1e-14)
    w = hand_weights(d, tau)
    assert loss.class_weights.tolist() == pytest.approx(w, rel=1e-13)
    assert loss.window_correct.tolist() == [0.0] * C and loss.window_count.tolist() == [0.0] * C
    # step 4 uses the new weights
    z, y = _logits(9, seed=99), torch.tensor([2, 0, 2, C, 0, C, 0, C, C])
    value, _ = ref_loss(z.double().tolist(), y.tolist(), w)
    assert loss(z, y)["loss_cls"].item() == pytest.approx(value, rel=1e-6)
    # the second window (steps 4-6) has RoIs of classes 0 and 2 only: 1 and 3 keep their difficulty
    correct, count = hand_counts(z.double().tolist(), y.tolist())
    for z, y in [(_logits(5, seed=200 + k), torch.tensor([0, 2, C, 0, C])) for k in range(2)]:
        c, n = hand_counts(z.double().tolist(), y.tolist())
        correct, count = [a + b for a, b in zip(correct, c)], [a + b for a, b in zip(count, n)]
        loss(z, y)
    assert count == [7.0, 0.0, 4.0, 0.0]
    d2 = [1.0 - correct[0] / 7.0, d[1], 1.0 - correct[2] / 4.0, d[3]]
    assert loss.difficulty.tolist() == pytest.approx(d2, abs=1e-15)
    assert loss.class_weights.tolist() == pytest.approx(hand_weights(d2, hand_tau(d2)), rel=1e-13)


def test_fixed_tau_window():
    loss = build_loss("cdb_w", C, dynamic_tau=False, tau=2.0, update_period=3)
    correct, count = [0.0] * C, [0.0] * C
    for z, y in _batches(seed=7):
        loss(z, y)
        c, n = hand_counts(z.double().tolist(), y.tolist())
        correct, count = [a + b for a, b in zip(correct, c)], [a + b for a, b in zip(count, n)]
    d = [1.0 - c / n if n else 1.0 for c, n in zip(correct, count)]
    assert float(loss.tau) == 2.0
    assert loss.class_weights.tolist() == pytest.approx(hand_weights(d, 2.0), rel=1e-13)


# -- resume, processes, edge cases -----------------------------------------------------------------


def _more_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        labels = torch.randint(0, C + 1, (12,), generator=g)
        out.append((_logits(12, seed=seed + k), labels))
    return out


def test_state_dict_round_trip_mid_window_continues_identically():
    loss = build_loss("cdb_w", C, update_period=3)
    for z, y in _more_batches(5, seed=1):  # one window closed, two steps into the next
        loss(z, y)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    assert int(state["num_steps"]) == 5 and state["window_count"].sum() > 0
    fresh = build_loss("cdb_w", C, update_period=3)
    fresh.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.state_dict()[key], state[key]), key
    for z, y in _more_batches(4, seed=50):  # the next window closes after the 6th step in both
        a = loss(z.clone().requires_grad_(), y)["loss_cls"]
        b = fresh(z.clone().requires_grad_(), y)["loss_cls"]
        assert torch.equal(a, b)
    for key, value in loss.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert int(fresh.num_steps) == 9 and not torch.equal(fresh.difficulty, state["difficulty"])


def _per_rank_batches(rank):
    return _more_batches(5, seed=300 + 17 * rank)


def _ddp_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss = build_loss("cdb_w", C, update_period=2)
        for z, y in _per_rank_batches(rank):
            loss(z, y)["loss_cls"]
        torch.save(loss.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_single_process_state(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = build_loss("cdb_w", C, update_period=2)
    for (z0, y0), (z1, y1) in zip(_per_rank_batches(0), _per_rank_batches(1)):
        single(torch.cat([z0, z1]), torch.cat([y0, y1]))
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], value), key
    assert int(rank0["num_steps"]) == 5 and rank0["window_count"].sum() > 0  # step 5: one step into window 3
    assert not torch.equal(rank0["class_weights"], torch.ones(C, dtype=F64))


@pytest.mark.parametrize("policy", ["auto", "gpu"])
def test_empty_and_background_only_batches(policy, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    loss = build_loss("cdb_w", C, update_period=2)
    _set_difficulty(loss, [0.5, 0.25, 0.0, 1.0])  # class 2 at weight 0
    weights = loss.class_weights.clone()
    z = torch.zeros(0, C + 1, requires_grad=True)
    out = loss(z, torch.zeros(0, dtype=torch.long))["loss_cls"]
    out.backward()
    assert out.item() == 0.0 and z.grad.shape == (0, C + 1)
    assert int(loss.num_steps) == 1 and loss.window_count.sum() == 0
    # background only: plain CE (w_bg = 1), nothing counted; the window closes with nothing seen
    z = _logits(6, seed=3).requires_grad_()
    y = torch.full((6,), C)
    out = loss(z, y)["loss_cls"]
    assert out.item() == pytest.approx(F.cross_entropy(z.detach(), y).item(), rel=1e-6)
    assert int(loss.num_steps) == 2 and torch.equal(loss.class_weights, weights)  # no class seen: same d, same w
    # only labels of weight 0: a loss of 0, not NaN
    z = _logits(3, seed=4).requires_grad_()
    out = loss(z, torch.tensor([2, 2, 2]))["loss_cls"]
    out.backward()
    assert out.item() == 0.0 and not z.grad.any()


def test_gpu_policy_non_finite_logits_give_nan_and_count_nothing(monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "gpu")
    loss = build_loss("cdb_w", C, update_period=10)
    z, y = _batches()[0]
    loss(z, y)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    z = z.clone()
    z[1, 2] = float("nan")
    assert torch.isnan(loss(z, y)["loss_cls"])
    after = loss.state_dict()
    for key in ("window_correct", "window_count", "difficulty", "class_weights", "tau"):
        assert torch.equal(before[key], after[key]), key
    assert int(after["num_steps"]) == 2  # the step itself is counted
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "auto")
    with pytest.raises(FloatingPointError, match="loss 'cdb_w'"):
        loss(z, y)


def test_scalars_and_groups():
    stats = SimpleNamespace(is_set=torch.tensor(True), frequency_group=torch.tensor([0, 0, 1, 2]))
    loss = build_loss("cdb_w", C, class_stats=stats)
    _set_difficulty(loss, [0.5, 0.25, 0.75, 0.125])
    w = loss.class_weights.tolist()
    s = loss.scalars()
    assert s["tau"] == pytest.approx(float(loss.tau)) and s["max_weight"] == pytest.approx(max(w))
    assert s["mean_difficulty"] == pytest.approx((0.5 + 0.25 + 0.75 + 0.125) / 4)
    assert s["mean_weight_r"] == pytest.approx((w[0] + w[1]) / 2) and s["mean_weight_f"] == pytest.approx(w[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """On a GPU: the same counts, windows, weights and losses as on the CPU, over two windows."""
    cpu = build_loss("cdb_w", C, update_period=2)
    gpu = build_loss("cdb_w", C, update_period=2).cuda()
    for z, y in _more_batches(5, seed=9):
        a = cpu(z.clone().requires_grad_(), y)["loss_cls"]
        zc = z.cuda().requires_grad_()
        b = gpu(zc, y.cuda())["loss_cls"]
        b.backward()
        assert b.item() == pytest.approx(a.item(), rel=1e-5)
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=1e-12, atol=0), key


# -- config ----------------------------------------------------------------------------------------


def _cfg():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    return cfg


def test_config_node_and_defaults():
    node = _cfg().MODEL.EQLOSSES
    assert dict(node.CDB_W) == {"DYNAMIC_TAU": True, "TAU": 1.0, "UPDATE_PERIOD": 6260}
    node.LOSS = "cdb_w"
    node.CDB_W.UPDATE_PERIOD = 7
    node.CDB_W.DYNAMIC_TAU = False
    loss = build_loss_from_cfg(node, C)
    assert type(loss) is LOSS_REGISTRY.get("cdb_w") and (loss.update_period, loss.dynamic_tau) == (7, False)


@pytest.mark.parametrize("hparams, message", [
    ({"tau": -1.0}, "CDB_W.TAU must be >= 0"),
    ({"update_period": 0}, "CDB_W.UPDATE_PERIOD must be an integer >= 1"),
    ({"update_period": 2.5}, "CDB_W.UPDATE_PERIOD must be an integer >= 1"),
])
def test_bad_values_are_one_line(hparams, message):
    with pytest.raises(ValueError, match=message):
        build_loss("cdb_w", C, **hparams)


CONFIGS = [os.path.join("LVISv1-InstanceSegmentation", "cdb_w_mask_rcnn_R_50_FPN_1x.yaml"),
           os.path.join("quickstart", "cdb_w_mask_rcnn_R18_FPN_synthetic.yaml")]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_its_model(config):
    from detectron2.modeling import build_model  # not at the top: the gloo workers import this module

    cfg = _cfg()
    merge_config_file(cfg, os.path.join(ROOT, "configs", config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    assert cfg.MODEL.EQLOSSES.LOSS == "cdb_w"
    model = build_model(cfg)
    loss = model.roi_heads.box_predictor.cls_loss
    assert loss.name == "cdb_w" and loss.dynamic_tau
    assert model.roi_heads.box_predictor.cls_score.out_features == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    if config.startswith("LVIS"):
        assert loss.update_period == 6260 and cfg.SOLVER.MAX_ITER == 90000
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    else:
        assert loss.update_period == 225  # one epoch of the 900 quickstart images at batch 4


def test_quickstart_trains_and_evaluates_with_window_updates(tiny_dataset, tmp_path):
    from test_training import _opts, _run

    config = os.path.join(ROOT, "configs", "quickstart", "cdb_w_mask_rcnn_R18_FPN_synthetic.yaml")
    results = _run(["--config-file", config] + _opts(tiny_dataset, tmp_path, max_iter=10)
                   + ["MODEL.EQLOSSES.CDB_W.UPDATE_PERIOD", "4", "TEST.DETECTIONS_PER_IMAGE", "50"])
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "APr", "APc", "APf"}
        assert math.isnan(results[task]["AP"]) or 0.0 <= results[task]["AP"] <= 100.0
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    prefix = "roi_heads.box_predictor.cls_loss."
    assert int(state[prefix + "num_steps"]) == 10  # windows closed after steps 4 and 8
    assert state[prefix + "window_count"].sum() > 0  # steps 9 and 10
    # the weights are those of the difficulties of the window closed at step 8 (a model this young
    # gets most foreground RoIs wrong: difficulties near 1)
    from eqlosses_d2.losses.class_difficulty import cdb_weights, dynamic_tau

    d = state[prefix + "difficulty"]
    assert d.dtype == F64 and bool(((d >= 0) & (d <= 1)).all())
    assert torch.equal(state[prefix + "tau"], dynamic_tau(d))
    assert torch.equal(state[prefix + "class_weights"], cdb_weights(d, dynamic_tau(d)))


def test_resume_across_a_window_matches_the_uninterrupted_run(tiny_dataset, tmp_path):
    """--resume from the checkpoint after iteration 3 (one step into the second window of 2) ends
    with the uninterrupted run's weights and CDB-W state, bit for bit."""
    import shutil

    from test_training import QUICKSTART, _opts, _run

    def opts(out):
        return _opts(tiny_dataset, out, max_iter=6) + [
            "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()", "MODEL.EQLOSSES.LOSS", "cdb_w",
            "MODEL.EQLOSSES.CDB_W.UPDATE_PERIOD", "2",
        ]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(["--config-file", QUICKSTART] + opts(full))
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    _run(["--config-file", QUICKSTART, "--resume"] + opts(resumed))
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    mid = load(full / "model_0000002.pth")["model"]
    a, b = load(full / "model_final.pth"), load(resumed / "model_final.pth")
    prefix = "roi_heads.box_predictor.cls_loss."
    assert int(mid[prefix + "num_steps"]) == 3 and int(a["model"][prefix + "num_steps"]) == 6
    assert a["model"][prefix + "window_count"].sum() == 0  # the third window closed at step 6
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_count_of_right_rois_follows_argmax_ties_included(monkeypatch):
    """The CPU path (label logit against the row's amax, argmax only on those rows) counts what
    argmax over every row counts (the GPU policy's way), first index winning a tie."""
    loss = build_loss("cdb_w", C)  # C = 4 foreground classes, column 4 the background
    z = torch.tensor([
        [3.0, 1.0, 0.0, 0.0, 0.0],  # label 0: right
        [2.0, 2.0, 0.0, 0.0, 0.0],  # label 1: tie with the earlier column 0 -> wrong
        [0.0, 2.0, 2.0, 0.0, 0.0],  # label 1: tie with the later column 2 -> right
        [0.0, 0.0, 1.0, 5.0, 0.0],  # label 2: wrong
        [0.0, 0.0, 0.0, 0.0, 9.0],  # label 3: taken for background -> wrong
        [0.0, 0.0, 0.0, 0.0, 9.0],  # background: not counted
        [1.0, 0.0, 0.0, 0.0, 0.5],  # label 0: right
    ])
    y = torch.tensor([0, 1, 1, 2, 3, C, 0])
    correct, count = loss.count(z, y)
    assert correct.tolist() == [2.0, 1.0, 0.0, 0.0] and count.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert correct.dtype == count.dtype == F64
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "gpu")
    g = torch.Generator().manual_seed(0)
    z = torch.randint(-2, 3, (300, C + 1), generator=g).float()  # many ties
    y = torch.randint(0, C + 1, (300,), generator=g)
    by_argmax = loss.count(z, y)
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "auto")
    assert [t.tolist() for t in loss.count(z, y)] == [t.tolist() for t in by_argmax]
    assert [t.tolist() for t in loss.count(z[:0], y[:0])] == [[0.0] * C, [0.0] * C]
