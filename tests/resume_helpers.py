"""What the stop-and-resume tests of the training tasks share: run a schedule once straight through,
once from one of its checkpoints with ``--resume``, and compare the final checkpoints."""
import shutil

import torch


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_and_compare(run, argv_for, tmp_path, checkpoint="model_0000002.pth", iteration=5):
    """``run(argv)`` trains; ``argv_for(out_dir)`` is the command line writing into ``out_dir``. Trains
    ``full`` straight through, then ``resumed`` from ``full``'s ``checkpoint`` with ``--resume``; asserts
    both final checkpoints are at ``iteration`` with every model tensor equal. Returns (final state
    dict of the full run, model state dict of ``checkpoint``) for the caller's own checks."""
    full = tmp_path / "full"
    run(argv_for(full))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / checkpoint, resumed / checkpoint)
    (resumed / "last_checkpoint").write_text(checkpoint)
    run(["--resume"] + argv_for(resumed))
    a, b = load_checkpoint(full / "model_final.pth"), load_checkpoint(resumed / "model_final.pth")
    assert a["iteration"] == b["iteration"] == iteration
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    return a, load_checkpoint(full / checkpoint)["model"]
