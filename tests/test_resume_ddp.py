"""--resume under DDP is exact per rank (2 gloo processes on the CPU): a run of 4
iterations and the same run resumed from its checkpoint after iteration 2 end with the
same weights, optimizer and method state on each rank, every rank's random number
generators are at the same state before every resumed iteration as in the uninterrupted
run, and the two ranks' generators differ from each other after the resume as before it.
A rank that lacks its per-rank state, or that finds another checkpoint, stops the run with
one error; a checkpoint of another world size resumes re-seeded, with a warning."""
import hashlib
import os
import random
import shutil

import numpy as np
import pytest
import torch

import train_net
from eqlosses_d2.compat import launch

from test_training import QUICKSTART, _assert_same, _opts

WORLD_SIZE = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs", "quickstart", "efl_retinanet_R18_FPN_synthetic.yaml")
MAX_ITER, STOP_AFTER = 4, 2  # checkpoints after iterations 1 and 3 (period 2): resume at 2

# name -> (config, extra options); each keeps method state in buffers (LOCE also per rank)
CASES = {
    "eqlv2": (QUICKSTART, ["MODEL.EQLOSSES.LOSS", "eqlv2"]),
    "seesaw": (QUICKSTART, ["MODEL.EQLOSSES.LOSS", "seesaw"]),
    "federated": (QUICKSTART, ["MODEL.EQLOSSES.LOSS", "federated"]),
    "loce": (QUICKSTART, [
        "MODEL.ROI_HEADS.NAME", "LongTailLOCEROIHeads", "MODEL.EQLOSSES.LOSS", "equilibrium",
        "MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS", "1",
    ]),
    "efl": (RETINANET, ["MODEL.EQLOSSES.ONE_STAGE.LOSS", "efl"]),
}


def _fingerprint():
    """A digest of this process's Python, numpy and torch RNG states (reading them draws nothing)."""
    digest = hashlib.sha1()
    digest.update(repr(random.getstate()).encode())
    digest.update(np.random.get_state()[1].tobytes())
    digest.update(torch.get_rng_state().numpy().tobytes())
    return digest.hexdigest()


def _argv(case, tiny_dataset_info, out, resume=False):
    config, extra = CASES[case]
    spec_classes, opts = tiny_dataset_info
    opts = list(opts) + ["OUTPUT_DIR", str(out), "MODEL.RETINANET.NUM_CLASSES", str(spec_classes)] + extra
    return ["--config-file", config, "--num-gpus", str(WORLD_SIZE)] + (["--resume"] if resume else []) + opts


def _train(argv):
    """One rank: train, recording the RNG fingerprint before every iteration; returns what
    the test compares."""
    import detectron2.utils.comm as comm
    from detectron2.engine import HookBase

    fingerprints = {}

    class Record(HookBase):
        def before_step(self):
            fingerprints[self.trainer.iter] = _fingerprint()

    args = train_net.default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    extra = {}
    if hasattr(model.roi_heads, "memory") if hasattr(model, "roi_heads") else False:
        extra = model.roi_heads.memory.state_dict()  # the written slots only
        assert extra["filled"].sum() > 0 and extra["features"].shape[0] == int(extra["filled"].sum())
    return {
        "rank": comm.get_rank(),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "fingerprints": fingerprints,
        "memory": extra,
    }


def _copy_checkpoint(src, dst, iteration):
    name = f"model_{iteration:07d}.pth"
    dst.mkdir(parents=True, exist_ok=True)
    for f in os.listdir(src):
        if f.startswith(name):  # the checkpoint and its per-rank states
            shutil.copy(src / f, dst / f)
    (dst / "last_checkpoint").write_text(name)


def _study(cases, dataset_info, prefix, data_root, out_dir):
    """Every rank: for each case, the full run, then the resumed one; then the failures."""
    import pathlib

    import detectron2.utils.comm as comm
    from eqlosses_d2.data import TINY_SPEC, register_synthetic_lvis
    from eqlosses_d2.resume import ResumeError

    register_synthetic_lvis(prefix, TINY_SPEC, root=data_root)  # a spawned process starts bare
    out_dir = pathlib.Path(out_dir)
    rank = comm.get_rank()
    results = {}
    for case in cases:
        full, resumed = out_dir / case / "full", out_dir / case / "resumed"
        results[case] = {"full": _train(_argv(case, dataset_info, full))}
        if rank == 0:
            _copy_checkpoint(full, resumed, STOP_AFTER - 1)
        comm.synchronize()
        results[case]["resumed"] = _train(_argv(case, dataset_info, resumed, resume=True))
        comm.synchronize()
        if rank == 0 and case != cases[0]:  # only the first case's files are read again (disk: ~1 GB a case)
            shutil.rmtree(out_dir / case, ignore_errors=True)
    case = cases[0]
    # a rank without its per-rank state
    missing = out_dir / "missing"
    if rank == 0:
        _copy_checkpoint(out_dir / case / "full", missing, STOP_AFTER - 1)
        os.remove(missing / f"model_{STOP_AFTER - 1:07d}.pth.rank1")
    comm.synchronize()
    # a rank that sees another OUTPUT_DIR (storage not shared between machines)
    unshared = out_dir / ("unshared" if rank == 0 else "unshared_rank1")
    if rank == 0:
        _copy_checkpoint(out_dir / case / "full", unshared, STOP_AFTER - 1)
    comm.synchronize()
    for name, directory in (("missing", missing), ("unshared", unshared)):
        try:
            _train(_argv(case, dataset_info, directory, resume=True))
            results[name] = None
        except ResumeError as e:
            results[name] = str(e)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def study(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_ddp")
    prefix = tiny_dataset["train"][: -len("_train")]
    opts = _opts(tiny_dataset, out, max_iter=MAX_ITER) + [
        "SOLVER.CHECKPOINT_PERIOD", str(STOP_AFTER), "DATASETS.TEST", "()", "SOLVER.WARMUP_ITERS", "2",
    ]
    info = (tiny_dataset["spec"].num_categories, opts)
    launch(_study, WORLD_SIZE, dist_url="auto", args=(list(CASES), info, prefix, tiny_dataset["root"], str(out)))
    yield out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    shutil.rmtree(out, ignore_errors=True)  # the first case's checkpoints and the ranks' results, ~3 GB


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_exact_per_rank(study, case):
    out, ranks = study
    for rank, result in enumerate(ranks):
        full, resumed = result[case]["full"], result[case]["resumed"]
        # the resumed run ran iterations 2 and 3, each rank from its own RNG states
        assert sorted(resumed["fingerprints"]) == list(range(STOP_AFTER, MAX_ITER))
        for it in range(STOP_AFTER, MAX_ITER):
            assert resumed["fingerprints"][it] == full["fingerprints"][it], (case, rank, it)
        _assert_same(full["model"], resumed["model"], f"{case} rank {rank} model")
        _assert_same(full["optimizer"], resumed["optimizer"], f"{case} rank {rank} optimizer")
        _assert_same(full["memory"], resumed["memory"], f"{case} rank {rank} LOCE queues")
    # the two ranks draw different numbers, before the resume and after it
    for run in ("full", "resumed"):
        prints = [ranks[r][case][run]["fingerprints"] for r in range(WORLD_SIZE)]
        for it in prints[0]:
            assert prints[0][it] != prints[1][it], (case, run, it)
    if case == "loce":  # per-rank method state: each process filled its own queues
        assert not torch.equal(ranks[0][case]["full"]["memory"]["filled"], ranks[1][case]["full"]["memory"]["filled"]) \
            or not torch.equal(ranks[0][case]["full"]["memory"]["features"], ranks[1][case]["full"]["memory"]["features"])


def test_resume_files(study):
    out, _ = study
    full = out / "eqlv2" / "full"
    files = sorted(os.listdir(full))
    # every checkpoint has rank 1's state beside it; rank 0's is inside the checkpoint
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth"):
        assert name in files and name + ".rank1" in files
        checkpoint = torch.load(full / name, map_location="cpu", weights_only=True)
        state1 = torch.load(full / (name + ".rank1"), map_location="cpu", weights_only=True)
        assert checkpoint["rank_state"]["rank"] == 0 and state1["rank"] == 1
        assert checkpoint["rank_state"]["world_size"] == state1["world_size"] == WORLD_SIZE
        assert checkpoint["rank_state"]["checkpoint"] == state1["checkpoint"] == name
        assert checkpoint["rank_state"]["iteration"] == state1["iteration"] == checkpoint["iteration"]
        assert not torch.equal(checkpoint["rank_state"]["rng"]["torch"], state1["rng"]["torch"])
    assert not [f for f in files if f.endswith(".part")]


def test_resume_refuses_missing_or_unshared_state(study):
    _, ranks = study
    for result in ranks:  # every rank stops, with the same one line
        assert "rank 1: per-rank state" in result["missing"] and "is missing" in result["missing"]
        assert "\n" not in result["missing"]
        assert "rank 1 found no checkpoint" in result["unshared"]
        assert "storage all machines share" in result["unshared"]


def test_resume_from_another_world_size_reseeds(study, tiny_dataset, tmp_path, caplog):
    """A 2-process checkpoint resumed by one process: re-seeded from (SEED, rank,
    iteration), with a warning, and training goes on."""
    import logging

    from test_training import _run

    out, _ = study
    _copy_checkpoint(out / "eqlv2" / "full", tmp_path, STOP_AFTER - 1)
    opts = _opts(tiny_dataset, tmp_path, max_iter=MAX_ITER) + [
        "SOLVER.CHECKPOINT_PERIOD", str(STOP_AFTER), "DATASETS.TEST", "()", "SOLVER.WARMUP_ITERS", "2",
        "MODEL.EQLOSSES.LOSS", "eqlv2",
    ]
    with caplog.at_level(logging.WARNING, logger="eqlosses_d2.resume"):
        _run(["--config-file", QUICKSTART, "--resume"] + opts)
    assert any("written with 2 processes and this run has 1" in r.getMessage() for r in caplog.records)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == MAX_ITER - 1 and final["rank_state"]["world_size"] == 1
