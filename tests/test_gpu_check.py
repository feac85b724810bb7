"""tools/gpu_check.py, the GPU check no CI machine runs, keeps working: its smoke run
(every section on the CPU at toy sizes; the losses compared between the CPU policy and the
GPU policy forced on the CPU) writes its tables and passes every row."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_run(tmp_path):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "gpu_check.md").read_text()
    from eqlosses_d2 import losses as L

    for name in list(gpu_check._registry_names(L.LOSS_REGISTRY)) + ["efl", "focal"]:
        assert f"| {name} | fp32 |" in report  # every loss compared
    for title in ("### Losses on cpu (GPU policy forced)", "### Dense losses", "### Fixed-AP inference", "### Training"):
        assert title in report
    assert "| EFL FCOS | 3 |" in report  # a one-stage run of 3 iterations
    assert "FAIL" not in report and "error" not in report


def test_lvis_retinanet_anchor_count():
    # 1333x800, strides 8..128, 9 anchors: (167*100 + 84*50 + 42*25 + 21*13 + 11*7) * 9 per image
    assert _gpu_check().lvis_retinanet_anchors(2) == 2 * 22300 * 9


def test_same_draws_makes_stochastic_losses_comparable():
    """Federated's and DropLoss's draws are device-independent inside same_draws (so the
    GPU check compares them to rounding), and restored after it."""
    import torch

    from eqlosses_d2.losses import gumbel

    gpu_check = _gpu_check()
    before = (torch.multinomial, gumbel.exceeds_uniform)
    with gpu_check.same_draws():
        a = torch.multinomial(torch.ones(50), 10), gumbel.exceeds_uniform(4, 6, 0.5, "cpu")
    with gpu_check.same_draws():
        b = torch.multinomial(torch.ones(50), 10), gumbel.exceeds_uniform(4, 6, 0.5, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (torch.multinomial, gumbel.exceeds_uniform) == before
