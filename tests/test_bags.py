"""
BAGS, balanced group softmax (issue 21): the groups from the instance counts, the training loss
(value and gradient against float64 loops of the authors' formula, with the others RoIs they
sample), the sampling (count, uniformity, determinism under a seed), the inference merge, edge
batches, the GPU policy (no host read), no state, config node and files.

The hand references are explicit loops over the formula; the RoIs drawn are re-derived here from
the documented draw (one ``torch.rand(G, N)`` after the same seed, the others with the smallest
keys), not from the implementation's sampler. Gradients are central finite differences of the
loops with the drawn RoIs held fixed.
"""
import math
import os

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import merge_config_file
from eqlosses_d2.losses import LOSS_REGISTRY, base as loss_base, build_loss, build_loss_from_cfg
from eqlosses_d2.losses.bags import group_layout, sample_group_rois
from loss_helpers import fd_grad, count_host_reads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 7
# groups at the authors' bins (10, 100, 1000): 1 <- classes 0, 2, 6 (3, 0, 9); 2 <- 1, 5 (40, 10);
# 3 <- 3 (999); 4 <- 4 (1000)
INSTANCE_COUNT = [3, 40, 0, 999, 1000, 10, 9]
BOUNDARIES = (10, 100, 1000)
# 40 RoIs: one of group 1 (class 2), five of group 2, none of group 3, two of group 4, the rest background
LABELS = [2, 1, 1, 5, 1, 5, 4, 4] + [C] * 32


def _stats(instance_count=INSTANCE_COUNT):
    n = torch.tensor(instance_count, dtype=torch.int64)
    return SimpleNamespace(image_count=n.clone(), instance_count=n, is_set=torch.tensor(True),
                           num_images_with_annotations=torch.tensor(100), num_images=torch.tensor(100))


def _logits(num_logits, rows=len(LABELS), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, num_logits, generator=g, dtype=torch.float64).mul(scale).float()



# -- hand references -------------------------------------------------------------------------------


def hand_groups(counts, boundaries=BOUNDARIES):
    """members[g]: the classes of foreground group g (1..G) in class order; slices[g]: (start, length)."""
    num_groups = len(boundaries) + 1
    members = {g: [] for g in range(1, num_groups + 1)}
    for j, n in enumerate(counts):
        g = 1 + sum(1 for b in boundaries if n >= b)
        members[g].append(j)
    slices, start = [(0, 2)], 2
    for g in range(1, num_groups + 1):
        slices.append((start, 1 + len(members[g])))
        start += 1 + len(members[g])
    return members, slices


def hand_group_label(y, g, members):
    if g == 0:
        return 0 if y == C else 1
    return members[g].index(y) + 1 if y in members[g] else 0


def hand_selection(labels, members, ratio, seed):
    """The RoIs in each group's loss: the documented draw, by hand (sorted keys)."""
    num_groups = len(members)
    torch.manual_seed(seed)
    keys = torch.rand(num_groups, len(labels), dtype=torch.float32).double().tolist()
    selected = [[1.0] * len(labels)]  # group 0: every RoI
    for g in range(1, num_groups + 1):
        own = [i for i, y in enumerate(labels) if y in members[g]]
        others = [i for i, y in enumerate(labels) if y not in members[g]]
        k = math.floor(len(own) * ratio)
        chosen = set(sorted(others, key=lambda i: (keys[g - 1][i], i))[:k])
        selected.append([1.0 if (i in own or i in chosen) else 0.0 for i in range(len(labels))])
    return selected


def ref_bags(z, labels, selected, counts=INSTANCE_COUNT, loss_weight=1.0):
    """Σ_g Σ_i w_gi CE(z_i[group g], label_gi) / max(Σ_i w_gi, 1), float64 loops."""
    members, slices = hand_groups(counts)
    total = 0.0
    for g, (start, length) in enumerate(slices):
        group_sum, weight_sum = 0.0, 0.0
        for i, y in enumerate(labels):
            w = selected[g][i]
            weight_sum += w
            if w == 0:
                continue
            x = [z[i][start + k] for k in range(length)]
            top = max(x)
            lse = top + math.log(sum(math.exp(v - top) for v in x))
            group_sum += w * (lse - x[hand_group_label(y, g, members)])
        total += group_sum / max(weight_sum, 1.0)
    return total * loss_weight


def ref_merge(z, counts=INSTANCE_COUNT):
    """Their ``_merge_score``: p_bg, and p_fg · softmax(group g)[k] for the classes; background last."""
    members, slices = hand_groups(counts)
    out = []
    for row in z:
        soft = []
        for start, length in slices:
            x = row[start:start + length]
            e = [math.exp(v - max(x)) for v in x]
            soft.append([v / sum(e) for v in e])
        probs = [0.0] * (C + 1)
        for g in range(1, len(slices)):
            for k, j in enumerate(members[g]):
                probs[j] = soft[0][1] * soft[g][k + 1]
        probs[C] = soft[0][0]
        out.append(probs)
    return out


# -- groups ----------------------------------------------------------------------------------------


def test_groups_from_instance_counts():
    layout = group_layout(torch.tensor(INSTANCE_COUNT), BOUNDARIES)
    members, slices = hand_groups(INSTANCE_COUNT)
    assert members == {1: [0, 2, 6], 2: [1, 5], 3: [3], 4: [4]}
    assert layout.slices == tuple(slices) == ((0, 2), (2, 4), (6, 3), (9, 2), (11, 2))
    assert layout.class_groups.tolist() == [1, 2, 1, 3, 4, 2, 1]
    # every class has its own column; the others / background / foreground columns hold none
    assert layout.class_columns.tolist() == [3, 7, 4, 10, 12, 8, 5]
    assert sorted(layout.class_columns.tolist() + [0, 1, 2, 6, 9, 11]) == list(range(C + 6))
    # their label2binlabel, background last: group 0 is bg 0 / fg 1, group g the position or 0
    for g in range(5):
        for y in range(C + 1):
            assert layout.group_labels[g, y].item() == hand_group_label(y, g, members), (g, y)
    assert build_loss("bags", C, class_stats=_stats()).num_logits == C + 6


def test_boundary_edges_and_other_bins():
    counts = [0, 1, 9, 10, 99, 100, 999, 1000, 5000]
    assert group_layout(torch.tensor(counts), (10, 100, 1000)).class_groups.tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    layout = group_layout(torch.tensor(counts), (5, 500))
    assert layout.class_groups.tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert layout.slices == ((0, 2), (2, 3), (5, 5), (10, 4))
    assert build_loss("bags", 9, group_boundaries=(5, 500)).num_logits == 9 + 5


def test_layout_follows_the_class_statistics():
    stats = _stats()
    loss = build_loss("bags", C, class_stats=stats)
    first = loss.layout()
    assert loss.layout() is first
    stats.instance_count.copy_(torch.tensor([2000] * C))  # a checkpoint load writes in place
    assert loss.layout().slices == ((0, 2), (2, 1), (3, 1), (4, 1), (5, 1 + C))


def test_synthetic_quickstart_groups():
    """The authors' bins on the embedded training set: 5, 12 and 13 classes, none with 1000 instances."""
    from detectron2.data import MetadataCatalog
    from eqlosses_d2.data import prepare_dataset

    prepare_dataset("synthetic_lvis_v1_train")
    counts = MetadataCatalog.get("synthetic_lvis_v1_train").class_statistics.instance_count
    layout = group_layout(torch.as_tensor(counts), BOUNDARIES)
    assert [length - 1 for _, length in layout.slices[1:]] == [5, 12, 13, 0]


# -- the loss --------------------------------------------------------------------------------------


CASES = {
    "default": ({}, 8.0, 1.0),
    "ratio-2": ({"others_sample_ratio": 2.0}, 2.0, 1.0),
    "ratio-0.5-weighted": ({"others_sample_ratio": 0.5, "loss_weight": 0.5}, 0.5, 0.5),
    "ratio-0": ({"others_sample_ratio": 0.0}, 0.0, 1.0),
}


@pytest.mark.parametrize("policy", ["auto", "gpu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_against_hand_reference(case, policy, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    hparams, ratio, loss_weight = CASES[case]
    loss = build_loss("bags", C, class_stats=_stats(), **hparams)
    z = _logits(loss.num_logits, seed=len(case)).requires_grad_()
    torch.manual_seed(11)
    out = loss(z, torch.tensor(LABELS))
    assert set(out) == {"loss_cls"} and out["loss_cls"].dtype == torch.float32
    members, _ = hand_groups(INSTANCE_COUNT)
    selected = hand_selection(LABELS, members, ratio, seed=11)
    expected = ref_bags(z.detach().double().tolist(), LABELS, selected, loss_weight=loss_weight)
    assert out["loss_cls"].item() == pytest.approx(expected, rel=2e-6, abs=1e-6)
    out["loss_cls"].backward()
    fd = fd_grad(lambda a: ref_bags(a.tolist(), LABELS, selected, loss_weight=loss_weight),
                  z.detach().double().numpy())
    np.testing.assert_allclose(z.grad.double().numpy(), fd, rtol=1e-4, atol=1e-6)
    # the groups' own losses are the scalars it logs
    group_losses = loss.scalars()
    assert sorted(group_losses) == [f"loss_group{g}" for g in range(5)]
    assert sum(group_losses.values()) == pytest.approx(out["loss_cls"].item(), rel=1e-6)
    assert group_losses["loss_group3"] == 0.0  # no RoI of group 3's class: nothing drawn, L_3 = 0


def test_selection_by_hand():
    """Default ratio 8: group 1 (1 RoI) draws 8 of its 39 others; group 2 (5 RoIs) and group 4
    (2 RoIs, 16 others of 38) draw; group 3 (none) is empty."""
    members, _ = hand_groups(INSTANCE_COUNT)
    selected = hand_selection(LABELS, members, 8.0, seed=11)
    assert [int(sum(s)) for s in selected] == [40, 9, 40, 0, 18]
    torch.manual_seed(11)
    layout = group_layout(torch.tensor(INSTANCE_COUNT), BOUNDARIES)
    drawn = sample_group_rois(layout.group_labels[1:, LABELS] > 0, 8.0)
    assert drawn.float().tolist() == selected[1:]


def test_sampling_counts_uniformity_and_seed():
    n_rois, n_own = 400, 7
    in_group = torch.zeros(3, n_rois, dtype=torch.bool)
    in_group[0, :n_own] = True  # 7 own RoIs: 56 of the 393 others
    in_group[1, :50] = True  # 400 wanted, 350 others: all
    # row 2: no own RoI, nothing
    hits = torch.zeros(n_rois, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        chosen = sample_group_rois(in_group, 8.0, generator=g)
        assert chosen[0].sum().item() == n_own + 56 and chosen[0, :n_own].all()
        assert chosen[1].all() and not chosen[2].any()
        hits += chosen[0].double()
    rate = hits[n_own:] / 2000  # each others RoI with probability 56 / 393
    p = 56 / 393
    assert abs(rate.mean().item() - p) < 1e-12  # exactly 56 each time
    assert (rate - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / 2000)
    # determinism: the same seed draws the same RoIs, another seed others
    a = sample_group_rois(in_group, 8.0, generator=torch.Generator().manual_seed(5))
    b = sample_group_rois(in_group, 8.0, generator=torch.Generator().manual_seed(5))
    c = sample_group_rois(in_group, 8.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_steps_are_reproducible_and_stateless():
    loss = build_loss("bags", C, class_stats=_stats())
    z = _logits(loss.num_logits)
    labels = torch.tensor(LABELS)
    torch.manual_seed(3)
    first = [loss(z, labels)["loss_cls"].item() for _ in range(3)]
    torch.manual_seed(3)
    again = [loss(z, labels)["loss_cls"].item() for _ in range(3)]
    assert first == again and len(set(first)) > 1  # the draws differ from step to step
    assert list(loss.buffers()) == [] and loss.state_dict() == {}


@pytest.mark.parametrize("labels", [[C] * 5, [0, 3, 1, 4, 6]], ids=["background", "foreground"])
def test_one_kind_of_roi_and_large_logits(labels):
    """Background only: groups 1-4 draw nothing (L_g = 0), group 0 is plain CE. Foreground only:
    fewer others than wanted, so every RoI is in every group that has one of its RoIs."""
    loss = build_loss("bags", C, class_stats=_stats())
    z = _logits(loss.num_logits, rows=5, seed=3, scale=8.0).requires_grad_()
    torch.manual_seed(0)
    out = loss(z, torch.tensor(labels))["loss_cls"]
    members, _ = hand_groups(INSTANCE_COUNT)
    selected = hand_selection(labels, members, 8.0, seed=0)
    if labels[0] == C:
        assert [sum(s) for s in selected] == [5, 0, 0, 0, 0]
    else:
        assert [sum(s) for s in selected] == [5, 5, 5, 5, 5]
    expected = ref_bags(z.detach().double().tolist(), labels, selected)
    assert out.item() == pytest.approx(expected, rel=2e-6, abs=1e-6)
    out.backward()
    fd = fd_grad(lambda a: ref_bags(a.tolist(), labels, selected), z.detach().double().numpy())
    np.testing.assert_allclose(z.grad.double().numpy(), fd, rtol=1e-4, atol=1e-5)


def test_empty_batch_is_a_connected_zero():
    loss = build_loss("bags", C, class_stats=_stats())
    z = torch.zeros(0, loss.num_logits, requires_grad=True)
    out = loss(z, torch.zeros(0, dtype=torch.int64))["loss_cls"]
    assert out.item() == 0.0
    out.backward()
    assert z.grad.shape == (0, loss.num_logits)


def test_chunks_give_the_same_value_and_gradient(monkeypatch):
    """Row chunks of 3 rows (the CPU policy's cache-sized chunks, made small) change nothing."""
    from eqlosses_d2.losses import fused

    loss = build_loss("bags", C, class_stats=_stats())
    z = _logits(loss.num_logits).requires_grad_()
    torch.manual_seed(1)
    whole = loss(z, torch.tensor(LABELS))["loss_cls"]
    whole.backward()
    grad = z.grad.clone()
    z.grad = None
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * loss.num_logits)
    torch.manual_seed(1)
    chunked = loss(z, torch.tensor(LABELS))["loss_cls"]
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(z.grad, grad, rtol=1e-6, atol=1e-7)


# -- inference -------------------------------------------------------------------------------------


def test_predict_probs_is_their_merge():
    loss = build_loss("bags", C, class_stats=_stats())
    assert loss.family == "softmax" and not loss.softmax_logits and loss.classifier_bias_init() is None
    z = _logits(loss.num_logits, rows=6, seed=9)
    probs = loss.predict_probs(z)
    assert probs.shape == (6, C + 1) and probs.dtype == torch.float32
    expected = torch.tensor(ref_merge(z.double().tolist()), dtype=torch.float64)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-7)
    # not renormalized: the "others" shares are dropped, the sum is not 1
    assert not torch.allclose(probs.sum(1), torch.ones(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss.predict_probs(z.bfloat16()).dtype == torch.float32


# -- errors, precision, GPU policy -----------------------------------------------------------------


@pytest.mark.parametrize("hparams, message", [
    ({"group_boundaries": (100, 10)}, r"BAGS.GROUP_BOUNDARIES must be increasing integers >= 1, got \(100, 10\)"),
    ({"group_boundaries": ()}, "BAGS.GROUP_BOUNDARIES must be increasing integers"),
    ({"group_boundaries": (0, 10)}, "BAGS.GROUP_BOUNDARIES must be increasing integers"),
    ({"group_boundaries": (10.5, 100)}, "BAGS.GROUP_BOUNDARIES must be increasing integers"),
    ({"others_sample_ratio": -1.0}, "BAGS.OTHERS_SAMPLE_RATIO must be a finite number >= 0, got -1.0"),
    ({"others_sample_ratio": float("inf")}, "BAGS.OTHERS_SAMPLE_RATIO must be a finite number >= 0"),
])
def test_bad_values_are_one_line(hparams, message):
    with pytest.raises(ValueError, match=message):
        build_loss("bags", C, **hparams)


def test_missing_class_stats_is_a_clear_error():
    loss = build_loss("bags", C)
    with pytest.raises(RuntimeError, match="loss 'bags' needs per-class statistics"):
        loss(torch.zeros(2, loss.num_logits), torch.tensor([0, C]))


def test_non_finite_logits(monkeypatch):
    loss = build_loss("bags", C, class_stats=_stats())
    z = torch.zeros(2, loss.num_logits)
    z[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss 'bags': 1 of"):
        loss(z, torch.tensor([0, C]))
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "gpu")
    assert torch.isnan(loss(z, torch.tensor([0, C]))["loss_cls"])


def test_second_backward_is_a_clear_error():
    loss = build_loss("bags", C, class_stats=_stats())
    z = _logits(loss.num_logits).requires_grad_()
    total = loss(z, torch.tensor(LABELS))["loss_cls"]
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        total.backward()


def test_bf16_autocast_gives_float32_loss_close_to_fp32():
    loss = build_loss("bags", C, class_stats=_stats())
    z = _logits(loss.num_logits)
    torch.manual_seed(0)
    fp32 = loss(z, torch.tensor(LABELS))["loss_cls"]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(z.bfloat16(), torch.tensor(LABELS))["loss_cls"]
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


@pytest.mark.parametrize("policy", ["gpu", "auto"])
def test_host_reads_and_collectives_of_a_training_step(policy, monkeypatch):
    """Under the GPU policy no host read (the number of others drawn stays on the device); under
    the CPU policy the finite check's ``bool`` and the backward's unit-gradient ``float``. No
    collective (no state). A warm-up step first (the layout is read once, then cached)."""
    import torch.distributed as dist

    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: calls.append(tensor.numel()))
    loss = build_loss("bags", C, class_stats=_stats())
    loss.scalars_wanted = False
    counts = count_host_reads(monkeypatch)
    for step in range(2):
        z = _logits(loss.num_logits, seed=step).requires_grad_()
        counts.on = step == 1
        loss(z, torch.tensor(LABELS))["loss_cls"].backward()
        counts.on = False
    assert counts == ({} if policy == "gpu" else {"__bool__": 1, "__float__": 1})
    assert calls == [] and loss.scalars() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """On a GPU: the draw comes from the CUDA generator (same RoI count rule), value and gradient
    match the hand reference with the RoIs the CUDA draw picked, and the merge matches the CPU's."""
    stats = _stats()
    loss = build_loss("bags", C, class_stats=stats)
    cuda_stats = SimpleNamespace(**{k: v.cuda() for k, v in vars(stats).items()})
    cuda_loss = build_loss("bags", C, class_stats=cuda_stats)
    z = _logits(loss.num_logits)
    torch.cuda.manual_seed(4)
    layout = group_layout(torch.tensor(INSTANCE_COUNT).cuda(), BOUNDARIES)
    drawn = sample_group_rois(layout.group_labels[1:, torch.tensor(LABELS).cuda()] > 0, 8.0)
    torch.cuda.manual_seed(4)
    zc = z.cuda().requires_grad_()
    out = cuda_loss(zc, torch.tensor(LABELS).cuda())["loss_cls"]
    selected = [[1.0] * len(LABELS)] + drawn.float().cpu().tolist()
    assert [int(sum(s)) for s in selected] == [40, 9, 40, 0, 18]
    expected = ref_bags(z.double().tolist(), LABELS, selected)
    assert out.item() == pytest.approx(expected, rel=2e-6, abs=1e-6)
    out.backward()
    fd = fd_grad(lambda a: ref_bags(a.tolist(), LABELS, selected), z.double().numpy())
    np.testing.assert_allclose(zc.grad.double().cpu().numpy(), fd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cuda_loss.predict_probs(z.cuda()).cpu(), loss.predict_probs(z), rtol=1e-6, atol=1e-7)


# -- config ----------------------------------------------------------------------------------------


def _cfg():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    return cfg


def test_config_node_and_defaults():
    node = _cfg().MODEL.EQLOSSES
    assert dict(node.BAGS) == {"GROUP_BOUNDARIES": (10, 100, 1000), "OTHERS_SAMPLE_RATIO": 8.0, "LOSS_WEIGHT": 1.0}
    node.LOSS = "bags"
    loss = build_loss_from_cfg(node, C, class_stats=_stats())
    assert type(loss) is LOSS_REGISTRY.get("bags") and loss.num_logits == C + 6
    node.BAGS.GROUP_BOUNDARIES = [5, 50]
    node.BAGS.OTHERS_SAMPLE_RATIO = 2.0
    loss = build_loss_from_cfg(node, C)
    assert (loss.group_boundaries, loss.others_sample_ratio, loss.num_logits) == ((5, 50), 2.0, C + 5)


CONFIGS = [os.path.join("LVISv1-InstanceSegmentation", "bags_mask_rcnn_R_50_FPN_1x_finetune.yaml"),
           os.path.join("quickstart", "bags_mask_rcnn_R18_FPN_synthetic.yaml")]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_its_model(config):
    cfg = _cfg()
    merge_config_file(cfg, os.path.join(ROOT, "configs", config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    assert cfg.MODEL.EQLOSSES.LOSS == "bags"
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_loss.name == "bags"
    assert predictor.cls_score.out_features == predictor.cls_loss.num_logits == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 6
    if config.startswith("LVIS"):  # the authors' protocol: fc_cls only, 12 epochs, random sampler
        assert cfg.MODEL.EQLOSSES.TRAINABLE_MODULES == ["roi_heads.box_predictor.cls_score"]
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (0.01, 90000, (60000, 82500))
        assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (500, 35.0)
        assert cfg.MODEL.EQLOSSES.BAGS.OTHERS_SAMPLE_RATIO == 8.0
        assert tuple(cfg.MODEL.EQLOSSES.BAGS.GROUP_BOUNDARIES) == (10, 100, 1000)
