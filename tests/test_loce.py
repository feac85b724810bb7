"""LOCE's equilibrium loss (EBL): value and gradient by hand, the mean-score update, the
per-instance entries the box predictor forms, state across two processes."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eqlosses_d2  # noqa: F401  # compat shims first (spawned workers import this module afresh)
from detectron2.structures import Boxes, Instances

from eqlosses_d2.losses.equilibrium import EquilibriumLoss, instance_mean_scores
from eqlosses_d2.modeling.box_predictor import matched_instance_ids

C = 3


def _logits(rows, seed):
    return torch.randn(rows, C + 1, generator=torch.Generator().manual_seed(seed)) * 2


def test_mean_score_update_by_hand():
    loss = EquilibriumLoss(C)
    assert loss.mean_score.tolist() == pytest.approx([0.01, 0.01, 0.01, 0.01])
    loss.update(torch.tensor([0, 0, 2]), torch.tensor([0.5, 0.3, 0.8]))
    s0 = 0.81 * 0.01 + 0.19 * 0.4  # two entries: α², their mean
    s2 = 0.9 * 0.01 + 0.1 * 0.8
    assert loss.mean_score.tolist() == pytest.approx([s0, 0.01, s2, 0.01], rel=1e-6)
    loss.update(torch.tensor([2]), torch.tensor([0.2]))
    assert loss.mean_score[2].item() == pytest.approx(0.9 * s2 + 0.1 * 0.2, rel=1e-6)
    loss.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))  # nothing to fold in
    assert loss.mean_score[C].item() == pytest.approx(0.01)


def test_loss_and_gradient_use_the_updated_scores():
    loss = EquilibriumLoss(C)
    loss.update(torch.tensor([0, 1]), torch.tensor([0.6, 0.05]))
    labels = torch.tensor([0, 2, C, 1, C])
    logits = _logits(5, 1)
    entries = (torch.tensor([2, 1]), torch.tensor([0.4, 0.1]))
    expected_scores = loss.mean_score.clone().double().numpy()
    expected_scores[2] = 0.9 * expected_scores[2] + 0.1 * 0.4
    expected_scores[1] = 0.9 * expected_scores[1] + 0.1 * 0.1
    z = logits.double().numpy()
    numerator = expected_scores[None, :] * np.exp(z)
    p = numerator / numerator.sum(axis=1, keepdims=True)  # P_j = s_j e^z_j / Σ s_k e^z_k
    onehot = np.eye(C + 1)[labels.numpy()]
    x = logits.clone().requires_grad_()
    out = loss(x, labels, instance_labels=entries[0], instance_means=entries[1])["loss_cls"]
    out.backward()
    assert out.item() == pytest.approx(-np.log(p[np.arange(5), labels.numpy()]).sum() / 5, rel=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), (p - onehot) / 5, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(loss.mean_score.numpy(), expected_scores, rtol=1e-6)
    # inference: the plain softmax
    assert torch.allclose(loss.predict_probs(logits), torch.softmax(logits, dim=1))
    with pytest.raises(ValueError, match="needs per-instance mean scores"):
        loss(logits, labels)
    loss.eval()  # no update at inference-time calls
    before = loss.mean_score.clone()
    loss(logits, labels, instance_labels=entries[0], instance_means=entries[1])
    assert torch.equal(before, loss.mean_score)


def test_instance_entries_by_hand():
    logits = _logits(6, 2)
    labels = torch.tensor([1, 1, 0, C, 1, 2])
    ids = torch.tensor([0, 0, 1, -1, 2, 3])  # two instances of class 1
    entry_labels, entry_means = instance_mean_scores(logits, labels, ids, C)
    p = torch.softmax(logits.double(), dim=1)
    assert entry_labels.tolist() == [1, 0, 1, 2]
    expected = [(p[0, 1] + p[1, 1]) / 2, p[2, 0], p[4, 1], p[5, 2]]
    np.testing.assert_allclose(entry_means.numpy(), torch.stack(expected).numpy(), rtol=1e-6)


def test_matched_instance_ids_from_sampled_proposals():
    a = Instances((32, 32))
    a.gt_classes = torch.tensor([1, 1, 0, C, 1])
    a.gt_boxes = Boxes(torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [1, 1, 5, 5], [0, 0, 1, 1], [2, 2, 9, 9.0]]))
    b = Instances((32, 32))
    b.gt_classes = torch.tensor([C, 2])
    b.gt_boxes = Boxes(torch.tensor([[0, 0, 1, 1], [0, 0, 4, 4.0]]))
    ids = matched_instance_ids([a, b], C).tolist()
    assert ids[3] == -1 and ids[5] == -1
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[4], ids[6]}) == 4  # b's box equals a's: another image


def _batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for it in range(3):
        per_rank = []
        for rank in range(2):
            n = 0 if (it, rank) == (1, 0) else 4
            per_rank.append((torch.randint(0, C, (n,), generator=g), torch.rand(n, generator=g)))
        out.append(per_rank)
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = EquilibriumLoss(C)
        for per_rank in _batches():
            labels, means = per_rank[rank]
            loss.update(labels, means)
        torch.save(loss.mean_score, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mean_scores_are_global_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = EquilibriumLoss(C)
    for per_rank in _batches():
        single.update(torch.cat([per_rank[0][0], per_rank[1][0]]), torch.cat([per_rank[0][1], per_rank[1][1]]))
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, single.mean_score)
    assert (single.mean_score[:C] != 0.01).all()


def test_predictor_forms_entries_in_training(tiny_dataset):
    """Through the box predictor: the entries come from the proposals' matched boxes."""
    import train_net
    from detectron2.config import get_cfg
    from detectron2.utils.events import EventStorage

    from eqlosses_d2 import add_eqlosses_config
    from test_training import QUICKSTART, _opts

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(_opts(tiny_dataset, "/tmp/unused", max_iter=2) + ["MODEL.EQLOSSES.LOSS", "equilibrium"])
    model = train_net.Trainer.build_model(cfg)
    predictor = model.roi_heads.box_predictor
    p = Instances((32, 32))
    p.proposal_boxes = Boxes(torch.tensor([[0, 0, 8, 8], [1, 1, 9, 9], [4, 4, 12, 12], [0, 0, 2, 2.0]]))
    p.gt_classes = torch.tensor([1, 1, 3, 6])
    p.gt_boxes = Boxes(torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8], [4, 4, 12, 12], [0, 0, 2, 2.0]]))
    scores = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    deltas = torch.zeros(4, 6 * 4)
    with EventStorage(0):
        predictor.losses((scores, deltas), [p])
    probs = torch.softmax(scores.double(), dim=1)
    s1 = 0.9 * 0.01 + 0.1 * (probs[0, 1] + probs[1, 1]) / 2
    s3 = 0.9 * 0.01 + 0.1 * probs[2, 3]
    score = predictor.cls_loss.mean_score
    assert score[1].item() == pytest.approx(s1.item(), rel=1e-5) and score[3].item() == pytest.approx(s3.item(), rel=1e-5)
    assert score[0].item() == pytest.approx(0.01)


# ----------------------------------------------------------------------------- MFS

from eqlosses_d2.modeling.memory import JITTER_SIGNS, FeatureMemory, jitter_boxes  # noqa: E402


def test_jitter_signs_cover_all_sixteen_combinations():
    assert JITTER_SIGNS.shape == (4, 16)
    assert JITTER_SIGNS[:, 0].tolist() == [-1, -1, -1, -1] and JITTER_SIGNS[:, 15].tolist() == [1, 1, 1, 1]
    assert len({tuple(column) for column in JITTER_SIGNS.t().tolist()}) == 16


def test_jitter_boxes_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 40.0, 32.0]])  # w 30, h 12
    uniform = torch.full((4, 16), 0.5)
    out = jitter_boxes(boxes, (100, 100), uniform)
    assert out.shape == (1, 16, 4)
    # jitter 0: every coordinate minus 0.5 * size / 6; jitter 15: plus
    assert out[0, 0].tolist() == pytest.approx([10 - 2.5, 20 - 1.0, 40 - 2.5, 32 - 1.0])
    assert out[0, 15].tolist() == pytest.approx([10 + 2.5, 20 + 1.0, 40 + 2.5, 32 + 1.0])
    # jitter 5 = signs (−, +, −, +): x1 −, y1 +, x2 −, y2 +
    assert JITTER_SIGNS[:, 5].tolist() == [-1, 1, -1, 1]
    assert out[0, 5].tolist() == pytest.approx([7.5, 21.0, 37.5, 33.0])
    # clamped to the image
    edge = jitter_boxes(torch.tensor([[0.0, 0.0, 99.0, 99.0]]), (100, 100), torch.ones(4, 16))
    assert edge.min() >= 0 and edge[..., 2].max() <= 99 and edge[..., 3].max() <= 99


def test_memory_fifo_per_class():
    memory = FeatureMemory(3, queue_size=4, storage_dtype=torch.float32)
    feats = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 1, 1)
    labels = torch.tensor([0, 0, 1, 0, 0, 0])  # class 0: 5 rows, only the first 4 are kept
    boxes = torch.arange(24, dtype=torch.float32).view(6, 4)
    memory.enqueue(feats, labels, boxes, boxes + 100)
    assert memory.filled.tolist() == [4, 1, 0] and memory.pointer.tolist() == [0, 1, 0]
    assert memory.features[0, :, 0, 0, 0].tolist() == [0, 1, 3, 4]
    assert memory.gt_boxes[1, 0].tolist() == (boxes[2] + 100).tolist()
    memory.enqueue(feats[:2] + 10, torch.tensor([0, 0]), boxes[:2], boxes[:2])
    assert memory.features[0, :, 0, 0, 0].tolist() == [10, 11, 3, 4]  # the oldest two replaced
    assert memory.pointer[0] == 2 and memory.filled[0] == 4
    assert FeatureMemory(1203, 80).nbytes() == 1203 * 80 * 256 * 7 * 7 * 2  # float16: 2.4 GB


def test_sampling_distribution_follows_inverse_mean_scores():
    memory = FeatureMemory(3, queue_size=5, storage_dtype=torch.float32)
    feats = torch.arange(9, dtype=torch.float32).view(9, 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2])
    memory.enqueue(feats, labels, torch.zeros(9, 4), torch.zeros(9, 4))
    mean_score = torch.tensor([0.5, 0.25, 0.125, 0.01])
    probs = memory.sampling_probabilities(mean_score)
    np.testing.assert_allclose(probs.numpy(), np.array([2, 4, 8]) / 14, rtol=1e-5)
    torch.manual_seed(0)
    counts, slot_counts = np.zeros(3), np.zeros(5)
    draws = 3000
    for _ in range(draws):
        out, sampled_labels, _, _ = memory.sample(mean_score, num_classes=8, num_features=4)
        assert out.shape[0] == sampled_labels.numel() == 32
        counts += np.bincount(sampled_labels.numpy(), minlength=3) / 4
        ones = sampled_labels == 1
        slot_counts += np.bincount((out[ones, 0] - 3).long().numpy(), minlength=5)
    expected = np.array([2, 4, 8]) / 14 * 8 * draws
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))  # classes ∝ 1/s
    assert np.all(np.abs(slot_counts / slot_counts.sum() - 0.2) < 0.01)  # slots uniform
    # class 2's queue holds one feature: all its draws are it; empty queues give nothing
    empty = FeatureMemory(3, queue_size=5)
    assert empty.sample(mean_score)[1].numel() == 0


def _loce_cfg(tiny_dataset, out, extra=()):
    from detectron2.config import get_cfg

    from eqlosses_d2 import add_eqlosses_config
    from test_training import QUICKSTART, _opts

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(_opts(tiny_dataset, out, max_iter=2) + [
        "MODEL.ROI_HEADS.NAME", "LongTailLOCEROIHeads", "MODEL.EQLOSSES.LOSS", "equilibrium", *extra])
    return cfg


def test_loce_head_appends_memory_rois_with_their_targets(tiny_dataset, tmp_path):
    import train_net
    from detectron2.utils.events import EventStorage

    cfg = _loce_cfg(tiny_dataset, str(tmp_path))
    torch.manual_seed(0)
    model = train_net.Trainer.build_model(cfg)
    heads = model.roi_heads
    assert heads.memory.filled.sum() == 0
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    captured = {}
    original = heads.box_predictor.losses

    def spy(predictions, proposals, **context):
        captured["predictions"], captured["proposals"] = predictions, proposals
        return original(predictions, proposals, **context)

    heads.box_predictor.losses = spy
    with EventStorage(0):
        model(batch)  # first iteration: fills the queues, samples from them
    num_gt = sum(len(x["instances"]) for x in batch)
    assert heads.memory.filled.sum() == sum(min(16 * int((torch.cat([x["instances"].gt_classes for x in batch]) == c).sum()), 80)
                                            for c in range(heads.num_classes))
    memory_rois = captured["proposals"][-1]
    # 8 draws (with replacement) x 4 features, draws of classes with an empty queue give none
    assert memory_rois.has("loce_entry_ids") and num_gt > 0
    assert 0 < len(memory_rois) <= 32 and len(memory_rois) % 4 == 0
    assert all(int(heads.memory.filled[c]) > 0 for c in memory_rois.gt_classes.tolist())
    # the appended rows are the sampled features' predictions: their labels and boxes are
    # a queue's, and the regression target of each is its jitter → its ground truth
    scores, deltas = captured["predictions"]
    sampled_rows = len(memory_rois)
    assert scores.shape[0] == sum(len(p) for p in captured["proposals"]) and sampled_rows > 0
    for label, box, gt in zip(memory_rois.gt_classes.tolist(), memory_rois.proposal_boxes.tensor, memory_rois.gt_boxes.tensor):
        filled = int(heads.memory.filled[label])
        match = (heads.memory.proposal_boxes[label, :filled] == box.cpu()).all(dim=1)
        assert match.any() and (heads.memory.gt_boxes[label, :filled][match] == gt.cpu()).all()
    assert (memory_rois.gt_boxes.tensor != memory_rois.proposal_boxes.tensor).any()


def test_prefill_indices_are_class_balanced_per_process():
    from eqlosses_d2.prefill import prefill_image_indices

    dicts = [{"annotations": [{"category_id": c} for c in cats]} for cats in ([0], [0, 1], [1], [0], [], [2])]
    assert prefill_image_indices(dicts, 3, per_class=2) == [0, 1, 1, 2, 5, 5]
    # two processes: each its own block of the class's (repeated) list
    assert prefill_image_indices(dicts, 3, per_class=2, rank=0, world_size=2) == [0, 1, 1, 2, 5, 5]
    assert prefill_image_indices(dicts, 3, per_class=2, rank=1, world_size=2) == [3, 0, 1, 2, 5, 5]


def test_restrict_trainable():
    from eqlosses_d2.modeling.trainable import restrict_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert restrict_trainable(model, ["1."]) == 3
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    with pytest.raises(ValueError, match="TRAINABLE_MODULES: no parameter name starts with 'roi_heads'"):
        restrict_trainable(model, ["roi_heads"])


def test_loce_fine_tune_trains_with_prefill_and_resumes_mean_scores(tiny_dataset, tmp_path):
    """The decoupled protocol end to end on the tiny data: a baseline, then LOCE fine-tuned
    from it with only the classifier, box regressor, RPN and mask head trainable; the
    pre-fill runs; a resumed run restores the mean scores exactly."""
    import json
    import shutil

    from test_training import QUICKSTART, _opts, _run

    base = tmp_path / "baseline"
    _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, base, max_iter=2) + ["DATASETS.TEST", "()"])
    loce_opts = [
        "MODEL.ROI_HEADS.NAME", "LongTailLOCEROIHeads", "MODEL.EQLOSSES.LOSS", "equilibrium",
        "MODEL.WEIGHTS", str(base / "model_final.pth"), "MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS", "1",
        "MODEL.EQLOSSES.TRAINABLE_MODULES",
        "['roi_heads.box_predictor', 'proposal_generator', 'roi_heads.mask_head']",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
        "MODEL.EQLOSSES.MFS.CHECKPOINT_QUEUES", "False",  # the authors' way: re-filled on resume
    ]
    full = tmp_path / "full"
    _run(["--config-file", QUICKSTART] + _opts(tiny_dataset, full, max_iter=4) + loce_opts)
    start = torch.load(base / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    end = torch.load(full / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(start["backbone.bottom_up.stem.conv1.weight"], end["backbone.bottom_up.stem.conv1.weight"])
    assert torch.equal(start["roi_heads.box_head.fc1.weight"], end["roi_heads.box_head.fc1.weight"])
    assert not torch.equal(start["roi_heads.box_predictor.cls_score.weight"], end["roi_heads.box_predictor.cls_score.weight"])
    assert (end["roi_heads.box_predictor.cls_loss.mean_score"][:-1] != 0.01).any()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000001.pth", resumed / "model_0000001.pth")
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    checkpoint = torch.load(resumed / "model_0000001.pth", map_location="cpu", weights_only=True)["model"]
    from eqlosses_d2.prefill import MemoryPrefillHook

    seen = {}
    original = MemoryPrefillHook.before_train

    def recording(hook):
        seen["rng_before"] = torch.get_rng_state()
        original(hook)
        model = getattr(hook.trainer.model, "module", hook.trainer.model)
        seen["mean_score"] = model.roi_heads.box_predictor.cls_loss.mean_score.clone()
        seen["filled"] = int((model.roi_heads.memory.filled > 0).sum())
        seen["rng_after"] = torch.get_rng_state()

    MemoryPrefillHook.before_train = recording
    try:
        _run(["--config-file", QUICKSTART, "--resume"] + _opts(tiny_dataset, resumed, max_iter=4) + loce_opts)
    finally:
        MemoryPrefillHook.before_train = original
    # the pre-fill ran again (queues are not checkpointed) and left the restored mean
    # scores and random state exactly as the checkpoint had them
    assert seen["filled"] > 0
    assert torch.equal(seen["mean_score"], checkpoint["roi_heads.box_predictor.cls_loss.mean_score"])
    assert torch.equal(seen["rng_before"], seen["rng_after"])


# ----------------------------------------------------------------------------- the pre-fill
def test_first_rows_per_class_is_what_enqueue_keeps():
    from eqlosses_d2.modeling.memory import first_rows_per_class

    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2, 0])
    assert first_rows_per_class(labels, 2).tolist() == [True, True, True, False, True, True, False, False]
    assert first_rows_per_class(labels, 10).all() and first_rows_per_class(torch.zeros(0, dtype=torch.long), 3).numel() == 0


def _pool_by_box(boxes_per_image):
    """A stand-in RoI pooler: each box's 'feature' is made from its coordinates."""
    rows = torch.cat([b.tensor for b in boxes_per_image]) if boxes_per_image else torch.zeros(0, 4)
    return (rows[:, :, None, None] * torch.tensor([1.0, -1.0])[None, None, :, None]).expand(-1, -1, 2, 3).contiguous()


def test_only_the_kept_jitters_are_pooled_and_the_queues_are_the_same():
    """7 boxes of class 0 (112 jitters) and 2 of class 1 in two images, queues of 80: the
    old way pooled all 144 jitters, the new one pools the 80 + 32 the queues keep; every
    queue ends the same (features, boxes, fill, pointer), the RNG stream too."""
    from eqlosses_d2.modeling.memory import FeatureMemory, jitter_boxes

    def image(boxes, classes):
        instances = Instances((60, 80))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.tensor(classes)
        return instances

    gt = [image([[5, 5, 30, 30], [10, 8, 50, 40], [0, 0, 20, 20], [30, 10, 70, 50]], [0, 0, 1, 0]),
          image([[1, 2, 40, 40], [20, 20, 60, 55], [2, 3, 12, 13], [40, 30, 79, 59], [5, 5, 50, 25]], [0, 0, 1, 0, 0])]
    torch.manual_seed(5)
    old = FeatureMemory(2, queue_size=80, storage_dtype=torch.float32)
    jittered, labels, gt_boxes = [], [], []
    for instances in gt:  # the former update_memory: every jitter pooled, enqueue keeps 80 per class
        jitters = jitter_boxes(instances.gt_boxes.tensor, instances.image_size)
        jittered.append(Boxes(jitters.reshape(-1, 4)))
        gt_boxes.append(instances.gt_boxes.tensor[:, None, :].expand_as(jitters).reshape(-1, 4))
        labels.append(instances.gt_classes[:, None].expand(-1, 16).reshape(-1))
    old.enqueue(_pool_by_box(jittered), torch.cat(labels), torch.cat([b.tensor for b in jittered]), torch.cat(gt_boxes))
    assert sum(len(b) for b in jittered) == 144
    after_old = torch.rand(3)

    torch.manual_seed(5)
    new = FeatureMemory(2, queue_size=80, storage_dtype=torch.float32)
    boxes, kept_labels, kept_boxes, kept_gt = new.jitters_to_enqueue(gt)
    assert [len(b) for b in boxes] == [64, 48] and kept_labels.tolist().count(0) == 80
    new.enqueue(_pool_by_box(boxes), kept_labels, kept_boxes, kept_gt)
    assert torch.equal(torch.rand(3), after_old)  # the same random draws
    assert new.filled.tolist() == old.filled.tolist() == [80, 32]
    for key in ("proposal_boxes", "gt_boxes", "pointer"):
        assert torch.equal(getattr(new, key), getattr(old, key)), key
    for label, filled in enumerate(old.filled.tolist()):  # unwritten feature slots are uninitialized
        assert torch.equal(new.features[label, :filled], old.features[label, :filled])


def test_loce_head_pools_only_the_kept_jitters(tiny_dataset, tmp_path):
    import train_net

    cfg = _loce_cfg(tiny_dataset, str(tmp_path))
    model = train_net.Trainer.build_model(cfg)
    heads = model.roi_heads
    instances = Instances((64, 80))
    instances.gt_boxes = Boxes(torch.tensor([[2.0 + i, 3.0, 40.0 + i, 50.0] for i in range(7)]))
    instances.gt_classes = torch.zeros(7, dtype=torch.long)
    features = [torch.randn(1, 64, 64 // s, 80 // s) for s in (4, 8, 16, 32)][: len(heads.box_in_features)]
    pooled_rows = []
    pooler = heads.box_pooler
    original = pooler.forward
    pooler.forward = lambda x, boxes: pooled_rows.append(sum(len(b) for b in boxes)) or original(x, boxes)
    heads.update_memory(features, [instances])
    assert pooled_rows == [80] and int(heads.memory.filled[0]) == 80  # not 112


def test_prefill_runs_norm_layers_in_eval_mode_and_restores_modes(tiny_dataset, tmp_path, monkeypatch):
    """As the authors (model.eval() around their training forward): BatchNorm layers run on
    their running statistics and leave them unchanged, the detector still fills the
    queues, and every module's mode is what it was before."""
    import train_net
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from eqlosses_d2.prefill import prefill_feature_memory

    cfg = _loce_cfg(tiny_dataset, str(tmp_path), ["MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS", "1"])
    model = train_net.Trainer.build_model(cfg)
    model.train()
    model.backbone.bottom_up.stem.eval()  # a module someone put in eval mode stays there
    modes = {name: module.training for name, module in model.named_modules()}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the quickstart model has BatchNorm layers"
    running = [m.running_mean.clone() for m in norms]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda module, args: seen.append(module.training)) for m in norms]
    dataset = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    calls = []
    monkeypatch.setattr(DatasetCatalog, "get", lambda name: calls.append(name) or dataset)
    with EventStorage(0):
        used = prefill_feature_memory(cfg, model, dataset=dataset)
    for hook in hooks:
        hook.remove()
    assert used > 0 and int((model.roi_heads.memory.filled > 0).sum()) > 0
    assert seen and not any(seen)  # every BatchNorm ran in eval mode
    assert all(torch.equal(m.running_mean, r) for m, r in zip(norms, running))
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert calls == []  # the records given were used: no second load


def test_prefill_hook_reads_the_train_loaders_records(tiny_dataset, tmp_path, monkeypatch):
    """The hook takes the training records from the trainer's loader (already loaded by
    each process), not from a second DatasetCatalog load, and pre-fills with the same
    images."""
    import train_net
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from eqlosses_d2 import prefill

    cfg = _loce_cfg(tiny_dataset, str(tmp_path), ["MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS", "2"])
    trainer = train_net.Trainer(cfg)
    records = prefill.loader_dataset(trainer.data_loader)
    assert records is not None and len(records) > 0
    catalog = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    num_classes = trainer.model.roi_heads.num_classes
    ids = lambda ds, idx: [ds[i]["image_id"] for i in idx]  # noqa: E731
    assert ids(records, prefill.prefill_image_indices([records[i] for i in range(len(records))], num_classes, 2)) == \
        ids(catalog, prefill.prefill_image_indices(catalog, num_classes, 2))
    calls = []
    original_get = DatasetCatalog.get
    monkeypatch.setattr(DatasetCatalog, "get", lambda name: calls.append(name) or original_get(name))
    hook = prefill.MemoryPrefillHook(cfg)
    hook.trainer = trainer
    with EventStorage(0):
        hook.before_train()
    assert calls == [] and int((trainer.model.roi_heads.memory.filled > 0).sum()) > 0
