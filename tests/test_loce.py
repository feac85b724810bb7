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
