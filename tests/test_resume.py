"""--resume continues exactly: weights, class statistics and method state equal an
uninterrupted run (NUM_WORKERS = 0, one aspect-ratio group: see eqlosses_d2/resume.py)."""
import shutil

import pytest
import torch

import train_net
from eqlosses_d2.losses import LOSS_REGISTRY, required_opts

from test_training import QUICKSTART, _opts, _run

# every registered loss whose module keeps state in buffers, plus the baseline
STATEFUL = sorted(
    name for name, cls in dict(LOSS_REGISTRY).items() if any(True for _ in cls(4).buffers()) or name == "softmax"
)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("loss", STATEFUL)
def test_resume_matches_uninterrupted_run(loss, tiny_dataset, tmp_path):
    def opts(out):
        return _opts(tiny_dataset, out, max_iter=6) + [
            "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()", "MODEL.EQLOSSES.LOSS", loss,
        ] + required_opts(loss)  # CDB-S: its sampler

    full = tmp_path / "full"
    _run(["--config-file", QUICKSTART] + opts(full))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    _run(["--config-file", QUICKSTART, "--resume"] + opts(resumed))

    a, b = _state(full / "model_final.pth"), _state(resumed / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 5
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # and the run really moved on from the checkpoint
    mid = _state(full / "model_0000002.pth")["model"]
    assert not torch.equal(mid["roi_heads.box_predictor.cls_score.weight"], a["model"]["roi_heads.box_predictor.cls_score.weight"])
