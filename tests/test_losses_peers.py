"""
Seesaw, Federated, GOL (Gumbel / DropLoss) and IIF: values, gradients, inference,
state and edge cases. Every expected number is derived here from the formulas with
explicit loops in float64 numpy, independently of the implementations; gradients are
central finite differences of those loops (Seesaw: with S held fixed, it is detached).
"""
import ast
import fractions
import functools
import math
import os
import statistics
import textwrap
import typing
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from eqlosses_d2.losses import federated, fused, gumbel, iif, seesaw
from eqlosses_d2.losses import LOSS_REGISTRY, loss_hparams_from_cfg
from loss_helpers import fd_grad

C = 4
# fg RoIs at rows 0, 1, 3, 5 (classes 0, 2, 3, 2), background (label C) at rows 2 and 4
LABELS = [0, 2, 4, 3, 4, 2]
IMAGE_COUNT = [2, 30, 0, 500]  # class 2 never seen
INSTANCE_COUNT = [3, 40, 0, 900]
NUM_IMAGES_WITH_ANNOTATIONS = 10000  # frequencies 2e-4, 3e-3, 0, 5e-2: tail (< 0.0011) = {0, 2}
NUM_IMAGES = 12000
D2MAIN = "/tmp/d2main/detectron2"


def _stats(image_count=IMAGE_COUNT, instance_count=INSTANCE_COUNT, groups=(0, 1, 0, 2),
           num_images=NUM_IMAGES, with_annotations=NUM_IMAGES_WITH_ANNOTATIONS, is_set=True):
    return SimpleNamespace(
        image_count=torch.tensor(image_count, dtype=torch.int64),
        instance_count=torch.tensor(instance_count, dtype=torch.int64),
        frequency_group=torch.tensor(groups, dtype=torch.int64),
        num_images=torch.tensor(num_images),
        num_images_with_annotations=torch.tensor(with_annotations),
        is_set=torch.tensor(is_set),
    )


def _logits(num_logits, seed=0, rows=len(LABELS), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, num_logits, generator=g, dtype=torch.float64).mul(scale).float()



def _grad(loss_fn, logits):
    z = logits.clone().requires_grad_()
    out = loss_fn(z)
    total = sum(out.values())
    total.backward()
    return {k: v.item() for k, v in out.items()}, z.grad


def _softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- Seesaw


def _seesaw_reference_factors(z, labels, counts, p=0.8, q=2.0, eps=1e-2):
    """Per fg row: the mitigation and compensation factors (row i of M_y· and C_y·), loops."""
    mitigation, compensation = {}, {}
    for i, y in enumerate(labels):
        if y == C:
            continue
        sigma = _softmax(z[i][:C])
        m_row, c_row = np.ones(C), np.ones(C)
        for j in range(C):
            n_j, n_y = max(counts[j], 1.0), max(counts[y], 1.0)
            if n_j < n_y:
                m_row[j] = (n_j / n_y) ** p
            ratio = sigma[j] / max(sigma[y], eps)
            if ratio > 1:
                c_row[j] = ratio ** q
        mitigation[i], compensation[i] = m_row, c_row
    return mitigation, compensation


def _seesaw_reference_loss(z, labels, mitigation, compensation, loss_weight=1.0):
    n = len(labels)
    loss_cls, loss_obj = 0.0, 0.0
    for i, y in enumerate(labels):
        obj = z[i][C:]
        target = 0 if y < C else 1
        loss_obj += -math.log(_softmax(obj)[target])
        if y < C:
            shifted = [z[i][j] + (0.0 if j == y else math.log(mitigation[i][j] * compensation[i][j])) for j in range(C)]
            loss_cls += -math.log(_softmax(shifted)[y])
    return loss_weight * loss_cls / n, loss_weight * loss_obj / n


def test_seesaw_loss_gradient_and_factors():
    loss = seesaw.SeesawLoss(C, class_stats=_stats())
    loss.cumulative_count.copy_(torch.tensor([10.0, 3.0, 0.0, 50.0], dtype=torch.float64))
    logits = _logits(C + 2, seed=1, scale=3.0)
    logits[3, 3] = -9.0  # row 3 (class 3): σ_y < eps, the clamp is used
    labels = torch.tensor(LABELS)
    z = logits.double().numpy()

    values, grad = _grad(lambda t: loss(t, labels), logits)
    counts = [10 + 1, 3, 0 + 2, 50 + 1]  # updated with this batch before the loss
    assert loss.cumulative_count.tolist() == counts
    mitigation, compensation = _seesaw_reference_factors(z, LABELS, counts)
    assert any((row < 1).any() for row in mitigation.values())  # both factors are exercised
    assert any((row > 1).any() for row in compensation.values())
    expected_cls, expected_obj = _seesaw_reference_loss(z, LABELS, mitigation, compensation)
    _close(values["loss_cls"], expected_cls)
    _close(values["loss_cls_objectness"], expected_obj)

    # the factors themselves
    fg_rows = [i for i, y in enumerate(LABELS) if y < C]
    fg_labels = torch.tensor([LABELS[i] for i in fg_rows])
    log_m, log_c = seesaw.seesaw_log_factors(logits[fg_rows, :C], fg_labels, loss.cumulative_count, 0.8, 2.0, 1e-2)
    _close(log_m.exp(), [mitigation[i] for i in fg_rows])
    _close(log_c.exp(), [compensation[i] for i in fg_rows], rtol=1e-4)

    # gradient: S is detached (a constant), so differentiate with S fixed
    def f(zz):
        return sum(_seesaw_reference_loss(zz, LABELS, mitigation, compensation))

    _close(grad, fd_grad(f, z), rtol=1e-4, atol=1e-6)
    assert torch.all(grad[[2, 4], :C] == 0)  # background RoIs: objectness only

    # scalars: mean factor over j != y, overall and per group of the RoI's class (r: 0, 2; f: 3)
    def mean_off(rows, table):
        return statistics.mean(sum(v for j, v in enumerate(table[i]) if j != LABELS[i]) / (C - 1) for i in rows)

    scalars = loss.scalars()
    _close(scalars["mitigation_mean"], mean_off(fg_rows, mitigation))
    _close(scalars["compensation_mean"], mean_off(fg_rows, compensation), rtol=1e-4)
    _close(scalars["mitigation_mean_r"], mean_off([0, 1, 5], mitigation))
    _close(scalars["compensation_mean_f"], mean_off([3], compensation), rtol=1e-4)
    assert "mitigation_mean_c" not in scalars  # no class-1 RoI in the batch


def test_seesaw_loss_weight_scales_both_terms_and_their_gradients_separately():
    logits, labels = _logits(C + 2, seed=2), torch.tensor(LABELS)
    plain = seesaw.SeesawLoss(C)
    weighted = seesaw.SeesawLoss(C, loss_weight=2.5)
    a, b = plain(logits, labels), weighted(logits, labels)
    for key in a:
        _close(b[key].item(), 2.5 * a[key].item())
    # d(loss_cls + 3·loss_obj) = g_cls + 3·g_obj, the two in disjoint columns
    z = logits.clone().requires_grad_()
    out = seesaw.SeesawLoss(C)(z, labels)
    (out["loss_cls"] + 3 * out["loss_cls_objectness"]).backward()
    z1 = logits.clone().requires_grad_()
    out1 = seesaw.SeesawLoss(C)(z1, labels)
    out1["loss_cls"].backward()
    z2 = logits.clone().requires_grad_()
    seesaw.SeesawLoss(C)(z2, labels)["loss_cls_objectness"].backward()
    _close(z.grad, z1.grad + 3 * z2.grad)
    assert torch.all(z1.grad[:, C:] == 0) and torch.all(z2.grad[:, :C] == 0)


def test_seesaw_counts_are_updated_before_the_loss_and_accumulate():
    loss = seesaw.SeesawLoss(C)
    logits = _logits(C + 2, seed=3)
    # first iteration from zero counts: with the update first, N = [1, 0, 2, 1] already
    # mitigates class 2's negatives on class 0 and 3 (N_j < N_y)
    value = loss(logits, torch.tensor(LABELS))["loss_cls"].item()
    counts = [1, 0, 2, 1]
    m, c = _seesaw_reference_factors(logits.double().numpy(), LABELS, counts)
    _close(value, _seesaw_reference_loss(logits.double().numpy(), LABELS, m, c)[0])
    m_after, c_after = _seesaw_reference_factors(logits.double().numpy(), LABELS, [0, 0, 0, 0])
    assert abs(value - _seesaw_reference_loss(logits.double().numpy(), LABELS, m_after, c_after)[0]) > 1e-4
    # second iteration
    second = [3, 3, 1, 4, 0, 4, 4]
    loss(_logits(C + 2, seed=4, rows=len(second)), torch.tensor(second))
    assert loss.cumulative_count.tolist() == [1 + 1, 0 + 1, 2 + 0, 1 + 2]
    assert loss.cumulative_count.dtype == torch.float64


def test_seesaw_inference_probabilities():
    loss = seesaw.SeesawLoss(C)
    logits = _logits(C + 2, seed=5)
    probs = loss.predict_probs(logits)
    assert probs.shape == (len(LABELS), C + 1)
    z = logits.double().numpy()
    for i in range(len(LABELS)):
        obj = _softmax(z[i][C:])
        expected = list(_softmax(z[i][:C]) * obj[0]) + [obj[1]]
        _close(probs[i], expected)
    _close(probs.sum(dim=1), torch.ones(len(LABELS)))


def test_seesaw_state_dict_round_trip_reproduces_the_next_iteration():
    first = seesaw.SeesawLoss(C)
    for seed, labels in [(6, LABELS), (7, [1, 1, 4, 0, 3, 4])]:
        first(_logits(C + 2, seed=seed), torch.tensor(labels))
    state = first.state_dict()
    assert list(state) == ["cumulative_count"]
    resumed = seesaw.SeesawLoss(C)
    resumed.load_state_dict(state)
    logits, labels = _logits(C + 2, seed=8), torch.tensor([2, 4, 0, 0, 3, 4])
    a, grad_a = _grad(lambda t: first(t, labels), logits)
    b, grad_b = _grad(lambda t: resumed(t, labels), logits)
    assert a == b
    assert torch.equal(grad_a, grad_b)
    assert torch.equal(first.cumulative_count, resumed.cumulative_count)


def _seesaw_batches():
    """3 iterations x 2 ranks of labels; rank 1 has no RoI at iteration 1."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for it in range(3):
        per_rank = []
        for rank in range(2):
            n = 0 if (it == 1 and rank == 1) else 8
            per_rank.append(torch.randint(0, C + 1, (n,), generator=g))
        batches.append(per_rank)
    return batches


def _seesaw_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss = seesaw.SeesawLoss(C)
        for it, per_rank in enumerate(_seesaw_batches()):
            labels = per_rank[rank]
            logits = _logits(C + 2, seed=100 * it + rank, rows=labels.numel())
            loss(logits, labels)
        torch.save(loss.cumulative_count, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_seesaw_counts_are_global_across_two_processes(tmp_path):
    mp.spawn(_seesaw_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = seesaw.SeesawLoss(C)
    for per_rank in _seesaw_batches():
        labels = torch.cat(per_rank)
        single(_logits(C + 2, seed=0, rows=labels.numel()), labels)
    assert torch.equal(rank0, rank1)
    assert torch.equal(rank0, single.cumulative_count)
    assert single.cumulative_count.sum() > 0


# ----------------------------------------------------------------------------- Federated


def _federated_reference_set(labels, num_fed, weights, seed):
    """S from the documented rule: unique labels (background index included), then
    ``torch.multinomial`` without replacement on an independently built weight vector."""
    present = sorted(set(labels))
    prob = [0.0] * (C + 1)
    for j in range(C):
        if j not in present:
            prob[j] = weights[j]
    missing = num_fed - len(present)
    torch.manual_seed(seed)
    sampled = torch.multinomial(torch.tensor(prob, dtype=torch.float32), missing, replacement=False).tolist()
    return present, sampled


def _bce_loss_on_set(z, labels, columns):
    total = 0.0
    for i, y in enumerate(labels):
        for j in columns:
            target = 1.0 if y == j else 0.0
            s = 1.0 / (1.0 + math.exp(-z[i][j]))
            total += -(target * math.log(s) + (1 - target) * math.log(1 - s))
    return total / len(labels)


def test_federated_class_set_and_loss():
    stats = _stats(image_count=[4, 9, 0, 25])  # class 2 never seen: weight 0
    loss = federated.FederatedLoss(C, class_stats=stats, num_fed_classes=4)
    labels = [1, 4, 1, 4, 4, 1]  # S = {1, background} then 2 drawn from {0, 3} (2 has weight 0)
    weights = [c ** 0.5 for c in [4, 9, 0, 25]]
    present, sampled = _federated_reference_set(labels, 4, weights, seed=3)
    assert present == [1, C] and sorted(sampled) == [0, 3]
    torch.manual_seed(3)
    classes = federated.federated_classes(torch.tensor(labels), 4, C, stats.image_count.float() ** 0.5)
    assert classes.tolist() == present + sampled

    logits = _logits(C, seed=9)
    torch.manual_seed(3)
    values, grad = _grad(lambda t: loss(t, torch.tensor(labels)), logits)
    columns = [0, 1, 3]
    z = logits.double().numpy()
    _close(values["loss_cls"], _bce_loss_on_set(z, labels, columns))
    _close(grad, fd_grad(lambda zz: _bce_loss_on_set(zz, labels, columns), z), rtol=1e-4, atol=1e-6)
    assert torch.all(grad[:, 2] == 0)
    assert loss.scalars() == {"num_classes_in_loss": 3.0}


def test_federated_background_takes_one_of_the_places():
    stats = _stats(image_count=[5] * 10)
    labels = torch.tensor([0, 1, 10, 10])
    for with_background, expected in [(True, 4), (False, 5)]:
        batch = labels if with_background else labels[:2]
        torch.manual_seed(0)
        classes = federated.federated_classes(batch, 5, 10, stats.image_count.float())
        assert len(classes) == 5 and len(set(classes.tolist())) == 5  # without replacement
        fg_classes = classes[classes < 10]
        assert fg_classes.numel() == expected  # with background RoIs, 4 of the 5 places are classes
        assert set(batch.tolist()) <= set(classes.tolist())


def test_federated_sampling_follows_the_weight_power():
    # one present class; one more drawn from classes 1..3 with probability ∝ count^0.5
    counts = [1, 1, 4, 16]
    stats = _stats(image_count=counts)
    torch.manual_seed(0)
    draws = [federated.federated_classes(torch.tensor([0]), 2, C, stats.image_count.float() ** 0.5)[1].item() for _ in range(3000)]
    expected = {1: 1 / 7, 2: 2 / 7, 3: 4 / 7}
    for cls, p in expected.items():
        freq = draws.count(cls) / len(draws)
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(draws)), (cls, freq, p)


def test_federated_never_seen_classes_and_too_few_classes():
    stats = _stats(image_count=[0, 0, 3, 0])
    loss = federated.FederatedLoss(C, class_stats=stats)  # 50 places, 4 classes
    labels = torch.tensor([1, 4, 4])
    torch.manual_seed(0)
    classes = federated.federated_classes(labels, 50, C, stats.image_count.float() ** 0.5)
    assert sorted(classes.tolist()) == [1, 2, C]  # all positive-weight classes, never-seen ones not drawn
    out, grad = _grad(lambda t: loss(t, labels), _logits(C, rows=3))
    assert math.isfinite(out["loss_cls"]) and torch.isfinite(grad).all()


def test_federated_inference_probabilities_and_bias():
    logits = _logits(C, seed=10)
    loss = federated.FederatedLoss(C)
    probs = loss.predict_probs(logits)
    s = torch.sigmoid(logits.double())
    _close(probs[:, :C], s)
    _close(probs[:, C], 1 - s.max(dim=1).values)
    _close(loss.classifier_bias_init(), [-math.log(0.99 / 0.01)] * C)
    _close(federated.FederatedLoss(C, prior_prob=0.5).classifier_bias_init(), [0.0] * C)  # Detectron2 main's


def _load_detectron2_main():
    path = os.path.join(D2MAIN, "modeling/roi_heads/fast_rcnn.py")
    utils_path = os.path.join(D2MAIN, "data/detection_utils.py")
    if not (os.path.exists(path) and os.path.exists(utils_path)):
        pytest.skip("Detectron2 main's source is not at /tmp/d2main")
    namespace = {"torch": torch, "F": F, "Union": typing.Union, "List": typing.List}
    for file, names in [(path, {"get_fed_loss_classes", "sigmoid_cross_entropy_loss"}), (utils_path, {"get_fed_loss_cls_weights"})]:
        source = open(file).read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                exec(textwrap.dedent(ast.get_source_segment(source, node)), namespace)
                names = names - {node.name}
        assert not names, f"not found in {file}: {names}"
    return namespace


def test_federated_matches_detectron2_main():
    main = _load_detectron2_main()
    for num_classes, num_fed, seed in [(60, 50, 0), (60, 50, 1), (30, 10, 2)]:
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(1, 400, (num_classes,), generator=g)
        # main's weights: class_image_count metadata sorted by id, image_count ** 0.5
        main["MetadataCatalog"] = SimpleNamespace(get=lambda name, counts=counts: SimpleNamespace(
            class_image_count=[{"id": i + 1, "image_count": int(c)} for i, c in reversed(list(enumerate(counts)))]))
        main["check_metadata_consistency"] = lambda *args: None
        weights = main["get_fed_loss_cls_weights"]("train", freq_weight_power=0.5)
        this = SimpleNamespace(use_fed_loss=True, fed_loss_num_classes=num_fed, fed_loss_cls_weights=weights)
        this.get_fed_loss_classes = functools.partial(main["get_fed_loss_classes"], this)

        labels = torch.randint(0, num_classes + 1, (40,), generator=g)
        labels[torch.rand(40, generator=g) < 0.5] = num_classes  # background RoIs present
        logits = torch.randn(40, num_classes + 1, generator=g) * 3

        torch.manual_seed(seed)
        main_classes = main["get_fed_loss_classes"](this, labels, num_fed, num_classes, weights)
        torch.manual_seed(seed)
        our_classes = federated.federated_classes(labels, num_fed, num_classes, counts.float() ** 0.5)
        assert torch.equal(main_classes, our_classes)

        main_logits = logits.clone().requires_grad_()
        torch.manual_seed(seed)
        main_loss = main["sigmoid_cross_entropy_loss"](this, main_logits, labels)
        main_loss.backward()
        stats = _stats(image_count=counts.tolist(), instance_count=counts.tolist(), groups=[0] * num_classes)
        loss = federated.FederatedLoss(num_classes, class_stats=stats, num_fed_classes=num_fed)
        torch.manual_seed(seed)
        ours, grad = _grad(lambda t: loss(t, labels), logits[:, :num_classes])
        _close(ours["loss_cls"], main_loss.item(), rtol=1e-6)
        _close(grad, main_logits.grad[:, :num_classes], rtol=1e-5, atol=1e-8)
        assert torch.all(main_logits.grad[:, num_classes] == 0)  # main's dropped background logit


# ----------------------------------------------------------------------------- GOL


def _gumbel_terms(z, labels, num_columns, weights=None):
    """Σ w·BCE(exp(−exp(−clamp(z, −4, 10))), y), loops."""
    total = 0.0
    for i, y in enumerate(labels):
        for j in range(num_columns):
            c = min(max(z[i][j], -4.0), 10.0)
            p = math.exp(-math.exp(-c))
            target = 1.0 if y == j else 0.0
            term = -(target * math.log(p) + (1 - target) * math.log(1 - p))
            total += term * (1.0 if weights is None else weights[i][j])
    return total


def test_gumbel_loss_gradient_and_training_clamp():
    loss = gumbel.GumbelCrossEntropy(C)
    assert loss.num_logits == C + 1
    logits = _logits(C + 1, seed=12)
    logits[0, 1], logits[1, 3], logits[3, 3] = -6.0, 12.0, -5.0  # outside [−4, 10] (row 3: its positive)
    labels = torch.tensor(LABELS)
    values, grad = _grad(lambda t: loss(t, labels), logits)
    z = logits.double().numpy()
    n = len(LABELS)
    expected = _gumbel_terms(z, LABELS, C + 1) / n  # background RoIs: target 1 on channel C
    assert 0 < expected < 20
    _close(values["loss_cls"], expected)
    _close(grad, fd_grad(lambda zz: _gumbel_terms(zz, LABELS, C + 1) / n, z), rtol=1e-4, atol=1e-7)
    assert grad[0, 1] == 0 and grad[1, 3] == 0 and grad[3, 3] == 0
    # inference: unclamped activation, background column = the background channel
    probs = loss.predict_probs(logits)
    _close(probs, np.exp(-np.exp(-z)))
    assert probs[1, 3] > math.exp(-math.exp(-10.0))  # z = 12 is not clamped at inference
    assert loss.classifier_bias_init().tolist() == [-2.0] * (C + 1)


def test_gumbel_reduced_loss_is_clamped_to_20():
    loss = gumbel.GumbelCrossEntropy(C)
    logits = torch.full((len(LABELS), C + 1), -4.0)  # every positive term is e^4 ≈ 54.6
    out, grad = _grad(lambda t: loss(t, torch.tensor(LABELS)), logits)
    assert out["loss_cls"] == 20.0
    assert torch.all(grad == 0)


def _exceeds_uniform_reference(rows, cols, threshold, seed):
    """The draw gumbel.exceeds_uniform documents on the CPU, entry by entry: U's first
    base-256 digit from the little-endian bytes of a PCG64 stream seeded from torch's
    generator, a further 64-bit word per tie, U > threshold with U at 2^-72 resolution."""
    torch.manual_seed(seed)
    stream = np.random.PCG64(int(torch.randint(0, 2**63 - 1, ())))
    n = rows * cols
    digits = [(int(word) >> (8 * k)) & 255 for word in stream.random_raw((n + 7) // 8) for k in range(8)][:n]
    bound = math.floor(fractions.Fraction(float(threshold)) * 2**72)
    high, low = bound >> 64, bound % 2**64
    above = []
    for digit in digits:
        if digit != high:
            above.append(digit > high)
        else:
            above.append(int(stream.random_raw()) > low)
    return np.array(above, dtype=bool).reshape(rows, cols)


def test_exceeds_uniform_is_the_documented_draw():
    for rows, cols, threshold, seed in [(37, 29, 0.3, 0), (64, 16, 0.5, 1), (3, 5, 0.75, 2), (1, 1, 0.1, 3)]:
        torch.manual_seed(seed)
        ours = gumbel.exceeds_uniform(rows, cols, torch.tensor(threshold), "cpu")
        expected = _exceeds_uniform_reference(rows, cols, np.float32(threshold), seed)
        assert ours.dtype == torch.bool and ours.shape == (rows, cols)
        assert ours.numpy().tolist() == expected.tolist()
    # enough entries that some first digits tie with the threshold's (1 in 256)
    torch.manual_seed(0)
    digits_tied = gumbel.exceeds_uniform(64, 16, 0.5, "cpu")
    assert digits_tied.numel() > 256
    # thresholds 1 and 0: never / (all but 2^-72) always; an empty draw still advances torch's generator
    assert not gumbel.exceeds_uniform(50, 50, 1.0, "cpu").any()
    assert gumbel.exceeds_uniform(50, 50, 0.0, "cpu").all()
    torch.manual_seed(4)
    assert gumbel.exceeds_uniform(0, 7, 0.5, "cpu").shape == (0, 7)
    after_empty = torch.rand(())
    torch.manual_seed(4)
    torch.randint(0, 2**63 - 1, ())
    assert torch.rand(()) == after_empty


def test_exceeds_uniform_probability_is_exact():
    # P(U > ρ) = 1 − ρ; the first digit alone would give P(b > floor(256ρ)) = 179/256 for
    # ρ = 0.3, 5.5 standard errors away at this size: the tie-break is what makes it exact
    n = 4000 * 2500
    for threshold in (0.3, 0.1 + 1 / 512):
        torch.manual_seed(7)
        rate = gumbel.exceeds_uniform(4000, 2500, threshold, "cpu").double().mean().item()
        expected = 1 - float(np.float32(threshold))
        assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (threshold, rate)


def test_gumbel_bce_sum_across_cpu_chunks(monkeypatch):
    # more rows than one CPU chunk: positives and dropped terms in several chunks, against
    # the float64 formula and its closed-form gradient
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 6 * 512)
    rows, cols = 2 * 512 + 37, 6
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, cols, generator=g) * 5  # some outside [−4, 10]
    labels = torch.randint(0, cols + 1, (rows,), generator=g)  # cols: an all-negative row
    drop = torch.rand(rows, cols, generator=g) < 0.3
    x = logits.clone().requires_grad_()
    total = gumbel.gumbel_bce_sum(x, labels, drop)
    total.backward()
    z = logits.double().numpy()
    c = np.clip(z, -4, 10)
    e = np.exp(-c)
    positive = np.zeros((rows, cols), dtype=bool)
    fg = labels.numpy() < cols
    positive[np.flatnonzero(fg), labels.numpy()[fg]] = True
    kept = positive | ~drop.numpy()
    terms = np.where(positive, e, -np.log(-np.expm1(-e)))
    grads = np.where(positive, -e, e * np.exp(-e) / -np.expm1(-e))
    grads = np.where(kept & (z > -4) & (z < 10), grads, 0.0)
    _close(total.detach(), (terms * kept).sum(), rtol=1e-6)
    _close(x.grad, grads, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[torch.from_numpy(~kept)] == 0)


def _droploss_reference_weights(labels, image_count, with_annotations, seed, lam=0.0011):
    tail = [count / with_annotations < lam for count in image_count]
    fg = [y for y in labels if y < C]
    rho = sum(tail[y] for y in fg) / len(fg) if fg else 1.0
    tail_columns = [j for j in range(C) if tail[j]]
    bg_rows = [i for i, y in enumerate(labels) if y == C]
    if bg_rows and tail_columns:
        above = _exceeds_uniform_reference(len(bg_rows), C, np.float32(rho), seed)
    w = np.ones((len(labels), C))
    for i, y in enumerate(labels):
        for j in range(C):
            if y < C and tail[j] and j != y:
                w[i][j] = 0.0  # foreground RoI: T = 1
    for b, i in enumerate(bg_rows):
        for j in tail_columns:
            if above[b][j]:
                w[i][j] = 0.0  # background RoI: T = 1 with probability 1 − ρ
    return w, rho


def test_droploss_weights_loss_and_gradient():
    stats = _stats()
    loss = gumbel.GumbelDropLoss(C, class_stats=stats)
    assert loss.num_logits == C
    labels = [0, 2, 4, 3, 4, 2, 4, 4, 4]
    logits = _logits(C, seed=13, rows=len(labels))
    w, rho = _droploss_reference_weights(labels, IMAGE_COUNT, NUM_IMAGES_WITH_ANNOTATIONS, seed=5)
    assert rho == 0.75  # fg classes 0, 2, 3, 2: three tail
    assert 0 < w[[2, 4, 6, 7, 8]][:, [0, 2]].sum() < 10  # some background tail terms dropped, some kept
    assert w[0].tolist() == [1, 1, 0, 1] and w[3].tolist() == [0, 1, 0, 1]

    torch.manual_seed(5)
    drop = loss.drop_mask(torch.tensor(labels), torch.tensor([True, False, True, False]))
    fg_rows = [i for i, y in enumerate(labels) if y < C]
    expected_drop = w == 0
    for i in fg_rows:  # a foreground RoI's own tail class is in the mask; the positive is kept anyway
        if labels[i] in (0, 2):
            expected_drop[i][labels[i]] = True
    assert drop.tolist() == expected_drop.tolist()

    torch.manual_seed(5)
    values, grad = _grad(lambda t: loss(t, torch.tensor(labels)), logits)
    z = logits.double().numpy()
    n = len(labels)
    _close(values["loss_cls"], _gumbel_terms(z, labels, C, w) / n)
    _close(grad, fd_grad(lambda zz: _gumbel_terms(zz, labels, C, w) / n, z), rtol=1e-4, atol=1e-7)
    assert torch.all(grad[torch.from_numpy(w == 0)] == 0)
    assert loss.scalars() == {"tail_fraction": 0.75}


def test_droploss_drop_rate_is_one_minus_rho():
    stats = _stats()
    loss = gumbel.GumbelDropLoss(C, class_stats=stats)
    g = torch.Generator().manual_seed(0)
    fg = torch.tensor([0, 3, 3, 3] * 100)  # ρ = 1/4
    labels = torch.cat([fg, torch.full((3000,), C)])[torch.randperm(3400, generator=g)]
    torch.manual_seed(0)
    drop = loss.drop_mask(labels, torch.tensor([True, False, True, False]))
    bg_tail = drop[labels == C][:, [0, 2]]
    rate, n = bg_tail.float().mean().item(), bg_tail.numel()
    assert abs(rate - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    assert not drop[labels == C][:, [1, 3]].any()


def test_droploss_without_foreground_drops_nothing():
    loss = gumbel.GumbelDropLoss(C, class_stats=_stats())
    labels = [C] * 5
    logits = _logits(C, seed=14, rows=5)
    out, _ = _grad(lambda t: loss(t, torch.tensor(labels)), logits)
    _close(out["loss_cls"], _gumbel_terms(logits.double().numpy(), labels, C) / 5)


def test_droploss_inference_and_bias():
    loss = gumbel.GumbelDropLoss(C, class_stats=_stats())
    logits = _logits(C, seed=15) * 4
    probs = loss.predict_probs(logits)
    p = np.exp(-np.exp(-logits.double().numpy()))
    _close(probs[:, :C], p)
    _close(probs[:, C], 1 - p.max(axis=1))
    assert loss.classifier_bias_init().tolist() == [-2.0] * C


# ----------------------------------------------------------------------------- IIF


def test_iif_weights_every_variant_by_hand():
    m, n = 10, [1, 5, 9]
    normit = [-statistics.NormalDist().inv_cdf(k / m) for k in n]
    expected = {
        "raw": [math.log(m / k) for k in n],
        "smooth": [math.log((m + 1) / (k + 1)) + 1 for k in n],
        "prob": [math.log((m - k) / k) for k in n],
        "normit": normit,
        "gombit": [-math.log(-math.log(1 - k / m)) for k in n],
        "base2": [math.log2(m / k) for k in n],
        "base10": [math.log10(m / k) for k in n],
    }
    _close(expected["raw"], [2.302585093, 0.693147181, 0.105360516], rtol=1e-9)
    _close(expected["gombit"], [2.250367327, 0.366512921, -0.834032445], rtol=1e-9)
    for variant, values in expected.items():
        _close(iif.iif_weights(torch.tensor(n), m, variant), values, rtol=1e-9, atol=1e-12)
        _close(iif.iif_weights(n, torch.tensor(m), variant + "_obj"), values, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="unknown VARIANT"):
        iif.iif_weights(n, m, "log")


@pytest.mark.parametrize("variant", iif.IIF_VARIANTS)
def test_iif_weights_guard_never_seen_and_every_image(variant):
    m = 10
    weights = iif.iif_weights(torch.tensor([0, 1, 9, 10]), m, variant)
    assert torch.isfinite(weights).all()
    base = variant.replace("_obj", "")
    if base == "smooth":  # finite as is
        _close(weights[0], math.log(11) + 1)
        _close(weights[3], 1.0)
    else:
        assert weights[0] == weights[1]  # never seen: as if seen once
        if base in ("prob", "normit", "gombit"):
            assert weights[3] == weights[2]  # n = M clamped to M − 1
        else:
            assert weights[3] == 0.0  # log(M / M)


def _iif_reference(z, labels, w):
    scale = list(w) + [1.0]
    total = 0.0
    for i, y in enumerate(labels):
        total += -math.log(_softmax([scale[j] * z[i][j] for j in range(C + 1)])[y])
    return total / len(labels)


@pytest.mark.parametrize("variant", ["raw", "gombit_obj"])
def test_iif_loss_gradient_and_inference(variant):
    stats = _stats()
    loss = iif.IIFLoss(C, class_stats=stats, variant=variant)
    if variant == "raw":
        w = [math.log(NUM_IMAGES / max(k, 1)) for k in IMAGE_COUNT]
    else:
        total = sum(INSTANCE_COUNT)
        w = [-math.log(-math.log(1 - min(max(k, 1), total - 1) / total)) for k in INSTANCE_COUNT]
    _close(loss.logit_weights(), w + [1.0])
    logits = _logits(C + 1, seed=16, scale=0.5)
    values, grad = _grad(lambda t: loss(t, torch.tensor(LABELS)), logits)
    z = logits.double().numpy()
    _close(values["loss_cls"], _iif_reference(z, LABELS, w))
    _close(grad, fd_grad(lambda zz: _iif_reference(zz, LABELS, w), z), rtol=1e-4, atol=1e-6)
    probs = loss.predict_probs(logits)
    for i in range(len(LABELS)):
        _close(probs[i], _softmax([s * v for s, v in zip(w + [1.0], z[i])]))


def test_iif_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown VARIANT"):
        iif.IIFLoss(C, variant="raw2")


# ----------------------------------------------------------------------------- all four


LOSSES = {
    "seesaw": lambda stats: seesaw.SeesawLoss(C, class_stats=stats),
    "federated": lambda stats: federated.FederatedLoss(C, class_stats=stats),
    "gumbel": lambda stats: gumbel.GumbelCrossEntropy(C, class_stats=stats),
    "gumbel_droploss": lambda stats: gumbel.GumbelDropLoss(C, class_stats=stats),
    "iif": lambda stats: iif.IIFLoss(C, class_stats=stats),
}
NEEDS_STATS = {"federated", "gumbel_droploss", "iif"}


def test_registry_names_nodes_and_config_block():
    families = {"seesaw": "softmax", "iif": "softmax", "federated": "sigmoid", "gumbel": "sigmoid", "gumbel_droploss": "sigmoid"}
    expected = {
        "seesaw": ("SEESAW", C + 2, {"P": 0.8, "Q": 2.0, "EPS": 0.01, "LOSS_WEIGHT": 1.0}),
        "federated": ("FEDERATED", C, {"NUM_FED_CLASSES": 50, "FREQ_WEIGHT_POWER": 0.5, "PRIOR_PROB": 0.01}),
        "gumbel": ("GUMBEL", C + 1, {"BIAS_INIT": -2.0, "TAIL_THRESHOLD": 0.0011}),
        "gumbel_droploss": ("GUMBEL", C, {"BIAS_INIT": -2.0, "TAIL_THRESHOLD": 0.0011}),
        "iif": ("IIF", C + 1, {"VARIANT": "raw"}),
    }
    for name, (node, num_logits, defaults) in expected.items():
        cls = LOSS_REGISTRY.get(name)
        assert cls.name == name and cls.config_node == node and cls.family == families[name]
        kwargs = loss_hparams_from_cfg(cls, {node: defaults})
        built = cls(C, **kwargs)
        assert built.num_logits == num_logits
        default = cls(C)
        for key, value in kwargs.items():  # the block's values are the constructor defaults
            assert getattr(default, key) == value, (name, key)


@pytest.mark.parametrize("name", ["seesaw", "gumbel", "gumbel_droploss", "iif"])
def test_second_backward_through_the_same_graph_is_a_clear_error(name):
    loss = LOSSES[name](_stats())  # analytic-gradient autograd functions hand their buffer over once
    z = _logits(loss.num_logits).requires_grad_()
    total = sum(loss(z, torch.tensor(LABELS)).values())
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        total.backward()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_rois_and_only_background(name):
    loss = LOSSES[name](_stats())
    num_logits = loss.num_logits
    empty = torch.zeros(0, num_logits, requires_grad=True)
    out = loss(empty, torch.zeros(0, dtype=torch.int64))
    sum(out.values()).backward()
    assert all(v.item() == 0.0 for v in out.values())
    assert empty.grad.shape == (0, num_logits)

    values, grad = _grad(lambda t: loss(t, torch.full((5,), C)), _logits(num_logits, rows=5))
    assert all(math.isfinite(v) for v in values.values()) and torch.isfinite(grad).all()
    if name == "seesaw":
        assert values["loss_cls"] == 0.0 and values["loss_cls_objectness"] > 0
        assert loss.cumulative_count.sum() == 0
    assert loss.predict_probs(_logits(num_logits, rows=5)).shape == (5, C + 1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_never_seen_classes_give_finite_values(name):
    stats = _stats(image_count=[0, 0, 0, 7], instance_count=[0, 0, 0, 9])
    loss = LOSSES[name](stats)
    logits = _logits(loss.num_logits, seed=17, scale=6.0)
    for _ in range(2):
        values, grad = _grad(lambda t: loss(t, torch.tensor(LABELS)), logits)
        assert all(math.isfinite(v) for v in values.values()) and torch.isfinite(grad).all()
    assert torch.isfinite(loss.predict_probs(logits)).all()
    assert all(math.isfinite(v) for v in loss.scalars().values())


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_rejected(name, bad):
    loss = LOSSES[name](_stats())
    logits = _logits(loss.num_logits)
    logits[1, 1] = bad
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        loss(logits, torch.tensor(LABELS))


@pytest.mark.parametrize("name", sorted(NEEDS_STATS))
@pytest.mark.parametrize("stats", [None, "unset"])
def test_missing_class_stats_is_a_clear_error(name, stats):
    loss = LOSSES[name](_stats(is_set=False) if stats == "unset" else None)
    with pytest.raises(RuntimeError, match="needs per-class statistics"):
        loss(_logits(loss.num_logits), torch.tensor(LABELS))


@pytest.mark.parametrize("name", sorted(set(LOSSES) - NEEDS_STATS))
def test_losses_without_class_stats_work_without_them(name):
    loss = LOSSES[name](None)
    values, _ = _grad(lambda t: loss(t, torch.tensor(LABELS)), _logits(loss.num_logits))
    assert all(math.isfinite(v) for v in values.values())
    loss.scalars()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_gives_float32_losses_close_to_fp32(name):
    stats = _stats()
    loss_bf16, loss_fp32, loss_cast = LOSSES[name](stats), LOSSES[name](stats), LOSSES[name](stats)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, loss_bf16.num_logits)
    features = torch.randn(len(LABELS), 16) * 3
    labels = torch.tensor(LABELS)

    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        assert logits.dtype == torch.bfloat16
        out_bf16 = loss_bf16(logits, labels)
    assert all(v.dtype == torch.float32 for v in out_bf16.values())
    sum(out_bf16.values()).backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()

    torch.manual_seed(1)
    out_cast = loss_cast(logits.detach().float(), labels)  # the same bf16 values, in fp32 outside autocast
    torch.manual_seed(1)
    out_fp32 = loss_fp32(layer(features), labels)
    for key in out_fp32:
        _close(out_bf16[key].item(), out_cast[key].item(), rtol=1e-5)
        _close(out_bf16[key].item(), out_fp32[key].item(), rtol=3e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = loss_bf16.predict_probs(layer(features))
    assert probs.dtype == torch.float32
    if name == "seesaw":
        assert torch.equal(loss_bf16.cumulative_count, loss_fp32.cumulative_count)
        assert loss_bf16.cumulative_count.dtype == torch.float64
        for key, value in loss_fp32.scalars().items():
            _close(loss_bf16.scalars()[key], value, rtol=5e-2)
