"""PCB (softmax base): the confusion-matrix update by hand, the soft labels, the loss and
its gradient before and after activation, state across two processes and on resume."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eqlosses_d2.losses import build_loss
from eqlosses_d2.losses.pcb import PairwiseClassBalanceLoss

C = 3


def _logits(rows, seed):
    return torch.randn(rows, C + 1, generator=torch.Generator().manual_seed(seed)) * 2


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference_update(confusion, counts, logits, labels, momentum=0.99):
    """M[c] ← normalize(μ M[c] + (1 − μ) mean_c), rows of classes present; counts += n_c."""
    z = logits.double().numpy()
    probs = _softmax(z[:, :C])
    confusion, counts = confusion.copy(), counts.copy()
    for c in range(C):
        rows = [i for i, y in enumerate(labels) if y == c]
        if rows:
            mean = probs[rows].mean(axis=0)
            row = momentum * confusion[c] + (1 - momentum) * mean
            confusion[c] = row / row.sum()
            counts[c] += len(rows)
    return confusion, counts


def test_confusion_matrix_update_by_hand():
    loss = PairwiseClassBalanceLoss(C)
    confusion, counts = np.zeros((C, C)), np.zeros(C)
    batches = [([0, 0, 2, C, C], 0), ([1, 0, C, 2], 1), ([C, C], 2)]
    for labels, seed in batches:
        logits = _logits(len(labels), seed)
        loss(logits, torch.tensor(labels), progress=0.0)
        confusion, counts = _reference_update(confusion, counts, logits, labels)
        np.testing.assert_allclose(loss.confusion.numpy(), confusion, rtol=1e-5, atol=1e-7)
        assert loss.instance_count.tolist() == counts.tolist()
    # a class's first update sets its row to that batch's mean distribution
    first = _softmax(_logits(5, 0).double().numpy()[:, :C])
    fresh = PairwiseClassBalanceLoss(C)
    fresh(_logits(5, 0), torch.tensor([0, 0, 2, C, C]), progress=0.0)
    np.testing.assert_allclose(fresh.confusion[0].numpy(), first[:2].mean(axis=0), rtol=1e-5)
    assert fresh.confusion[1].tolist() == [0.0, 0.0, 0.0]


def test_plain_cross_entropy_until_active():
    labels = torch.tensor([0, 1, 2, C, C, 1])
    logits = _logits(6, 5)
    z = logits.double().numpy()
    ce = -np.log(_softmax(z)[np.arange(6), labels.numpy()]).sum() / 6
    before_start = PairwiseClassBalanceLoss(C, start=0.5)
    assert before_start(logits, labels, progress=0.49)["loss_cls"].item() == pytest.approx(ce, rel=1e-6)
    assert not before_start.is_active(0.49) and before_start.is_active(0.5)
    unseen = PairwiseClassBalanceLoss(C, start=0.0)  # class 2 never seen yet
    assert unseen(logits, torch.tensor([0, 1, C, C, C, 1]), progress=1.0)["loss_cls"].item() > 0
    assert not unseen.is_active(1.0)
    assert PairwiseClassBalanceLoss(C).scalars() == {}
    with pytest.raises(ValueError, match="PCB.ALPHA"):
        PairwiseClassBalanceLoss(C, alpha=1.5)


def test_active_loss_and_gradient_by_hand():
    alpha = 0.4
    loss = PairwiseClassBalanceLoss(C, alpha=alpha, start=0.5)
    warmup = torch.tensor([0, 1, 2, 0, C])
    loss(_logits(5, 7), warmup, progress=0.1)
    confusion, counts = _reference_update(np.zeros((C, C)), np.zeros(C), _logits(5, 7), warmup.tolist())

    labels = [2, C, 0, 0, C, 1]
    logits = _logits(6, 8)
    # the matrix is updated with this batch before the loss
    confusion, counts = _reference_update(confusion, counts, logits, labels)
    columns = confusion / confusion.sum(axis=0, keepdims=True)
    z = logits.double().numpy()
    p = _softmax(z)
    expected, grad = 0.0, np.zeros_like(z)
    for i, y in enumerate(labels):
        onehot = np.eye(C + 1)[y]
        if y == C:
            expected += -np.log(p[i, y])
            grad[i] = p[i] - onehot
        else:
            t = np.append(columns[:, y], 0.0)  # column y, background 0
            kl = sum(tk * (np.log(tk) - np.log(p[i, k])) for k, tk in enumerate(t) if tk > 0)
            expected += (1 - alpha) * -np.log(p[i, y]) + alpha * kl
            grad[i] = p[i] - (1 - alpha) * onehot - alpha * t
    x = logits.clone().requires_grad_()
    out = loss(x, torch.tensor(labels), progress=0.5)["loss_cls"]
    out.backward()
    assert out.item() == pytest.approx(expected / 6, rel=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), grad / 6, rtol=1e-4, atol=1e-7)
    assert loss.scalars() == {"active": 1.0, "classes_seen": 3.0}
    # inference is the softmax
    assert torch.allclose(loss.predict_probs(logits), torch.softmax(logits, dim=1))


def test_batch_without_rois_keeps_state():
    loss = PairwiseClassBalanceLoss(C)
    loss(_logits(4, 1), torch.tensor([0, 1, 2, C]), progress=0.0)
    before = loss.confusion.clone()
    out = loss(torch.zeros(0, C + 1, requires_grad=True), torch.zeros(0, dtype=torch.long), progress=1.0)
    assert out["loss_cls"].item() == 0.0
    assert torch.equal(loss.confusion, before)


def _batches():
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(0, C + 1, (6 if (it, rank) != (1, 1) else 0,), generator=g) for rank in range(2)]
            for it in range(4)]


def _base_logits(base, rows, seed):
    cols = C + (2 if base == "seesaw" else 1)
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2


def _worker(rank, base, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = PairwiseClassBalanceLoss(C, base=base, start=0.0)
        for it, per_rank in enumerate(_batches()):
            labels = per_rank[rank]
            loss(_base_logits(base, labels.numel(), 10 * it + rank), labels, progress=1.0)
        torch.save(loss.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("base", ["softmax", "seesaw", "eqlv2"])
def test_state_is_global_across_two_processes(base, tmp_path):
    mp.spawn(_worker, args=(base, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = PairwiseClassBalanceLoss(C, base=base, start=0.0)
    for it, per_rank in enumerate(_batches()):
        logits = torch.cat([_base_logits(base, per_rank[r].numel(), 10 * it + r) for r in range(2)])
        single(logits, torch.cat(per_rank), progress=1.0)
    assert set(rank0) == set(single.state_dict()) and len(rank0) >= 2
    for key in rank0:  # the confusion matrix, the counts, and the base's own state
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single.state_dict()[key], rtol=1e-6, atol=1e-7)
    assert single.instance_count.sum() > 0 and single.is_active(1.0)


def test_state_survives_a_state_dict_round_trip():
    first = build_loss("pcb", C)
    for seed in range(3):
        first(_logits(6, seed), torch.tensor([0, 1, 2, C, 0, 1]), progress=0.9)
    resumed = build_loss("pcb", C)
    resumed.load_state_dict(first.state_dict())
    logits, labels = _logits(6, 9), torch.tensor([2, 2, 0, C, 1, C])
    a = first(logits, labels, progress=0.9)["loss_cls"]
    b = resumed(logits, labels, progress=0.9)["loss_cls"]
    assert a.item() == b.item()
    assert torch.equal(first.confusion, resumed.confusion)


def test_trains_into_the_active_phase(tiny_dataset, tmp_path):
    """In a Trainer: the progress the box predictor hands over switches PCB on at START."""
    import json

    from test_training import QUICKSTART, _opts, _run

    # 32 iterations of 4 images: the sampler's first permutation of the 120 training images
    # ends at iteration 30, so every class (the rarest is in 3 images) has been seen
    _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, tmp_path, max_iter=32) + [
        "MODEL.EQLOSSES.LOSS", "pcb", "MODEL.EQLOSSES.PCB.START", "0.5", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "4"])
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    active = {r["iteration"]: r["pcb/active"] for r in records if "pcb/active" in r}
    seen = {r["iteration"]: r["pcb/classes_seen"] for r in records if "pcb/classes_seen" in r}
    assert max(active) == 31 and active[31] == 1.0 and seen[31] == tiny_dataset["spec"].num_categories
    assert all(value == 0.0 for iteration, value in active.items() if iteration < 16)  # before START
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    confusion = state["roi_heads.box_predictor.cls_loss.confusion"]
    torch.testing.assert_close(confusion.sum(dim=1), torch.ones(confusion.shape[0]))


def _activated(base, alpha=0.4, **base_hparams):
    """A PCB loss past its start with every class seen (one warm-up batch)."""
    loss = PairwiseClassBalanceLoss(C, base=base, alpha=alpha, start=0.5, base_hparams=base_hparams)
    cols = C + (2 if base == "seesaw" else 1)
    warmup = torch.tensor([0, 1, 2, 1, C])
    loss(torch.randn(5, cols, generator=torch.Generator().manual_seed(21)), warmup, progress=0.0)
    return loss, warmup


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_seesaw_base_soft_target_on_adjusted_logits():
    alpha = 0.4
    loss, warmup = _activated("seesaw", alpha)
    warm_logits = torch.randn(5, C + 2, generator=torch.Generator().manual_seed(21))
    confusion, counts = _reference_update(np.zeros((C, C)), np.zeros(C), warm_logits[:, : C + 1], warmup.tolist())
    labels = [2, C, 0, 1, C]
    logits = torch.randn(5, C + 2, generator=torch.Generator().manual_seed(22)) * 2
    confusion, counts = _reference_update(confusion, counts, logits[:, : C + 1], labels)
    columns = confusion / confusion.sum(axis=0, keepdims=True)
    seesaw_counts = np.bincount([y for y in warmup.tolist() + labels if y < C], minlength=C).astype(float)
    z = logits.double().numpy()
    n = len(labels)
    loss_cls, loss_obj = 0.0, 0.0
    for i, y in enumerate(labels):
        obj = _softmax(z[i : i + 1, C:])[0]
        loss_obj += -np.log(obj[0 if y < C else 1])
        if y == C:
            continue
        sigma = _softmax(z[i : i + 1, :C])[0]
        shifted = z[i, :C].copy()
        for j in range(C):
            if j == y:
                continue
            m = (max(seesaw_counts[j], 1) / max(seesaw_counts[y], 1)) ** 0.8 if seesaw_counts[j] < seesaw_counts[y] else 1.0
            ratio = sigma[j] / max(sigma[y], 1e-2)
            c = ratio ** 2.0 if ratio > 1 else 1.0
            shifted[j] += np.log(m * c)
        log_p = np.log(_softmax(shifted[None])[0])
        target = (1 - alpha) * np.eye(C)[y] + alpha * columns[:, y]
        loss_cls += -(target * log_p).sum()
    out = loss(logits, torch.tensor(labels), progress=0.9)
    assert out["loss_cls"].item() == pytest.approx(loss_cls / n, rel=1e-5)
    assert out["loss_cls_objectness"].item() == pytest.approx(loss_obj / n, rel=1e-5)
    np.testing.assert_allclose(loss.confusion.numpy(), confusion, rtol=1e-5, atol=1e-7)
    assert loss.num_logits == C + 2 and loss.scalars()["active"] == 1.0


def test_eqlv2_base_soft_targets_weights_and_statistics():
    alpha = 0.4
    loss, warmup = _activated("eqlv2", alpha)
    warm_logits = torch.randn(5, C + 1, generator=torch.Generator().manual_seed(21)).double().numpy()
    # the eqlv2 variant: sigmoid scores, rows not renormalized
    confusion = np.zeros((C, C))
    for c in range(C):
        rows = [i for i, y in enumerate(warmup.tolist()) if y == c]
        if rows:
            confusion[c] = 0.01 * _sigmoid(warm_logits[rows, :C]).mean(axis=0)
    np.testing.assert_allclose(loss.confusion.numpy(), confusion, rtol=1e-5, atol=1e-8)
    pos_before = loss.base.gradient_stats.pos_grad.clone().numpy()
    neg_before = loss.base.gradient_stats.neg_grad.clone().numpy()

    labels = [2, C, 0, 1, C, 0]
    logits = torch.randn(6, C + 1, generator=torch.Generator().manual_seed(23)) * 2
    z = logits.double().numpy()
    for c in range(C):
        rows = [i for i, y in enumerate(labels) if y == c]
        if rows:
            confusion[c] = 0.99 * confusion[c] + 0.01 * _sigmoid(z[rows, :C]).mean(axis=0)
    # weights from the statistics before this iteration
    ratio = pos_before / (neg_before + 1e-10)
    r = np.append(_sigmoid(12.0 * (ratio - 0.8)), 1.0)
    q = np.append(1 + 4.0 * (1 - r[:C]), 1.0)
    target = np.eye(C + 1)[labels]
    for i, y in enumerate(labels):
        if y < C:
            target[i, :C] = (1 - alpha) * np.eye(C)[y] + alpha * confusion[:, y]  # raw column
    weight = q * target + r * (1 - target)
    p = _sigmoid(z)
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    x = logits.clone().requires_grad_()
    loss.train()
    out = loss(x, torch.tensor(labels), progress=0.9)["loss_cls"]
    out.backward()
    assert out.item() == pytest.approx((weight * bce).sum() / 6, rel=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), weight * (p - target) / 6, rtol=1e-4, atol=1e-7)
    error = np.abs(p - target) * weight
    np.testing.assert_allclose(loss.base.gradient_stats.pos_grad.numpy(),
                               pos_before + (error * target).sum(axis=0)[:C], rtol=1e-5)
    np.testing.assert_allclose(loss.base.gradient_stats.neg_grad.numpy(),
                               neg_before + (error * (1 - target)).sum(axis=0)[:C], rtol=1e-5)


def test_pcb_config_builds_each_base():
    from detectron2.config import get_cfg

    from eqlosses_d2 import add_eqlosses_config
    from eqlosses_d2.losses import build_loss_from_cfg

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.MODEL.EQLOSSES.LOSS = "pcb"
    cfg.MODEL.EQLOSSES.SEESAW.P = 0.5
    for base, logits in (("softmax", 6), ("seesaw", 7), ("eqlv2", 6)):
        cfg.MODEL.EQLOSSES.PCB.BASE = base
        loss = build_loss_from_cfg(cfg.MODEL.EQLOSSES, 5)
        assert loss.base.name == base and loss.num_logits == logits
    assert loss.family == "sigmoid"
    cfg.MODEL.EQLOSSES.PCB.BASE = "seesaw"
    assert build_loss_from_cfg(cfg.MODEL.EQLOSSES, 5).base.p == 0.5  # the base's own node
    cfg.MODEL.EQLOSSES.PCB.BASE = "gumbel"
    with pytest.raises(ValueError, match="PCB.BASE must be one of softmax, seesaw, eqlv2"):
        build_loss_from_cfg(cfg.MODEL.EQLOSSES, 5)


def _iterative_model(tiny_dataset, extra=()):
    import train_net
    from detectron2.config import get_cfg

    from eqlosses_d2 import add_eqlosses_config
    from test_training import QUICKSTART, _opts

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(_opts(tiny_dataset, "/tmp/unused", max_iter=2) + [
        "MODEL.ROI_HEADS.NAME", "LongTailIterativeROIHeads", "MODEL.EQLOSSES.LOSS", "pcb", *extra])
    torch.manual_seed(0)
    return cfg, train_net.Trainer.build_model(cfg)


def test_iterative_head_passes_modulation_and_loss_weights(tiny_dataset):
    """Three passes, each on features modulated by the previous pass; losses weighted
    0.2/0.2/0.6 with the box regression from pass 2 alone; PCB told the pass index."""
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg, model = _iterative_model(tiny_dataset)
    heads = model.roi_heads
    assert heads.passes == 3 and heads.loss_weights == (0.2, 0.2, 0.6) and heads.reg_pass == 2
    g = torch.Generator().manual_seed(0)
    images = model.preprocess_image([{"image": torch.rand(3, 64, 64, generator=g) * 255, "height": 64, "width": 64}])
    features = model.backbone(images.tensor)
    proposals = Instances((64, 64))
    xy = torch.rand(12, 2, generator=g) * 40
    proposals.proposal_boxes = Boxes(torch.cat([xy, xy + 16], dim=1))
    proposals.gt_classes = torch.tensor([0, 1, 2, 3, 4, 5] + [6] * 6)
    proposals.gt_boxes = Boxes(torch.cat([xy + 1, xy + 17], dim=1))

    # the passes by hand
    feats = heads.box_pooler([features[f] for f in heads.box_in_features], [proposals.proposal_boxes])
    expected = []
    for k in range(3):
        scores, deltas = heads.box_predictor(heads.box_head(feats))
        expected.append((scores, deltas))
        feats = feats * heads.spatial_refine(deltas).view(-1, 1, 7, 7) + heads.channel_refine(scores).view(-1, feats.shape[1], 1, 1)
    got = heads._pass_predictions(features, [proposals])
    for (a, b), (c, d) in zip(got, expected):
        assert torch.allclose(a, c) and torch.allclose(b, d)
    assert not torch.allclose(got[0][0], got[2][0])  # the modulation changes the predictions

    seen = []
    original = heads.box_predictor.cls_loss.forward

    def spy(logits, labels, **context):
        seen.append((context.get("pass_index"), context.get("num_passes")))
        return original(logits, labels, **context)

    heads.box_predictor.cls_loss.forward = spy
    with EventStorage(0):
        losses = heads._forward_box(features, [proposals])
        per_pass = [heads.box_predictor.losses(p, [proposals]) for p in expected]
    assert seen[:3] == [(0, 3), (1, 3), (2, 3)]
    weighted = sum(w * l["loss_cls"] for w, l in zip((0.2, 0.2, 0.6), per_pass))
    assert losses["loss_cls"].item() == pytest.approx(weighted.item(), rel=1e-5)
    assert losses["loss_box_reg"].item() == pytest.approx(per_pass[2]["loss_box_reg"].item(), rel=1e-5)


def test_pcb_alpha_scales_with_the_pass():
    loss = PairwiseClassBalanceLoss(C, alpha=0.4, start=0.0)
    loss(_logits(5, 1), torch.tensor([0, 1, 2, C, 0]), progress=0.0)
    logits, labels = _logits(6, 2), torch.tensor([0, 1, 2, C, 1, C])
    values = []
    for k in range(3):
        state = {key: value.clone() for key, value in loss.state_dict().items()}
        values.append(loss(logits, labels, progress=1.0, pass_index=k, num_passes=3)["loss_cls"].item())
        loss.load_state_dict(state)
    reference = [PairwiseClassBalanceLoss(C, alpha=a, start=0.0) for a in (0.0, 0.2, 0.4)]
    for ref, value in zip(reference, values):
        ref.load_state_dict(state)
        assert ref(logits, labels, progress=1.0)["loss_cls"].item() == pytest.approx(value, rel=1e-6)
    assert values[0] != values[2]


def test_iterative_head_trains_and_evaluates(tiny_dataset, tmp_path):
    from test_training import QUICKSTART, _opts, _run

    results = _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, tmp_path, max_iter=3) + [
        "MODEL.ROI_HEADS.NAME", "LongTailIterativeROIHeads", "MODEL.EQLOSSES.LOSS", "pcb",
        "MODEL.EQLOSSES.PCB.BASE", "eqlv2", "MODEL.EQLOSSES.ITERATIVE_HEAD.LAYER_NORM", "True",
        "TEST.DETECTIONS_PER_IMAGE", "50"])
    assert set(results["segm"]) >= {"AP", "APr"}


WIDE = 40  # classes of the all-reduce test: a few present per batch


def _reduce_worker(rank, init_file, out_dir):
    """Two processes, PCB (softmax base), recording every all_reduce's size and dtype."""
    import json

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    original = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        calls.append([tensor.numel(), str(tensor.dtype)])
        return original(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        loss = PairwiseClassBalanceLoss(WIDE, start=0.0)
        for it, (logits, labels) in enumerate(_wide_batches()[rank]):
            loss(logits, labels, progress=1.0)
        torch.save(loss.state_dict(), os.path.join(out_dir, f"wide{rank}.pt"))
        with open(os.path.join(out_dir, f"calls{rank}.json"), "w") as f:
            json.dump(calls, f)
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


def _wide_batches():
    """Per rank, 3 batches of 8 RoIs with labels among a few classes (rank 0: 1, 2, 3;
    rank 1: 3, 7; and background)."""
    g = torch.Generator().manual_seed(8)
    out = []
    for classes in ([1, 2, 3, WIDE], [3, 7, WIDE]):
        choices = torch.tensor(classes)
        out.append([(torch.randn(8, WIDE + 1, generator=g) * 2,
                     choices[torch.randint(0, len(classes), (8,), generator=g)]) for _ in range(3)])
    return out


def test_confusion_all_reduce_sends_only_present_rows_in_float32(tmp_path):
    """Per update: the (C,) counts in float64, then the rows of the classes present in some
    process (at most 4 here) in float32, not the dense C x C float64 matrix; the state is
    the same on both processes and equals one process seeing both batches."""
    import json

    mp.spawn(_reduce_worker, args=(str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        assert len(calls) == 6  # 3 updates x (counts, rows)
        for counts, rows in zip(calls[::2], calls[1::2]):
            assert counts == [WIDE, "torch.float64"]
            assert rows[1] == "torch.float32" and rows[0] % WIDE == 0 and rows[0] <= 4 * WIDE
        assert sum(n * (8 if "64" in t else 4) for n, t in calls) < WIDE * WIDE * 8 / 4
    rank0, rank1 = torch.load(tmp_path / "wide0.pt"), torch.load(tmp_path / "wide1.pt")
    single = PairwiseClassBalanceLoss(WIDE, start=0.0)
    batches = _wide_batches()
    for (l0, y0), (l1, y1) in zip(*batches):
        single(torch.cat([l0, l1]), torch.cat([y0, y1]), progress=1.0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single.state_dict()[key], rtol=1e-6, atol=1e-7)
    assert (single.confusion[[1, 2, 3, 7]].sum(dim=1) > 0.99).all() and single.confusion[0].sum() == 0
