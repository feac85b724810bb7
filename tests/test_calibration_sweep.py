"""The calibration sweep is single-process: the tool refuses --num-gpus > 1 (and a
multi-process launch), the function refuses a process group of several processes; both in
one line."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("calibration_sweep_tool", os.path.join(ROOT, "tools", "calibration_sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("argv, env, named", [
    (["--num-gpus", "2"], {}, "--num-gpus 2"),
    ([], {"WORLD_SIZE": "8"}, "WORLD_SIZE=8"),
])
def test_tool_refuses_several_processes(argv, env, named, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_R18_FPN_synthetic.yaml")
    assert _tool().main(["--config-file", config] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"calibration_sweep.py: error: {named}: the sweep runs in one process (one network pass, "
                   f"every setting evaluated in it); run it with one GPU")


def test_sweep_refuses_a_process_group(monkeypatch):
    from detectron2.utils import comm

    from eqlosses_d2.evaluation.calibration_sweep import calibration_sweep

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process, not in 2"):
        calibration_sweep(None, None, "any", "norcal", [0.0])
