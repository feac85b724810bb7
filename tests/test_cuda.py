"""Checks that need a CUDA device (skipped without one; ``bash tools/gpu_check.sh`` runs
them on a GPU machine): the losses on CUDA, in float32 and under AMP, against the CPU; a
training run with AMP; the dense losses' peak memory under the GPU policy."""
import pytest
import torch

from test_gpu_check import _gpu_check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_losses_on_cuda_match_the_cpu():
    rows = _gpu_check().check_losses(torch.device("cuda"), smoke=False, size=(2048, 1203))
    table = [r for r in rows if r.startswith("| ") and not r.startswith("| loss")]
    assert len(table) >= 2 * 12  # every loss, fp32 and AMP
    failed = [r for r in table if r.rstrip().endswith("FAIL |")]
    assert not failed, "\n".join(failed)


def test_training_with_amp_on_cuda(tmp_path):
    rows = _gpu_check().check_training(torch.device("cuda"), smoke=True, iters=3, out_dir=str(tmp_path))
    table = [r for r in rows if r.startswith("| ") and not r.startswith("| method")]
    assert table and not [r for r in table if r.rstrip().endswith("FAIL |")], "\n".join(table)


@pytest.mark.parametrize("name", ["focal", "efl"])
def test_dense_loss_peak_memory_on_cuda(name):
    """Issue 17 item 3: the fused dense losses stay within 2 float32 copies of the logits
    (the gradient they leave included) at 100k anchors x 1203 classes."""
    from eqlosses_d2 import losses as L

    num_anchors, num_classes = 100_000, 1203
    logits = torch.randn(num_anchors, num_classes, device="cuda") * 2 - 4
    labels = torch.full((num_anchors,), num_classes, device="cuda")
    labels[:1000] = torch.randint(0, num_classes, (1000,), device="cuda")
    loss = L.build_dense_loss(name, num_classes).cuda().train()
    x = logits.clone().requires_grad_()
    sum(loss(x, labels, normalizer=1000.0).values()).backward()  # warm-up
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sum(loss(x, labels, normalizer=1000.0).values()).backward()
    torch.cuda.synchronize()
    copies = (torch.cuda.max_memory_allocated() - base) / (logits.numel() * 4)
    assert copies <= 2.0, f"{name}: peak extra memory {copies:.2f} float32 copies of the logits"
