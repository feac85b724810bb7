"""Issue 23 under DDP (2 gloo processes on the CPU): a run killed between its last periodic
checkpoint and model_final.pth, resumed, writes the model_final.pth and per-rank state
the uninterrupted run wrote; an input error met by the workers ends in one line, exit
status 2, no traceback."""
import os
import shutil

import pytest
import torch

import train_net
from eqlosses_d2.compat import launch

from test_faults import PERIOD, _train_opts
from test_training import QUICKSTART, _assert_same

WORLD_SIZE = 2
MAX_ITER = PERIOD  # one periodic checkpoint, after the last iteration: resume at MAX_ITER


def _register(prefix, data_root):
    from eqlosses_d2.data import TINY_SPEC, register_synthetic_lvis

    register_synthetic_lvis(prefix, TINY_SPEC, root=data_root)  # a spawned process starts bare


def _full_then_resumed(prefix, data_root, full_argv, resumed_argv, full, resumed):
    import detectron2.utils.comm as comm

    _register(prefix, data_root)
    train_net.main(train_net.default_argument_parser().parse_args(full_argv))
    if comm.is_main_process():
        last = f"model_{MAX_ITER - 1:07d}.pth"
        os.makedirs(resumed)
        for name in (last, last + ".rank1"):  # killed before model_final.pth was written
            shutil.copy(os.path.join(full, name), os.path.join(resumed, name))
        with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
            f.write(last)
    comm.synchronize()
    train_net.main(train_net.default_argument_parser().parse_args(resumed_argv))


def test_resume_at_max_iter_writes_model_final_per_rank(tiny_dataset, tmp_path):
    prefix = tiny_dataset["train"][: -len("_train")]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = ["--config-file", QUICKSTART, "--num-gpus", str(WORLD_SIZE)]
    launch(
        _full_then_resumed, WORLD_SIZE, dist_url="auto",
        args=(prefix, tiny_dataset["root"], argv + _train_opts(tiny_dataset, full, max_iter=MAX_ITER),
              argv + ["--resume"] + _train_opts(tiny_dataset, resumed, max_iter=MAX_ITER), str(full), str(resumed)),
    )
    for name in ("model_final.pth", "model_final.pth.rank1"):
        expected = torch.load(full / name, map_location="cpu", weights_only=True)
        written = torch.load(resumed / name, map_location="cpu", weights_only=True)
        _assert_same(expected, written, name)
    assert (resumed / "last_checkpoint").read_text() == "model_final.pth"


def _register_then_worker(prefix, data_root, argv):
    _register(prefix, data_root)
    train_net.worker(train_net.default_argument_parser().parse_args(argv))


def test_input_error_in_the_workers_is_one_line(tiny_dataset, tmp_path, capfd):
    weights = tmp_path / "unrelated.pth"
    torch.save({"model": {"backbone.something": torch.zeros(3)}}, weights)
    prefix = tiny_dataset["train"][: -len("_train")]
    argv = ["--config-file", QUICKSTART, "--num-gpus", str(WORLD_SIZE), "--eval-only"] + _train_opts(
        tiny_dataset, tmp_path / "eval") + ["MODEL.WEIGHTS", str(weights)]
    capfd.readouterr()
    try:
        with pytest.raises(torch.multiprocessing.ProcessExitedException) as raised:
            launch(_register_then_worker, WORLD_SIZE, dist_url="auto", args=(prefix, tiny_dataset["root"], argv))
    finally:
        marker = train_net._error_marker(os.getpid())
        if os.path.exists(marker):
            os.remove(marker)
    assert raised.value.exit_code == 2  # what cli() turns into its exit status 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train_net.py: error:")]
    assert len(lines) == 1, err
    assert str(weights) in lines[0] and "evaluation refuses it" in lines[0]
    assert "Traceback" not in err
