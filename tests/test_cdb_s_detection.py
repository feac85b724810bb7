"""CDB-S in the detection training (``MODEL.EQLOSSES.LOSS cdb_s`` with ``DATALOADER.SAMPLER_TRAIN
ClassDifficultyTrainingSampler``, Sinha et al. IJCV 2022): the class → image index of a constructed
dataset, the class probabilities by hand, the frequencies of the drawn classes against them (a
chi-square bound), the windows and the versions they draw with, a stream started mid-way equal to
the tail of the full one (one and two processes), the weights published in the training process
reaching a data-loader worker, the loss (plain CE in float64 by hand, the previous window's weights
kept, reset), the config errors, and trainings: the hook publishes each window, and a run resumed
across a window boundary ends bit for bit where the uninterrupted one does. Also the fixed-rule
class-aware samplers of detection that share its draw (class-balanced, square-root)."""
import itertools
import math
import os

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from detectron2.config import get_cfg
from detectron2.data.common import ToIterableDataset

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import ConfigError, merge_config_file, validate_config
from eqlosses_d2.data.cdb_sampler import (
    SAMPLER_NAME,
    ClassDifficultyTrainingSampler,
    SharedClassWeights,
    class_image_index,
)
from eqlosses_d2.losses import build_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


def _record(index, *classes, crowd=()):
    annotations = [{"category_id": c, "iscrowd": 0} for c in classes]
    annotations += [{"category_id": c, "iscrowd": 1} for c in crowd]
    return {"file_name": f"{index}.jpg", "annotations": annotations}


def _dataset():
    """5 classes; class 3 only as a crowd region (no image to sample it by)."""
    return [
        _record(0, 0, 0, 1),
        _record(1, 2),
        _record(2),  # no annotation
        _record(3, 1, crowd=(3,)),
        _record(4, 4, 0),
        _record(5, 2, 2, 2),
    ]


def _one_class_dataset(num_classes=3, per_class=(2, 3, 4)):
    """Every image holds exactly one class: the class of a drawn image is the drawn class."""
    records, labels = [], []
    for c, n in enumerate(per_class[:num_classes]):
        for _ in range(n):
            records.append(_record(len(records), c))
            labels.append(c)
    return records, torch.tensor(labels)


def _sampler(records, num_classes, batch=2, period=3, lag=1, seed=7):
    return ClassDifficultyTrainingSampler(records, num_classes, batch, period, lag, seed=seed)


# -- the index, the probabilities, the draw --------------------------------------------------------


def test_class_image_index_is_the_non_crowd_classes_of_each_image():
    offsets, images = class_image_index(_dataset(), 5)
    members = [images[offsets[j]:offsets[j + 1]].tolist() for j in range(5)]
    assert members == [[0, 4], [0, 3], [1, 5], [], [4]]
    with pytest.raises(ValueError, match=r"image 1.jpg: category_id 7 is outside the 5 classes"):
        class_image_index([_record(0, 1), _record(1, 7)], 5)


def test_class_probabilities_by_hand():
    sampler = _sampler(_dataset(), 5)
    w = torch.tensor([0.5, 1.5, 2.0, 9.0, 1.0], dtype=F64)  # class 3 has no image: left out
    total = 0.5 + 1.5 + 2.0 + 1.0
    assert sampler.class_probabilities(w).tolist() == pytest.approx([0.5 / total, 1.5 / total, 2.0 / total, 0.0,
                                                                     1.0 / total], rel=1e-15)
    zeros = torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0], dtype=F64)  # nothing on a class with images: uniform
    assert sampler.class_probabilities(zeros).tolist() == [0.25, 0.25, 0.25, 0.0, 0.25]
    with pytest.raises(ValueError, match="no training image has an annotated instance"):
        _sampler([_record(0), _record(1, crowd=(1,))], 3)


def test_drawn_classes_follow_the_probabilities_and_images_are_uniform_within():
    records, labels = _one_class_dataset(per_class=(2, 3, 4))
    sampler = _sampler(records, 3, batch=100, period=100, lag=1)
    w = torch.tensor([0.2, 1.0, 1.8], dtype=F64)
    indices = sampler.draw_window(1, w)
    n = indices.numel()
    assert n == 100 * 100  # K · B positions in a window w >= 1
    p = [0.2 / 3, 1.0 / 3, 1.8 / 3]
    observed = torch.bincount(labels[indices], minlength=3).double()
    chi2 = float(((observed - n * torch.tensor(p, dtype=F64)) ** 2 / (n * torch.tensor(p, dtype=F64))).sum())
    assert chi2 < 13.8  # χ²(2 df) 0.999 quantile
    per_image = torch.bincount(indices, minlength=len(records)).double()
    for c, members in enumerate([[0, 1], [2, 3, 4], [5, 6, 7, 8]]):  # within a class: each image 1/n_c
        share = per_image[members] / observed[c]
        bound = 4 * math.sqrt((1 / len(members)) / float(observed[c]))
        assert (share - 1 / len(members)).abs().max() < bound
    assert torch.equal(indices, sampler.draw_window(1, w))  # (seed, window) fix the draw
    assert not torch.equal(indices, _sampler(records, 3, batch=100, period=100, lag=1, seed=8).draw_window(1, w))


def test_windows_start_lag_iterations_after_the_loss_closes_its_window():
    sampler = _sampler(_dataset(), 5, batch=4, period=10, lag=3)
    assert [sampler.window_start(w) for w in range(4)] == [0, 52, 92, 132]  # (10w + 3) · 4
    assert [sampler.window_of(p) for p in (0, 51, 52, 91, 92, 131, 132)] == [0, 0, 1, 1, 2, 2, 3]


def test_each_window_draws_with_its_version():
    records, labels = _one_class_dataset(per_class=(2, 3, 4))
    sampler = _sampler(records, 3, batch=2, period=3, lag=1)  # windows: [0, 8), [8, 14), [14, 20), ...
    sampler.table.publish(1, torch.tensor([0.0, 0.0, 1.0], dtype=F64))  # window 1: class 2 only
    sampler.table.publish(2, torch.tensor([1.0, 0.0, 0.0], dtype=F64))  # window 2: class 0 only
    stream = list(itertools.islice(iter(sampler), 20))
    drawn = labels[stream].tolist()
    assert drawn[8:14] == [2] * 6 and drawn[14:20] == [0] * 6
    assert set(drawn[:8]) <= {0, 1, 2}
    assert stream[:8] == sampler.draw_window(0, torch.ones(3, dtype=F64)).tolist()
    with pytest.raises(RuntimeError, match=r"window 3 are not published.*CDB_S.SAMPLER_LAG \(1\)"):
        list(itertools.islice(iter(sampler), 21))  # window 3 needs version 3: the main process does not wait


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_stream_started_mid_way_is_the_tail_of_the_full_stream(world_size):
    records, _ = _one_class_dataset(per_class=(3, 1, 5))
    samplers = [_sampler(records, 3, batch=4, period=2, lag=1) for _ in range(world_size)]
    for rank, sampler in enumerate(samplers):
        sampler.rank, sampler.world_size = rank, world_size
        for version, w in enumerate([[1, 1, 1], [0.1, 2, 1], [3, 0.2, 1], [1, 1, 0.5]]):
            sampler.table.publish(version, torch.tensor(w, dtype=F64))
    per_rank = 26 // world_size  # into window 2 (positions [20, 28))
    full = [list(itertools.islice(iter(s), per_rank)) for s in samplers]
    for skip in (0, 1, 3, 5, 7, 10):
        for rank, sampler in enumerate(samplers):
            tail = list(itertools.islice(sampler.iter_from(skip), per_rank - skip))
            assert tail == full[rank][skip:], (skip, rank)
    if world_size == 2:  # the ranks' streams interleave into the one-process stream
        single = _sampler(records, 3, batch=4, period=2, lag=1)
        for version, w in enumerate([[1, 1, 1], [0.1, 2, 1], [3, 0.2, 1], [1, 1, 0.5]]):
            single.table.publish(version, torch.tensor(w, dtype=F64))
        merged = [i for pair in zip(*full) for i in pair]
        assert merged == list(itertools.islice(iter(single), 26))


def test_shared_weights_versions_and_overwrite():
    table = SharedClassWeights(2, slots=2)
    assert table.try_read(0).tolist() == [1.0, 1.0] and table.try_read(1) is None
    table.publish(1, torch.tensor([0.5, 2.0]))
    assert table.try_read(1).tolist() == [0.5, 2.0]
    table.publish(2, torch.tensor([3.0, 1.0]))  # slot 0: version 0 is gone
    with pytest.raises(RuntimeError, match="window 0 were overwritten by window 2"):
        table.try_read(0)


def test_weights_published_later_reach_a_loader_worker():
    """The sampler runs in a worker process (Detectron2's ToIterableDataset); the version the main
    process publishes after the worker started is what the worker's next window draws with."""
    records, labels = _one_class_dataset(per_class=(2, 3, 4))
    sampler = _sampler(records, 3, batch=2, period=3, lag=1)  # window 0: positions [0, 8)
    loader = DataLoader(ToIterableDataset(list(range(len(records))), sampler), batch_size=None, num_workers=1,
                        prefetch_factor=2)
    iterator = iter(loader)
    first = [int(next(iterator)) for _ in range(8)]
    assert first == sampler.draw_window(0, torch.ones(3, dtype=F64)).tolist()
    sampler.table.publish(1, torch.tensor([0.0, 1.0, 0.0], dtype=F64))  # the worker waits for it
    window1 = [int(next(iterator)) for _ in range(6)]
    assert labels[window1].tolist() == [1] * 6
    del iterator


def test_a_worker_that_waits_too_long_stops_with_one_line(monkeypatch):
    """A version that never comes (the loader reads further ahead than SAMPLER_LAG): the worker
    gives up after WAIT_SECONDS with the error naming the key, which reaches the training process."""
    from eqlosses_d2.data import cdb_sampler

    monkeypatch.setattr(cdb_sampler, "WAIT_SECONDS", 0.3)  # inherited by the forked worker
    records, _ = _one_class_dataset(per_class=(2, 3, 4))
    sampler = _sampler(records, 3, batch=2, period=3, lag=1)
    loader = DataLoader(ToIterableDataset(list(range(len(records))), sampler), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match=r"window 1 are not published.*SAMPLER_LAG \(1\) iterations ahead"):
        for _ in itertools.islice(loader, 9):  # position 8 is window 1's first
            pass


# -- the loss ----------------------------------------------------------------------------------------


def test_loss_is_plain_cross_entropy_and_keeps_the_previous_weights():
    C = 3
    loss = build_loss("cdb_s", C, update_period=2, sampler_lag=5)
    assert loss.sampler_lag == 5 and set(loss.state_dict()) >= {"previous_class_weights", "class_weights"}
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float32)
    y = [0, 1, 3]
    out = loss(z, torch.tensor(y))["loss_cls"]
    z64 = z.double()
    hand = sum(-(z64[i, y[i]] - torch.logsumexp(z64[i], 0)) for i in range(3)) / 3
    assert float(out) == pytest.approx(float(hand), rel=1e-6)
    assert loss.sampling_weights()[0] == 0
    loss(z, torch.tensor(y))  # step 2 closes window 1: RoI 0 right (class 0), RoI 1 wrong (class 1)
    completed, current, previous = loss.sampling_weights()
    assert completed == 1 and previous.tolist() == [1.0] * C
    d = [0.0, 1.0, 1.0]  # class 2: no foreground RoI in the window: keeps its difficulty 1
    assert loss.difficulty.tolist() == d
    tau = 2 / (1 + math.exp(-((1 - 0.0) / (1 - 1.0 + 0.01) - 1)))
    assert current.tolist() == pytest.approx([0.0, 1.5, 1.5], abs=1e-15)  # C · d^τ / Σ d^τ
    assert float(loss.tau) == pytest.approx(tau, rel=1e-14)
    first = current.clone()
    loss(z, torch.tensor(y)), loss(z, torch.tensor(y))  # window 2
    completed, current, previous = loss.sampling_weights()
    assert completed == 2 and torch.equal(previous, first)
    loss.reset_state()
    assert loss.sampling_weights()[0] == 0 and loss.class_weights.tolist() == [1.0] * C
    assert loss.previous_class_weights.tolist() == [1.0] * C and float(loss.window_count.sum()) == 0
    with pytest.raises(ValueError, match="CDB_S.SAMPLER_LAG must be an integer >= 1, got 0"):
        build_loss("cdb_s", C, sampler_lag=0)


# -- configs -----------------------------------------------------------------------------------------


def _cfg(path=None):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    if path:
        merge_config_file(cfg, os.path.join(ROOT, "configs", path))
    return cfg


@pytest.mark.parametrize("path", [os.path.join("LVISv1-InstanceSegmentation", "cdb_s_mask_rcnn_R_50_FPN_1x.yaml"),
                                  os.path.join("quickstart", "cdb_s_mask_rcnn_R18_FPN_synthetic.yaml")])
def test_configs(path):
    cfg = _cfg(path)
    validate_config(cfg)
    assert cfg.MODEL.EQLOSSES.LOSS == "cdb_s" and cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME
    node = cfg.MODEL.EQLOSSES.CDB_S
    if path.startswith("LVIS"):
        assert (node.UPDATE_PERIOD, node.SAMPLER_LAG, cfg.SOLVER.MAX_ITER) == (6260, 50, 90000)
    else:
        assert (node.UPDATE_PERIOD, node.SAMPLER_LAG) == (225, 20)


def test_sampler_and_loss_need_each_other():
    cfg = _cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = SAMPLER_NAME
    with pytest.raises(ConfigError, match=r"SAMPLER_TRAIN ClassDifficultyTrainingSampler needs MODEL.EQLOSSES.LOSS "
                                          r"cdb_s .*got 'softmax'"):
        validate_config(cfg)
    cfg = _cfg()
    cfg.MODEL.EQLOSSES.LOSS = "cdb_s"
    with pytest.raises(ConfigError, match=r"LOSS cdb_s needs DATALOADER.SAMPLER_TRAIN .*got 'TrainingSampler'"):
        validate_config(cfg)


# -- trainings ---------------------------------------------------------------------------------------


def _train_opts(tiny_dataset, out, max_iter, workers=0):
    from test_training import _opts

    return _opts(tiny_dataset, out, max_iter=max_iter) + [
        "MODEL.EQLOSSES.LOSS", "cdb_s", "DATALOADER.SAMPLER_TRAIN", SAMPLER_NAME,
        "MODEL.EQLOSSES.CDB_S.UPDATE_PERIOD", "2", "MODEL.EQLOSSES.CDB_S.SAMPLER_LAG", "1",
        "DATALOADER.NUM_WORKERS", str(workers), "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()",
    ]


def test_resume_across_windows_matches_the_uninterrupted_run(tiny_dataset, tmp_path):
    """Windows of 2 steps, lag 1, one loader worker: --resume from the checkpoint after iteration 3
    (sampler window 1 of [3, 5) in progress, version 1 published, version 2 not yet) ends with the
    uninterrupted run's weights and CDB-S state, bit for bit."""
    from resume_helpers import resume_and_compare
    from test_training import QUICKSTART, _run

    final, mid = resume_and_compare(
        _run, lambda out: ["--config-file", QUICKSTART] + _train_opts(tiny_dataset, out, 7), tmp_path,
        iteration=6,  # the last of 7 iterations
    )
    prefix = "roi_heads.box_predictor.cls_loss."
    assert int(mid[prefix + "num_steps"]) == 3 and int(final["model"][prefix + "num_steps"]) == 7
    # window 1 (iterations 3 and 4, after the resume) drew by weights that are not uniform
    weights = mid[prefix + "class_weights"]
    assert not torch.equal(weights, torch.ones_like(weights)) and float(weights.sum()) == pytest.approx(6.0)


def test_quickstart_trains_with_a_loader_worker_and_evaluates(tiny_dataset, tmp_path):
    """One loader worker (the sampler in another process, the weights through shared memory), 8
    iterations over four windows: no wait times out, the run evaluates."""
    from test_training import _run

    config = os.path.join(ROOT, "configs", "quickstart", "cdb_s_mask_rcnn_R18_FPN_synthetic.yaml")
    opts = _train_opts(tiny_dataset, tmp_path, 8, workers=1)
    opts[len(opts) - 1 - opts[::-1].index("DATASETS.TEST") + 1] = f"('{tiny_dataset['val']}',)"  # the last one
    results = _run(["--config-file", config] + opts + ["TEST.DETECTIONS_PER_IMAGE", "50"])
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "APr", "APc", "APf"}
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert int(state["roi_heads.box_predictor.cls_loss.num_steps"]) == 8


# -- the class-aware samplers of detection (the same draw with fixed class probabilities) ------------


@pytest.mark.parametrize("name, power", [("ClassBalancedTrainingSampler", 0.0), ("SquareRootTrainingSampler", 0.5)])
def test_class_aware_detection_samplers(name, power):
    from eqlosses_d2.data.class_sampling import SAMPLER_POWERS, ClassAwareDetectionSampler

    assert SAMPLER_POWERS[name] == power
    records, labels = _one_class_dataset(per_class=(1, 4, 16))
    sampler = ClassAwareDetectionSampler(records, 3, power, seed=3, chunk=1000)
    expected = [n ** power / sum(m ** power for m in (1, 4, 16)) for n in (1, 4, 16)]  # by hand
    assert sampler.probabilities.tolist() == pytest.approx(expected, rel=1e-15)
    stream = list(itertools.islice(iter(sampler), 30000))
    observed = torch.bincount(labels[stream], minlength=3).double()
    expected_counts = 30000 * torch.tensor(expected, dtype=F64)
    assert float(((observed - expected_counts) ** 2 / expected_counts).sum()) < 13.8  # χ²(2 df) 0.999
    # two processes: the shards interleave into the one-process stream
    halves = []
    for rank in range(2):
        shard = ClassAwareDetectionSampler(records, 3, power, seed=3, chunk=1000)
        shard.rank, shard.world_size = rank, 2
        halves.append(list(itertools.islice(iter(shard), 1500)))
    assert [i for pair in zip(*halves) for i in pair] == stream[:3000]


def test_class_balanced_training_resumes_exactly(tiny_dataset, tmp_path):
    """Detectron2's loader with our class-balanced sampler: --resume continues the same stream."""
    from resume_helpers import resume_and_compare
    from test_training import QUICKSTART, _opts, _run

    resume_and_compare(
        _run, lambda out: ["--config-file", QUICKSTART] + _opts(tiny_dataset, out, max_iter=6) + [
            "DATALOADER.SAMPLER_TRAIN", "ClassBalancedTrainingSampler", "SOLVER.CHECKPOINT_PERIOD", "3",
            "DATASETS.TEST", "()"], tmp_path)
