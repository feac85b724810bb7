"""
The fused, row-chunked loss computations (``eqlosses_d2.losses.fused`` and the losses built
on it): against float64 autograd through the plain formulas, across chunk boundaries
(``CHUNK_ELEMENTS`` made small so that a batch spans many chunks, with the positives and
the dropped terms spread over them), and with an output gradient other than 1 (the
backward multiplication that a gradient of exactly 1 skips on the CPU).
"""
import types

import pytest
import torch
from torch.nn import functional as F

from eqlosses_d2.losses import build_loss, fused
from eqlosses_d2.losses.base import tail_class_mask

C = 12
ROWS = 203  # 16-row chunks below: 13 chunks, the last one partial


def _stats():
    g = torch.Generator().manual_seed(1)
    image_count = torch.randint(1, 300, (C,), generator=g)
    image_count[:5] = torch.tensor([1, 2, 3, 4, 5])  # tail classes under λ = 0.0011 (of 10000 images)
    return types.SimpleNamespace(
        image_count=image_count,
        instance_count=image_count * 3,
        frequency_group=torch.randint(0, 3, (C,), generator=g),
        num_images=torch.tensor(12000),
        num_images_with_annotations=torch.tensor(10000),
        is_set=torch.tensor(True),
    )


def _batch(num_logits, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, num_logits, generator=g) * 3
    labels = torch.randint(0, C, (ROWS,), generator=g)
    labels[torch.rand(ROWS, generator=g) < 0.6] = C  # background
    labels[:3] = torch.tensor([C, 0, 4])  # a background row and tail positives in the first chunk
    return logits, labels


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 16 * (C + 2))
    return fused


def _run(loss, logits, labels, output_grad=1.0, **context):
    x = logits.clone().requires_grad_()
    values = loss(x, labels, **context)
    (sum(values.values()) * output_grad).backward()
    return {k: v.detach().double() for k, v in values.items()}, x.grad.double()


def _reference(fn, logits, output_grad=1.0):
    """Value and gradient of ``fn`` (a formula in float64, through autograd)."""
    z = logits.double().requires_grad_()
    value = fn(z)
    (value * output_grad).backward()
    return value.detach(), z.grad


def test_chunks_cover_the_rows(small_chunks):
    chunks = fused.row_chunks(torch.empty(ROWS, C + 2))
    assert chunks[0] == (0, 16) and chunks[-1] == (192, ROWS) and len(chunks) == 13
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    rows = torch.tensor([0, 5, 16, 17, 100, 202])
    assert fused.rows_in_chunks(rows, chunks)[:2] == [(0, 2), (2, 4)]
    assert sum(b - a for a, b in fused.rows_in_chunks(rows, chunks)) == rows.numel()
    assert fused.row_ranges(5, 3, "cpu") == [(0, 5)]


def test_softmax_in_place_matches_log_softmax():
    x = torch.randn(7, 9) * 30  # large logits: the max shift matters
    buffer = x.clone()
    lse = fused.softmax_(buffer, scale=0.25)
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=1))
    torch.testing.assert_close(buffer, torch.softmax(x, dim=1) * 0.25)


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_shift", [False, True])
def test_affine_softmax_cross_entropy(small_chunks, with_scale, with_shift):
    logits, labels = _batch(C + 1)
    g = torch.Generator().manual_seed(9)
    scale = torch.rand(C + 1, generator=g) * 3 if with_scale else None
    shift = torch.randn(C + 1, generator=g) if with_shift else None
    x = logits.clone().requires_grad_()
    value = fused.affine_softmax_cross_entropy(x, labels, scale, shift)
    (value * 1.5).backward()

    def formula(z):
        z = z * scale.double() if with_scale else z
        return F.cross_entropy(z + shift.double() if with_shift else z, labels)

    expected, grad = _reference(formula, logits, 1.5)
    torch.testing.assert_close(value.detach().double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("output_grad", [1.0, 2.5])
def test_weighted_sigmoid_bce(small_chunks, output_grad):
    logits, labels = _batch(C)
    g = torch.Generator().manual_seed(2)
    bg_weight, fg_weight = torch.rand(C, generator=g), torch.rand(C, generator=g)
    x = logits.clone().requires_grad_()
    (fused.weighted_sigmoid_bce(x, labels, bg_weight, fg_weight) * output_grad).backward()
    value = fused.weighted_sigmoid_bce(logits, labels, bg_weight, fg_weight)

    target = F.one_hot(labels, C + 1)[:, :C].double()
    row_weight = torch.where((labels < C)[:, None], fg_weight.double(), bg_weight.double())
    weight = torch.where(target > 0, torch.ones_like(target), row_weight)
    expected, grad = _reference(
        lambda z: (F.binary_cross_entropy_with_logits(z, target, reduction="none") * weight).sum() / ROWS,
        logits, output_grad)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-8)


def _margins(shift, labels):
    """Softmax-EQL's margins: a_j − a_y on a foreground RoI's foreground logits j (0 at j = y),
    nothing on its background logit or on a background RoI."""
    row = torch.where(labels < C, shift[labels.clamp(max=C - 1)], torch.zeros((), dtype=torch.float64))
    margins = (shift[None, :] - row[:, None]) * (labels < C).double()[:, None]
    margins[:, C] = 0.0
    return margins


def _softmax_reference(name, loss, logits, labels):
    """The plain formula of each softmax-family loss, as autograd sees it."""
    if name == "iif":
        weights = loss.logit_weights().double()
        return lambda z: F.cross_entropy(z * weights, labels)
    if name == "equilibrium":
        shift = loss.mean_score.double().log()
        return lambda z: F.cross_entropy(z + shift, labels)
    if name == "softmax_eql":
        shift = torch.cat([loss.logit_shifts().double(), torch.zeros(1, dtype=torch.float64)])
        return lambda z: F.cross_entropy(z + _margins(shift, labels), labels)
    raise AssertionError(name)


@pytest.mark.parametrize("output_grad", [1.0, 3.0])
@pytest.mark.parametrize("name", ["iif", "equilibrium", "softmax_eql"])
def test_softmax_family_across_chunks(small_chunks, name, output_grad):
    stats = _stats()
    loss = build_loss(name, C, class_stats=stats)
    logits, labels = _batch(loss.num_logits)
    context = {}
    if name == "equilibrium":
        loss.mean_score[:C] = torch.rand(C, generator=torch.Generator().manual_seed(3)) + 0.01
        loss.eval()  # no update: the shift is the state above
        context = {"instance_labels": labels[:0], "instance_means": torch.zeros(0)}
    if name == "softmax_eql":
        loss.gradient_stats.pos_grad.copy_(torch.rand(C, dtype=torch.float64) * 10)
        loss.eval()
    expected, grad = _reference(_softmax_reference(name, loss, logits, labels), logits, output_grad)
    values, ours = _run(loss, logits, labels, output_grad, **context)
    torch.testing.assert_close(values["loss_cls"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours, grad, rtol=1e-4, atol=1e-8)


def test_softmax_eql_statistics_across_chunks(small_chunks):
    loss = build_loss("softmax_eql", C)
    logits, labels = _batch(C + 1)
    loss.gradient_stats.pos_grad.copy_(torch.rand(C, dtype=torch.float64) * 10)
    before = loss.gradient_stats.pos_grad.clone()
    shift = torch.cat([loss.logit_shifts().double(), torch.zeros(1, dtype=torch.float64)])
    shifted = logits.double() + _margins(shift, labels)
    error = (torch.softmax(shifted, dim=1) - F.one_hot(labels, C + 1).double()).abs() / ROWS
    onehot = F.one_hot(labels, C + 1).double()
    loss(logits, labels)
    torch.testing.assert_close(loss.gradient_stats.pos_grad - before, (error * onehot).sum(0)[:C])
    torch.testing.assert_close(loss.gradient_stats.neg_grad, (error * (1 - onehot)).sum(0)[:C])


def test_pcb_across_chunks(small_chunks, monkeypatch):
    """PCB's fused soft-label loss: the same value, gradient and state in many chunks as in one."""
    results = []
    for elements in (16 * (C + 2), 1 << 30):
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", elements)
        loss = build_loss("pcb", C, start=0.0)
        logits, labels = _batch(C + 1, seed=4)
        loss(logits, labels, progress=0.0)  # every class seen: active from now on
        assert loss.is_active(0.5)
        values, grad = _run(loss, logits * 0.5, labels, 2.0, progress=0.5)
        results.append((values["loss_cls"], grad, loss.confusion.clone()))
    (v1, g1, m1), (v2, g2, m2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(m1, m2)


@pytest.mark.parametrize("output_grad", [1.0, 0.5])
def test_gumbel_losses_across_chunks(small_chunks, output_grad):
    """Gumbel BCE and DropLoss: many chunks give what one chunk gives (the same draw)."""
    stats = _stats()
    for name in ("gumbel", "gumbel_droploss", "eql", "federated"):
        results = []
        for elements in (16 * (C + 2), 1 << 30):
            small_chunks.CHUNK_ELEMENTS = elements
            loss = build_loss(name, C, class_stats=stats)
            logits, labels = _batch(loss.num_logits, seed=5)
            torch.manual_seed(7)
            results.append(_run(loss, logits, labels, output_grad))
        (v1, g1), (v2, g2) = results
        torch.testing.assert_close(v1["loss_cls"], v2["loss_cls"], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9, msg=name)


def test_droploss_compact_mask_matches_dense(small_chunks):
    stats = _stats()
    loss = build_loss("gumbel_droploss", C, class_stats=stats)
    logits, labels = _batch(C, seed=6)
    tail = tail_class_mask(stats, loss.tail_threshold)
    torch.manual_seed(8)
    compact = loss.drop_terms(labels, tail)
    dense = compact.dense()
    assert dense.shape == (ROWS, C)
    fg = labels < C
    assert (dense[fg] == tail).all()  # a foreground RoI drops every tail class (its positive is kept anyway)
    assert not dense[~fg][:, ~tail].any() and dense[~fg][:, tail].any()
    from eqlosses_d2.losses.gumbel import gumbel_bce_sum

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    v1, v2 = gumbel_bce_sum(x1, labels, compact), gumbel_bce_sum(x2, labels, dense)
    (v1 * 2).backward()
    (v2 * 2).backward()
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------------------------------------
# The GPU chunking policy (issue 17, item 3), forced on the CPU


@pytest.fixture
def gpu_policy(monkeypatch):
    from eqlosses_d2.losses import base

    monkeypatch.setattr(base, "DEVICE_POLICY", "gpu")
    return fused


@pytest.mark.parametrize("rows,cols,buffers", [(100000, 1203, 4), (8192, 1204, 1), (20000, 1203, 4), (2000, 80, 4),
                                               (7, 5, 4), (1, 1203, 1)])
def test_gpu_policy_chunks_are_bounded(gpu_policy, rows, cols, buffers):
    """Every chunk's buffers hold at most GPU_CHUNK_ELEMENTS entries (256 MB of float32) and
    at most one copy of the matrix (so the kernel's temporaries plus the gradient it hands to
    autograd stay within two copies), and the chunks cover the rows in order."""
    chunks = fused.row_ranges(rows, cols, "cpu", buffers)
    assert chunks[0][0] == 0 and chunks[-1][1] == rows and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, stop in chunks:
        assert (stop - start) * cols * buffers <= fused.GPU_CHUNK_ELEMENTS or stop - start == 1
        assert (stop - start) * buffers <= rows + buffers - 1  # at most ceil(rows / buffers) rows
    if (rows, cols, buffers) == (100000, 1203, 4):  # the LVIS RetinaNet batch: 8 chunks of 64 MB buffers
        assert len(chunks) == 8 and (chunks[0][1] * cols * 4) <= 64 << 20


def test_cpu_policy_chunks_are_unchanged():
    """The CPU policy keeps the cache-sized chunks (2 MB of float32 in all)."""
    assert fused.row_ranges(8192, 1204, "cpu") == [(s, min(s + 435, 8192)) for s in range(0, 8192, 435)]
    assert fused.row_ranges(100000, 1203, "cpu", 4)[0] == (0, 108)  # the focal kernel's 2^17 per buffer


def _dense_run(name, logits, labels, **kwargs):
    from eqlosses_d2.losses.dense import build_dense_loss

    loss = build_dense_loss(name, logits.shape[1])
    if name == "efl":  # statistics, so that the factors differ per class
        g = torch.Generator().manual_seed(13)
        loss.gradient_stats.pos_grad.copy_(torch.rand(logits.shape[1], dtype=torch.float64, generator=g))
        loss.gradient_stats.neg_grad.copy_(torch.rand(logits.shape[1], dtype=torch.float64, generator=g) + 0.5)
    x = logits.clone().requires_grad_()
    value = loss(x, labels, normalizer=7.0)["loss_cls"]
    value.backward()
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    return value.detach(), x.grad, state


@pytest.mark.parametrize("name", ["focal", "efl"])
def test_dense_losses_in_bounded_chunks_match_one_chunk(gpu_policy, monkeypatch, name):
    """Focal loss and EFL under the GPU policy with small chunks (many of them, positives in
    each) give the value, gradient and statistics of one chunk to float rounding (the
    per-chunk column sums are added in another order; the vectorized loops split rows
    differently)."""
    g = torch.Generator().manual_seed(11)
    num_classes = 9
    logits = torch.randn(301, num_classes, generator=g) * 3 - 2
    labels = torch.full((301,), num_classes)
    positive = torch.rand(301, generator=g) < 0.2
    labels[positive] = torch.randint(0, num_classes, (int(positive.sum()),), generator=g)
    monkeypatch.setattr(fused, "GPU_CHUNK_ELEMENTS", 4 * 16 * num_classes)
    assert len(fused.row_ranges(301, num_classes, "cpu", 4)) == 19
    v1, g1, s1 = _dense_run(name, logits, labels)
    monkeypatch.setattr(fused, "GPU_CHUNK_ELEMENTS", 1 << 40)
    assert len(fused.row_ranges(301, num_classes, "cpu", 4)) == 4  # at most a quarter of the rows
    v4, g4, s4 = _dense_run(name, logits, labels)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1 << 40)
    from eqlosses_d2.losses import base

    monkeypatch.setattr(base, "DEVICE_POLICY", "auto")
    assert len(fused.row_ranges(301, num_classes, "cpu", 4)) == 1
    v0, g0, s0 = _dense_run(name, logits, labels)
    for value, grad, state in ((v1, g1, s1), (v4, g4, s4)):
        torch.testing.assert_close(grad, g0, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(value, v0, rtol=1e-6, atol=0)
        for key in state:
            torch.testing.assert_close(state[key], s0[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["gumbel", "gumbel_droploss", "pcb", "eql", "iif", "softmax_eql"])
def test_gpu_policy_kernels_match_cpu_policy(small_chunks, monkeypatch, name):
    """The GPU policy's paths without host reads (the positives of a chunk located on the
    device, PCB's soft labels added after the chunks) give the CPU policy's values and
    gradients, across many chunks."""
    from eqlosses_d2.losses import base

    stats = _stats()
    results = []
    for policy in ("auto", "gpu"):
        monkeypatch.setattr(base, "DEVICE_POLICY", policy)
        monkeypatch.setattr(fused, "GPU_CHUNK_ELEMENTS", 16 * (C + 2))
        loss = build_loss(name, C, class_stats=stats, **({"start": 0.0} if name == "pcb" else {}))
        logits, labels = _batch(loss.num_logits, seed=12)
        if name == "pcb":
            loss(logits, labels, progress=0.0)  # every class seen
        drop = None
        if name == "gumbel_droploss":  # the same drop mask under both policies (the draws differ)
            torch.manual_seed(3)
            monkeypatch.setattr(base, "DEVICE_POLICY", "auto")
            drop = loss.drop_terms(labels, tail_class_mask(stats, loss.tail_threshold))
            monkeypatch.setattr(base, "DEVICE_POLICY", policy)
        x = logits.clone().requires_grad_()
        if drop is not None:
            from eqlosses_d2.losses.gumbel import gumbel_bce_sum

            value = gumbel_bce_sum(x, labels, drop, scale=1.0 / ROWS)
        else:
            value = loss(x, labels, progress=1.0)["loss_cls"]
        (value * 1.5).backward()
        results.append((value.detach().double(), x.grad.double()))
    (v_cpu, g_cpu), (v_gpu, g_gpu) = results
    torch.testing.assert_close(v_gpu, v_cpu, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-6, atol=1e-9)


def test_one_chunking_policy():
    """Every row-chunked kernel takes its chunks from fused.row_ranges: no other module of the
    losses or the calibrations sets a chunk size or walks rows with a step of its own."""
    import ast
    import os

    import eqlosses_d2

    package = os.path.dirname(eqlosses_d2.__file__)
    offenders = []
    for sub in ("losses", "calibration"):
        for name in sorted(os.listdir(os.path.join(package, sub))):
            if not name.endswith(".py") or (sub, name) == ("losses", "fused.py"):
                continue
            with open(os.path.join(package, sub, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and "CHUNK_ELEMENTS" in node.id:
                    offenders.append(f"{sub}/{name}:{node.lineno} {node.id}")
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
                        and len(node.args) == 3):
                    offenders.append(f"{sub}/{name}:{node.lineno} range(start, stop, step)")
    assert not offenders, offenders
