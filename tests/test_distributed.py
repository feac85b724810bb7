"""Two training processes on the CPU (gloo, ``train_net.py --num-gpus 2`` without a GPU):
the method state is global (all-reduced every iteration, Detectron2's DDP does not
broadcast buffers) and identical on both ranks, the weights stay identical, and the LVIS
evaluation gathers both ranks' predictions."""
import math

import pytest
import torch

import train_net
from eqlosses_d2.compat import launch
from eqlosses_d2.losses import required_opts

from test_training import QUICKSTART, _opts

WORLD_SIZE = 2


def _train_and_dump(argv, prefix, data_root, dump_dir):
    """One rank: train with train_net's Trainer, record the labels the classification loss
    saw on this rank, and save this rank's model and method state."""
    import detectron2.utils.comm as comm
    from eqlosses_d2.data import TINY_SPEC, register_synthetic_lvis

    register_synthetic_lvis(prefix, TINY_SPEC, root=data_root)  # a spawned process starts bare
    args = train_net.default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    loss = model.roi_heads.box_predictor.cls_loss
    seen = torch.zeros(loss.num_classes + 1, dtype=torch.float64)

    def record(module, inputs):
        labels = inputs[1]
        seen.add_(torch.bincount(labels, minlength=loss.num_classes + 1).double())

    loss.register_forward_pre_hook(record)
    trainer.resume_or_load(resume=False)
    trainer.train()
    torch.save(
        {
            "world_size": comm.get_world_size(),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "seen": seen,
            "results": getattr(trainer, "_last_eval_results", None),
        },
        f"{dump_dir}/rank{comm.get_rank()}.pt",
    )


@pytest.mark.parametrize("name, evaluate", [("seesaw", True), ("eqlv2", False), ("cdb_s", False)])
def test_two_cpu_processes_share_method_state(name, evaluate, tiny_dataset, tmp_path):
    prefix = tiny_dataset["train"][: -len("_train")]
    opts = _opts(tiny_dataset, tmp_path, max_iter=4) + ["MODEL.EQLOSSES.LOSS", name] + required_opts(name)
    if name == "cdb_s":  # windows of 2 steps: the ranks draw window 1 by the weights both measured
        opts += ["MODEL.EQLOSSES.CDB_S.UPDATE_PERIOD", "2", "MODEL.EQLOSSES.CDB_S.SAMPLER_LAG", "1"]
    if not evaluate:
        opts += ["DATASETS.TEST", "()"]
    argv = ["--config-file", QUICKSTART, "--num-gpus", str(WORLD_SIZE)] + opts
    launch(
        _train_and_dump,
        WORLD_SIZE,
        dist_url="auto",
        args=(argv, prefix, tiny_dataset["root"], str(tmp_path)),
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    # the ranks trained on different images (sharded sampler) ...
    assert not torch.equal(ranks[0]["seen"], ranks[1]["seen"])
    # ... yet hold the same weights and the same method state
    state0, state1 = ranks[0]["model"], ranks[1]["model"]
    assert state0.keys() == state1.keys()
    for key in state0:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # plain BatchNorm statistics are per process, as in Detectron2
        assert torch.equal(state0[key], state1[key]), key
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    num_classes = seen.numel() - 1
    predictor = "roi_heads.box_predictor.cls_loss."
    if name == "cdb_s":
        # one closed window (steps 1-2) and the second (steps 3-4) closed too: counts reset
        assert int(state0[predictor + "num_steps"]) == 4 and float(state0[predictor + "window_count"].sum()) == 0
        assert not torch.equal(state0[predictor + "previous_class_weights"], state0[predictor + "class_weights"])
    elif name == "seesaw":
        # the global count of sampled positives of each class: both ranks' labels
        counts = state0[predictor + "cumulative_count"]
        assert torch.equal(counts, seen[:num_classes])
        assert counts.sum() > 0
    else:
        # identical on both ranks (above) although each rank's own gradients differ
        pos = state0[predictor + "gradient_stats.pos_grad"]
        assert pos.dtype == torch.float64 and bool((pos[seen[:num_classes] > 0] > 0).all())
    if evaluate:
        results = ranks[0]["results"]
        for task in ("bbox", "segm"):
            ap = results[task]["AP"]
            assert math.isnan(ap) or 0.0 <= ap <= 100.0
