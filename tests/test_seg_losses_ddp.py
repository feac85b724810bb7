"""
The pixel losses' state on two processes (gloo on the CPU): Softmax-EQL's gradient statistics and
Seesaw's cumulative pixel counts after three steps, each rank with other images (other sizes,
other ignored pixels, one rank's batch all ignored at step 2), are identical on both ranks and
equal the single-process sums of the hand references of tests/test_seg_losses.py; each rank's loss
and gradient equal the reference computed with the global state (Softmax-EQL: the margins from
both ranks' statistics before the step; Seesaw: the mitigation from both ranks' pixels counted
before the loss); under the CPU and the GPU device policy.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eqlosses_d2.losses import base as losses_base
from eqlosses_d2.segmentation.losses import PIXEL_LOSS_REGISTRY

from test_seg_losses import C, IGNORE, EQLReference, SeesawReference, Stats, _assert_close, _batch, _run

STEPS = 3
SEESAW_COUNTS = [20000.0, 800.0, 50.0, 2.0, 0.0]


def _rank_batches(rank):
    """Rank 0: two 3 x 4 images a step; rank 1: one 5 x 3 image, all ignored at step 2."""
    batches = []
    for step in range(STEPS):
        if rank == 0:
            batches.append(_batch(100 + step, num_images=2, height=3, width=4, spread=3.0))
        else:
            logits, targets = _batch(200 + step, num_images=1, height=5, width=3, spread=4.0)
            if step == 1:
                targets[:] = IGNORE
            batches.append((logits, targets))
    return batches


def _losses():
    seesaw = PIXEL_LOSS_REGISTRY.get("seesaw")(C, class_stats=Stats()).train()
    seesaw.cumulative_count.copy_(torch.tensor(SEESAW_COUNTS, dtype=torch.float64))
    return {"softmax_eql": PIXEL_LOSS_REGISTRY.get("softmax_eql")(C, class_stats=Stats()).train(), "seesaw": seesaw}


def _worker(rank, tmp_dir, policy):
    torch.set_num_threads(1)
    losses_base.DEVICE_POLICY = policy
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=2)
    try:
        results = {}
        for name, loss in _losses().items():
            steps = [_run(loss, logits, targets) for logits, targets in _rank_batches(rank)]
            results[name] = {"state": {k: v.clone() for k, v in loss.state_dict().items()}, "steps": steps}
        torch.save(results, os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("policy", ["auto", "gpu"])
def test_two_processes_share_the_pixel_statistics(tmp_path, policy):
    mp.spawn(_worker, args=(str(tmp_path), policy), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    batches = [_rank_batches(rank) for rank in range(2)]

    eql, seesaw = EQLReference(), SeesawReference(counts=SEESAW_COUNTS)
    for step in range(STEPS):
        # Softmax-EQL: each rank's loss with the statistics of both before the step, then both added
        contributions = [eql.contributions(*batches[rank][step]) for rank in range(2)]
        for rank in range(2):
            value, grad = ranks[rank]["softmax_eql"]["steps"][step]
            _assert_close(value, grad, contributions[rank][0], contributions[rank][1])
        for _, _, pos, neg in contributions:
            eql.add(pos, neg)
        # Seesaw: both ranks' valid pixels counted, then each rank's loss
        for rank in range(2):
            seesaw.count(batches[rank][step][1])
        for rank in range(2):
            value, grad = ranks[rank]["seesaw"]["steps"][step]
            _assert_close(value, grad, *seesaw.loss(*batches[rank][step]), rtol=1e-5)
    assert float(ranks[1]["softmax_eql"]["steps"][1][0]) == 0.0  # the all-ignored batch

    for name in ("softmax_eql", "seesaw"):
        state0, state1 = ranks[0][name]["state"], ranks[1][name]["state"]
        for key in state0:
            assert torch.equal(state0[key], state1[key]), (name, key)
    state = ranks[0]["softmax_eql"]["state"]
    for key, expected in (("pos_grad", eql.pos), ("neg_grad", eql.neg), ("pos_neg", eql.pos_neg)):
        torch.testing.assert_close(state[key], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9,
                                   msg=key)
    counts = ranks[0]["seesaw"]["state"]["cumulative_count"]
    assert torch.equal(counts, torch.tensor(seesaw.counts, dtype=torch.float64))
    valid = sum(int((targets != IGNORE).sum()) for rank in range(2) for _, targets in batches[rank])
    assert float(counts.sum()) == sum(SEESAW_COUNTS) + valid
