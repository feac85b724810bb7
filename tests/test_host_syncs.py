"""
Host synchronizations of a training step (issue 17, item 4): every call that reads a tensor's
value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float()``,
``int()``, ``bool()``, ``__index__``) is counted, with monkeypatched counters, in one
non-logging training step of each loss (the box predictor's ``losses()`` forward and
backward, or the one-stage models' classification loss), after one warm-up step.

Under the GPU policy (``losses.base.DEVICE_POLICY = "gpu"``: what a GPU run does, forced on
the CPU) the losses read nothing; the one read left in the RoI step is Detectron2's own
(``Box2BoxTransform.get_deltas`` asserts ``(widths > 0).all().item()``, as in its own
``FastRCNNOutputLayers``). Under the CPU policy a few reads of CPU tensors remain, which
synchronize with no device; each is listed in :data:`CPU_POLICY_READS`. Host waits inside
torch ops (``torch.nonzero``, boolean indexing, ``torch.unique``) are not counted here:
they are the methods' own row selections, as in Detectron2's heads. Logging steps (every
20th iteration) add the logged scalars' reads, tested below.
"""
import collections
import types

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from eqlosses_d2.data.class_stats import ClassStatistics
from eqlosses_d2.losses import LOSS_REGISTRY, base as loss_base, build_loss
from eqlosses_d2.registry import names
from eqlosses_d2.losses.dense import build_dense_loss
from eqlosses_d2.modeling.box_predictor import LOG_PERIOD, LongTailOutputLayers
from eqlosses_d2.modeling.class_stats import ClassStatsBuffers
from eqlosses_d2.modeling.one_stage import _OneStageMixin
from loss_helpers import HOST_READS, count_host_reads

C = 6
MAX_ITER = 100
READS = HOST_READS

#: Detectron2's own read in the RoI step (``get_deltas``'s assert), whatever the loss
DETECTRON2_READS = {"item": 1}

#: reads of CPU tensors under the CPU policy (no device to wait for), per loss, beyond
#: Detectron2's: the finite check of the logits (``bool``, 1 for every loss), the backward's
#: test for an output gradient of exactly 1 (``float``, the fused kernels), the rows of
#: the positives per chunk (``tolist``, Gumbel and PCB), DropLoss's lazy draw (its
#: threshold ``float`` and seed ``int``), the dense losses' label range (``int`` x 2) and
#: normalizer (``bool``). Under the GPU policy none of them is taken.
CPU_POLICY_READS = {
    "eql": {"__bool__": 1, "__float__": 1},
    "eqlv2": {"__bool__": 1, "__float__": 1},
    "equilibrium": {"__bool__": 1, "__float__": 1},
    "federated": {"__bool__": 1, "__float__": 1},
    "gumbel": {"__bool__": 1, "__float__": 1, "tolist": 1},
    "gumbel_droploss": {"__bool__": 1, "__float__": 2, "__int__": 1, "tolist": 1},
    "iif": {"__bool__": 1, "__float__": 1},
    "pcb": {"__bool__": 1, "__float__": 1, "tolist": 1},
    "seesaw": {"__bool__": 1},
    "sigmoid": {"__bool__": 1},
    "softmax": {"__bool__": 1},
    "softmax_eql": {"__bool__": 1, "__float__": 1},
    "balanced_softmax": {"__bool__": 1, "__float__": 1},
    "bal_bce": {"__bool__": 1, "__float__": 1},
    "ecm": {"__bool__": 1, "__float__": 1},
    "db": {"__bool__": 1, "__float__": 1},
    "bags": {"__bool__": 1, "__float__": 1},
    "cdb_w": {"__bool__": 1},
    "cdb_s": {"__bool__": 1},  # its sampler's one read per window is the hook's, not the step's
    "focal": {"__bool__": 2, "__float__": 1, "__int__": 2},
    "efl": {"__bool__": 2, "__float__": 1, "__int__": 2},
}


@pytest.fixture
def count_reads(monkeypatch):
    """A Counter of host reads, counting while ``counter.on`` is true."""
    return count_host_reads(monkeypatch)


def _class_stats():
    stats = ClassStatistics(
        category_ids=list(range(1, C + 1)), class_names=[str(i) for i in range(C)],
        image_count=[1, 2, 50, 60, 300, 400], instance_count=[3, 6, 150, 180, 900, 1200],
        frequency=["r", "r", "c", "c", "f", "f"], num_images=1000, num_images_with_annotations=990,
    )
    return ClassStatsBuffers(C).set_from(stats)


def _proposals(generator, classes=(0, 1, 4, C)):
    """Two images of 16 sampled RoIs with labels among ``classes`` (C: background)."""
    out = []
    for _ in range(2):
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.rand(16, 4, generator=generator) * 30 + torch.tensor([0, 0, 30, 30.0]))
        p.gt_boxes = Boxes(torch.rand(16, 4, generator=generator) * 30 + torch.tensor([0, 0, 30, 30.0]))
        p.gt_classes = torch.tensor(classes)[torch.randint(0, len(classes), (16,), generator=generator)]
        out.append(p)
    return out


def _predictor(name):
    hparams = {"num_fed_classes": 4} if name == "federated" else {}
    loss = build_loss(name, C, **hparams)
    predictor = LongTailOutputLayers(
        ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=C,
        cls_loss=loss, max_iter=MAX_ITER,
    )
    predictor.link_class_stats(_class_stats())
    if name == "pcb":  # its active phase (past START, every class seen)
        loss.instance_count.fill_(1.0)
    return predictor


def _roi_step(predictor, storage, iteration, generator):
    storage.iter = iteration
    features = torch.randn(32, 8, generator=generator, requires_grad=True)
    losses = predictor.losses(predictor(features), _proposals(generator))
    sum(losses.values()).backward()
    return losses


def _expected(policy, name):
    expected = collections.Counter() if name in ("focal", "efl") else collections.Counter(DETECTRON2_READS)
    if policy == "auto":
        expected.update(CPU_POLICY_READS[name])
    return dict(expected)


@pytest.mark.parametrize("policy", ["gpu", "auto"])
@pytest.mark.parametrize("name", names(LOSS_REGISTRY))
def test_roi_training_step_reads(name, policy, count_reads, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    torch.manual_seed(0)
    predictor = _predictor(name)
    generator = torch.Generator().manual_seed(1)
    with EventStorage(0) as storage:
        _roi_step(predictor, storage, 83, generator)  # warm-up (first-time reads are cached)
        count_reads.on = True
        _roi_step(predictor, storage, 84, generator)  # (84 + 1) % 20 != 0: not a logging step
        count_reads.on = False
        assert not any(key.startswith((f"{name}/", "fast_rcnn/")) for key in storage.histories())
    assert dict(count_reads) == _expected(policy, name)


@pytest.mark.parametrize("policy", ["gpu", "auto"])
@pytest.mark.parametrize("name", ["focal", "efl"])
def test_one_stage_training_step_reads(name, policy, count_reads, monkeypatch):
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", policy)
    model = types.SimpleNamespace(num_classes=C, cls_loss=build_dense_loss(name, C), max_iter=MAX_ITER)
    generator = torch.Generator().manual_seed(1)
    with EventStorage(0) as storage:
        for iteration in (83, 84):
            storage.iter = iteration
            count_reads.on = iteration == 84
            logits = [torch.randn(2, 40, C, generator=generator, requires_grad=True)]
            labels = [torch.randint(-1, C + 1, (40,), generator=generator) for _ in range(2)]
            _, _, loss = _OneStageMixin._classification_loss(model, logits, labels)
            loss.backward()
            count_reads.on = False
        assert "num_pos_anchors" not in storage.histories()
    assert dict(count_reads) == _expected(policy, name)


@pytest.mark.parametrize("name", ["eqlv2", "pcb", "gumbel_droploss", "equilibrium"])
def test_scalars_are_logged_on_logging_steps_only(name, count_reads):
    """Iterations 19, 39, ... and the last one log (Detectron2's PeriodicWriter period), in
    one read for the classification metrics plus the loss's scalars; the others nothing."""
    predictor = _predictor(name)
    generator = torch.Generator().manual_seed(2)
    logged = {}
    with EventStorage(0) as storage:
        for iteration in (LOG_PERIOD - 2, LOG_PERIOD - 1, LOG_PERIOD, MAX_ITER - 1):
            _roi_step(predictor, storage, iteration, generator)
            logged[iteration] = {k for k, (_, it) in storage.latest().items() if it == iteration}
    assert logged[LOG_PERIOD - 2] == set() and logged[LOG_PERIOD] == set()
    for iteration in (LOG_PERIOD - 1, MAX_ITER - 1):
        assert {"fast_rcnn/cls_accuracy", "fast_rcnn/fg_fraction"} <= logged[iteration]
        assert set(predictor.cls_loss.scalars()) == {k.split("/", 1)[1] for k in logged[iteration]
                                                     if k.startswith(f"{name}/")}


def test_classification_metrics_as_detectron2_computes_them():
    """``fast_rcnn/cls_accuracy``, ``fg_cls_accuracy``, ``false_negative`` and ``fg_fraction``
    on a logging step: by hand from the argmax of the loss's probabilities (background last)."""
    predictor = _predictor("softmax")
    generator = torch.Generator().manual_seed(3)
    proposals = _proposals(generator)
    features = torch.randn(32, 8, generator=generator)
    predictions = predictor(features)
    gt = torch.cat([p.gt_classes for p in proposals])
    predicted = predictions[0].argmax(dim=1)  # softmax: the argmax of the probabilities
    fg = gt < C
    with EventStorage(0) as storage:
        storage.iter = LOG_PERIOD - 1
        predictor.losses(predictions, proposals)
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert latest["fast_rcnn/cls_accuracy"] == pytest.approx((predicted == gt).float().mean().item())
    assert latest["fast_rcnn/fg_cls_accuracy"] == pytest.approx((predicted[fg] == gt[fg]).float().mean().item())
    assert latest["fast_rcnn/false_negative"] == pytest.approx((predicted[fg] == C).float().mean().item())
    assert latest["fast_rcnn/fg_fraction"] == pytest.approx(fg.float().mean().item())
    # a sigmoid loss has no background logit: the metrics read its C + 1 probability columns
    sigmoid = _predictor("eqlv2")
    with EventStorage(0) as storage:
        storage.iter = LOG_PERIOD - 1
        sigmoid.losses(sigmoid(features), proposals)
        probs = sigmoid.cls_loss.predict_probs(sigmoid(features)[0])
        expected = (probs.argmax(dim=1) == gt).float().mean().item()
        assert storage.latest()["fast_rcnn/cls_accuracy"][0] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["eqlv2", "efl", "equilibrium", "pcb", "gumbel"])
def test_gpu_policy_non_finite_logits_give_nan_and_keep_the_state(name, monkeypatch):
    """Under the GPU policy a NaN logit is not read on the host: the loss is NaN (Detectron2's
    trainer stops on it) and the state is left as it was."""
    monkeypatch.setattr(loss_base, "DEVICE_POLICY", "gpu")
    dense = name == "efl"
    loss = build_dense_loss(name, C) if dense else build_loss(name, C, start=0.0) if name == "pcb" else build_loss(
        name, C)
    labels = torch.tensor([0, 1, 2, C, 4, C])
    logits = torch.randn(6, C if dense else loss.num_logits, generator=torch.Generator().manual_seed(4))
    context = {"progress": 1.0}
    if name == "equilibrium":
        context.update(instance_labels=torch.tensor([0, 1]), instance_means=torch.tensor([0.5, 0.25]))
    call = (lambda x: loss(x, labels, normalizer=2.0)) if dense else (lambda x: loss(x, labels, **context))
    call(logits)  # a finite step first
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    logits[2, 1] = float("nan")
    if name == "equilibrium":  # the box predictor's entries come from the same logits
        context["instance_means"] = torch.tensor([0.5, float("nan")])
    values = call(logits)
    assert all(torch.isnan(v) for v in values.values())
    after = loss.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# -- issue 18 item 2: one helper synchronizes the state a head collected in a step ----------------


@pytest.fixture
def two_processes(monkeypatch):
    """Pretend to be one of two processes: every all-reduce is recorded (dtype, size) and doubles
    its tensor, as if the other process had contributed the same."""
    import torch.distributed as dist

    calls = []

    def all_reduce(tensor, op=None):
        calls.append((tensor.dtype, tensor.numel()))
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_sync_state_one_collective_per_dtype(two_processes):
    a = torch.arange(3, dtype=torch.float64)
    b = torch.arange(4, dtype=torch.float64).reshape(2, 2)
    c = torch.ones(5)
    out = loss_base.sync_state(a, b, c)
    assert two_processes == [(torch.float64, 7), (torch.float32, 5)]
    assert [t.shape for t in out] == [a.shape, b.shape, c.shape]
    assert torch.equal(out[0], 2 * a) and torch.equal(out[1], 2 * b) and torch.equal(out[2], 2 * c)
    assert torch.equal(a, torch.arange(3, dtype=torch.float64))  # the inputs are not touched
    two_processes.clear()
    out = loss_base.sync_state(a, c, finite=torch.tensor(False), dtype=torch.float64)
    assert two_processes == [(torch.float64, 8)] and all(not t.any() for t in out)  # non-finite: zeros


#: the collectives of one training step of each loss with state, as (dtype, size): one call of
#: ``sync_state`` each (PCB: the counts, then the rows of the classes present, which depend on them)
STATE_COLLECTIVES = {
    "eqlv2": [(torch.float64, 2 * C)],
    "softmax_eql": [(torch.float64, 2 * C)],
    "seesaw": [(torch.float64, C)],
    "equilibrium": [(torch.float64, 2 * C)],
    "pcb": [(torch.float64, C), (torch.float32, 3 * C)],  # classes 0, 1 and 4 present
    "cdb_w": [(torch.float64, 2 * C)],
    "cdb_s": [(torch.float64, 2 * C)],
}


@pytest.mark.parametrize("name", sorted(STATE_COLLECTIVES))
def test_state_is_synchronized_in_one_call(name, two_processes):
    predictor = _predictor(name)
    generator = torch.Generator().manual_seed(3)
    with EventStorage(0) as storage:
        _roi_step(predictor, storage, 0, generator)
    assert two_processes == STATE_COLLECTIVES[name]


def test_seesaw_keeps_its_scalars_inputs_on_logging_steps_only():
    """Seesaw's mean factors exist only for scalars(): computed on logging steps, not on the
    others; the loss is the same either way."""
    predictor = _predictor("seesaw")
    reference = _predictor("seesaw")
    reference.load_state_dict(predictor.state_dict())
    with EventStorage(0) as storage:
        for iteration in (LOG_PERIOD - 2, LOG_PERIOD - 1):
            losses = _roi_step(predictor, storage, iteration, torch.Generator().manual_seed(iteration))
            kept = predictor.cls_loss._last
            assert (kept is None) == (iteration != LOG_PERIOD - 1)
    # the reference computes the factor means on every step (outside the predictor: the default)
    assert reference.cls_loss.scalars_wanted is True
    features = torch.randn(32, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        probe = _proposals(torch.Generator().manual_seed(9))
        logits = predictor(features)[0]
        labels = torch.cat([p.gt_classes for p in probe])
        reference.cls_loss(logits, labels)
    assert reference.cls_loss._last is not None and set(losses) >= {"loss_cls", "loss_cls_objectness"}
