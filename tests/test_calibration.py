"""Post-hoc calibration (NorCal, IIF at inference, τ-norm): calibrated probabilities by
hand for every variant, γ = 0 exactly the uncalibrated output, the cascade head
calibrating its averaged stage scores, config errors, the sweep tool end to end."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.calibration import (
    ScoreCalibration,
    norcal_binary,
    norcal_factors,
    norcal_softmax_logits,
    norcal_softmax_probs,
    tau_normalized_logits,
)
from eqlosses_d2.config import ConfigError, validate_eval_protocol
from eqlosses_d2.losses import build_loss

C = 3
IMAGE_COUNT = [1, 4, 100]
INSTANCE_COUNT = [2, 9, 400]
NUM_IMAGES = 1000


def _stats():
    return SimpleNamespace(
        image_count=torch.tensor(IMAGE_COUNT), instance_count=torch.tensor(INSTANCE_COUNT),
        num_images=torch.tensor(NUM_IMAGES), num_images_with_annotations=torch.tensor(900),
        frequency_group=torch.tensor([0, 1, 2]), is_set=torch.tensor(True),
    )


def _logits(cols, seed=0, rows=5):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_norcal_factors_by_hand():
    assert norcal_factors(IMAGE_COUNT, 0.5).tolist() == pytest.approx([1.0, 0.5, 0.1])
    assert norcal_factors([0, 1], 1.0).tolist() == [1.0, 1.0]  # never seen: treated as seen once
    beta = 0.9
    assert norcal_factors([1, 2, 3], beta, "effective_number").tolist() == pytest.approx(
        [1.0, 0.1 / (1 - 0.81), 0.1 / (1 - 0.729)])
    with pytest.raises(ValueError, match="0 <= gamma < 1"):
        norcal_factors([1], 1.0, "effective_number")


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_norcal_exps_is_softmax_with_shifted_foreground_logits(gamma):
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1)
    z = logits.double().numpy()
    shifted = z.copy()
    shifted[:, :C] -= gamma * np.log(IMAGE_COUNT)  # exp(z_c) / n_c^γ, background unchanged
    expected = _softmax(shifted)
    for variant in ("exps", "probs"):  # the same function with renormalization
        calibration = ScoreCalibration("norcal", gamma=gamma, variant=variant)
        np.testing.assert_allclose(calibration.probs_from_logits(logits, loss), expected, rtol=1e-5, atol=1e-7)
    # by hand, first row: foreground exponentials divided by n^γ, renormalized with the background's
    e = np.exp(z[0])
    q = np.append(e[:C] / np.array(IMAGE_COUNT, float) ** gamma, e[C])
    np.testing.assert_allclose(expected[0], q / q.sum(), rtol=1e-12)
    assert expected[:, C].tolist() != _softmax(z)[:, C].tolist()  # the background share changes by renormalization


def test_norcal_variants_without_renormalization_and_on_logits():
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1, seed=1)
    z = logits.double().numpy()
    f = np.array(IMAGE_COUNT, float) ** -0.5
    scale = np.append(f, 1.0)
    exps = ScoreCalibration("norcal", gamma=0.5, variant="exps", renorm=False).probs_from_logits(logits, loss)
    np.testing.assert_allclose(exps, np.exp(z) * scale, rtol=1e-5)
    probs = ScoreCalibration("norcal", gamma=0.5, variant="probs", renorm=False).probs_from_logits(logits, loss)
    np.testing.assert_allclose(probs, _softmax(z) * scale, rtol=1e-5)
    on_logits = ScoreCalibration("norcal", gamma=0.5, variant="logits").probs_from_logits(logits, loss)
    np.testing.assert_allclose(on_logits, _softmax(z * scale), rtol=1e-5)  # the authors multiply the logits


def test_gamma_zero_is_exactly_uncalibrated():
    logits = _logits(C + 1, seed=2)
    for name, cols in (("softmax", C + 1), ("sigmoid", C), ("seesaw", C + 2), ("eqlv2", C + 1)):
        loss = build_loss(name, C, class_stats=_stats())
        x = _logits(cols, seed=2)
        for variant in ("exps", "probs", "logits"):
            calibration = ScoreCalibration("norcal", gamma=0.0, variant=variant)
            assert torch.equal(calibration.probs_from_logits(x, loss), loss.predict_probs(x))
        assert torch.equal(ScoreCalibration("tau_norm", tau=0.0).probs_from_logits(x, loss, classifier=None),
                           loss.predict_probs(x))
    assert torch.equal(ScoreCalibration().probs_from_logits(logits, build_loss("softmax", C)),
                       torch.softmax(logits, dim=1))


def test_norcal_effective_number_factor():
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1, seed=3)
    beta = 0.5
    f = (1 - beta) / (1 - beta ** np.array(IMAGE_COUNT, float))
    p = _softmax(logits.double().numpy())
    q = p * np.append(f, 1.0)
    calibration = ScoreCalibration("norcal", gamma=beta, variant="probs", factor="effective_number")
    np.testing.assert_allclose(calibration.probs_from_logits(logits, loss), q / q.sum(1, keepdims=True), rtol=1e-5)


def test_norcal_instance_counts():
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1, seed=4)
    p = _softmax(logits.double().numpy())
    q = p * np.append(np.array(INSTANCE_COUNT, float) ** -1.0, 1.0)
    calibration = ScoreCalibration("norcal", gamma=1.0, count="instance")
    np.testing.assert_allclose(calibration.probs_from_logits(logits, loss), q / q.sum(1, keepdims=True), rtol=1e-5)


def test_norcal_on_seesaw_scales_its_class_probabilities():
    loss = build_loss("seesaw", C, class_stats=_stats())
    logits = _logits(C + 2, seed=5)
    p = loss.predict_probs(logits).double().numpy()  # class softmax × objectness, background = objectness
    q = p * np.append(np.array(IMAGE_COUNT, float) ** -0.7, 1.0)
    calibration = ScoreCalibration("norcal", gamma=0.7)
    np.testing.assert_allclose(calibration.probs_from_logits(logits, loss), q / q.sum(1, keepdims=True), rtol=1e-5)


def test_norcal_sigmoid_heads_use_the_binary_rule():
    loss = build_loss("sigmoid", C, class_stats=_stats())
    logits = _logits(C, seed=6)
    z = logits.double().numpy()
    calibration = ScoreCalibration("norcal", gamma=0.5)
    out = calibration.probs_from_logits(logits, loss)
    expected = 1 / (1 + np.exp(-(z + np.log(np.array(IMAGE_COUNT, float) ** -0.5))))  # σ(z_c + log f_c)
    np.testing.assert_allclose(out[:, :C], expected, rtol=1e-5)
    # EQLv2: its objectness-weighted probabilities, last column passed through
    eqlv2 = build_loss("eqlv2", C, class_stats=_stats())
    x = _logits(C + 1, seed=7)
    p = eqlv2.predict_probs(x).double().numpy()
    f = np.array(IMAGE_COUNT, float) ** -0.5
    q = p[:, :C] * f / (p[:, :C] * f + 1 - p[:, :C])
    got = calibration.probs_from_logits(x, eqlv2)
    np.testing.assert_allclose(got[:, :C], q, rtol=1e-5)
    assert torch.equal(got[:, C], eqlv2.predict_probs(x)[:, C])
    # probabilities at the ends stay there
    assert norcal_binary(torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([0.1, 0.1, 1.0])).tolist() == [[0.0, 1.0, 0.5]]


def test_iif_at_inference_on_a_softmax_head():
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1, seed=8)
    z = logits.double().numpy()
    for variant, weights in (
        ("raw", [math.log(NUM_IMAGES / n) for n in IMAGE_COUNT]),
        ("smooth", [math.log((NUM_IMAGES + 1) / (n + 1)) + 1 for n in IMAGE_COUNT]),
        ("raw_obj", [math.log(sum(INSTANCE_COUNT) / n) for n in INSTANCE_COUNT]),
    ):
        out = ScoreCalibration("iif", iif_variant=variant).probs_from_logits(logits, loss)
        np.testing.assert_allclose(out, _softmax(z * np.append(weights, 1.0)), rtol=1e-5, atol=1e-30)
    # on a head trained with IIF the weights would apply twice (w * w): refused
    iif_loss = build_loss("iif", C, class_stats=_stats())
    with pytest.raises(ValueError, match="would apply the IIF weights twice"):
        ScoreCalibration("iif", iif_variant="raw").check_head(iif_loss, cosine=False)
    ScoreCalibration("norcal", gamma=0.5).check_head(iif_loss, cosine=False)  # other calibrations are fine


def test_tau_norm_rescales_foreground_weights():
    g = torch.Generator().manual_seed(9)
    layer = torch.nn.Linear(6, C + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C + 1, 6, generator=g) * torch.tensor([[0.5], [1.0], [3.0], [2.0]]))
        layer.bias.copy_(torch.randn(C + 1, generator=g))
    x = torch.randn(4, 6, generator=g)
    logits = layer(x).detach()
    w, b, xs = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy(), x.double().numpy()
    tau = 0.7
    expected = xs @ w.T + b
    norms = np.linalg.norm(w[:C], axis=1)
    expected[:, :C] = xs @ (w[:C] / norms[:, None] ** tau).T + b[:C]  # background row untouched
    np.testing.assert_allclose(tau_normalized_logits(logits, layer.weight, layer.bias, tau, C), expected,
                               rtol=1e-5, atol=1e-6)
    loss = build_loss("softmax", C, class_stats=_stats())
    out = ScoreCalibration("tau_norm", tau=tau).probs_from_logits(logits, loss, classifier=layer)
    np.testing.assert_allclose(out, _softmax(expected), rtol=1e-5)


def test_config_errors_are_one_line():
    def cfg_with(**keys):
        cfg = get_cfg()
        add_eqlosses_config(cfg)
        for key, value in keys.items():
            node = cfg
            parts = key.split("__")
            for part in parts[:-1]:
                node = node[part]
            node[parts[-1]] = value
        return cfg

    cases = [
        (dict(TEST__EQLOSSES__CALIBRATION__METHOD="platt"), "TEST.EQLOSSES.CALIBRATION.METHOD: unknown 'platt'"),
        (dict(TEST__EQLOSSES__CALIBRATION__METHOD="iif", MODEL__EQLOSSES__LOSS="sigmoid"),
         "TEST.EQLOSSES.CALIBRATION.METHOD iif needs a softmax head"),
        (dict(TEST__EQLOSSES__CALIBRATION__METHOD="norcal", TEST__EQLOSSES__CALIBRATION__VARIANT="logits",
              MODEL__EQLOSSES__LOSS="eqlv2"), "TEST.EQLOSSES.CALIBRATION.VARIANT logits of NorCal needs a softmax head"),
        (dict(TEST__EQLOSSES__CALIBRATION__METHOD="tau_norm", MODEL__EQLOSSES__COSINE_SCALE=20.0),
         "TEST.EQLOSSES.CALIBRATION.METHOD tau_norm does nothing with a cosine classifier"),
        (dict(TEST__EQLOSSES__CALIBRATION__FACTOR="effective_number", TEST__EQLOSSES__CALIBRATION__GAMMA=1.5),
         "TEST.EQLOSSES.CALIBRATION.GAMMA must be in [0, 1)"),
        (dict(TEST__EQLOSSES__CALIBRATION__IIF_VARIANT="nope"), "TEST.EQLOSSES.CALIBRATION.IIF_VARIANT: unknown 'nope'"),
        (dict(TEST__EQLOSSES__CALIBRATION__METHOD="iif", MODEL__EQLOSSES__LOSS="iif"),
         "TEST.EQLOSSES.CALIBRATION.METHOD iif on a head trained with the IIF loss (MODEL.EQLOSSES.LOSS iif) "
         "would apply the IIF weights twice"),
    ]
    for keys, message in cases:
        with pytest.raises(ConfigError) as info:
            validate_eval_protocol(cfg_with(**keys))
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    # the softmax-head errors name every loss with a plain-softmax head
    for keys in (dict(TEST__EQLOSSES__CALIBRATION__METHOD="iif", MODEL__EQLOSSES__LOSS="sigmoid"),
                 dict(TEST__EQLOSSES__CALIBRATION__METHOD="norcal", TEST__EQLOSSES__CALIBRATION__VARIANT="logits",
                      MODEL__EQLOSSES__LOSS="seesaw")):
        with pytest.raises(ConfigError) as info:
            validate_eval_protocol(cfg_with(**keys))
        assert "(cdb_s, cdb_w, equilibrium, iif, softmax, softmax_eql, pcb with PCB.BASE softmax)" in str(info.value)
    for name in ("softmax", "softmax_eql", "equilibrium", "pcb", "cdb_s"):  # ... and each of them is accepted
        validate_eval_protocol(cfg_with(TEST__EQLOSSES__CALIBRATION__METHOD="iif", MODEL__EQLOSSES__LOSS=name))


def _model(head, tiny_dataset, calibration_opts=()):
    import train_net
    from test_training import QUICKSTART

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", f"('{tiny_dataset['train']}',)",
        "DATASETS.TEST", f"('{tiny_dataset['val']}',)", "MODEL.ROI_HEADS.NAME", head,
        "MODEL.ROI_HEADS.NUM_CLASSES", str(tiny_dataset["spec"].num_categories),
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", str(head == "LongTailCascadeROIHeads"),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *calibration_opts,
    ])
    torch.manual_seed(0)
    model = train_net.Trainer.build_model(cfg).eval()
    return cfg, model


def _features_and_proposals(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [{"image": (torch.rand(3, 64, 80, generator=g) * 255), "height": 64, "width": 80}]
    images = model.preprocess_image(images)
    features = model.backbone(images.tensor)
    proposals = Instances((64, 80))
    xy = torch.rand(40, 2, generator=g) * torch.tensor([60.0, 48.0])
    wh = torch.rand(40, 2, generator=g) * 20 + 4
    proposals.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
    proposals.objectness_logits = torch.zeros(40)
    return features, [proposals]


def _same_instances(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.pred_classes, y.pred_classes)
        assert torch.equal(x.scores, y.scores)
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)


@torch.no_grad()
@pytest.mark.parametrize("head", ["LongTailStandardROIHeads", "LongTailCascadeROIHeads"])
def test_split_inference_matches_detectron2(head, tiny_dataset):
    from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads

    cfg, model = _model(head, tiny_dataset)
    features, proposals = _features_and_proposals(model)
    parent = CascadeROIHeads if head == "LongTailCascadeROIHeads" else StandardROIHeads
    theirs = parent._forward_box(model.roi_heads, features, proposals)
    heads = model.roi_heads
    ours = heads.instances_from_box_outputs(heads.box_outputs(features, proposals), [p.image_size for p in proposals])
    _same_instances(ours, theirs)
    assert len(ours[0]) > 0
    _same_instances(heads._forward_box(features, proposals), theirs)


@torch.no_grad()
def test_cascade_calibrates_the_average_of_its_stages(tiny_dataset):
    opts = ["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal", "TEST.EQLOSSES.CALIBRATION.GAMMA", "0.8"]
    cfg, model = _model("LongTailCascadeROIHeads", tiny_dataset, opts)
    heads = model.roi_heads
    features, proposals = _features_and_proposals(model, seed=1)
    outputs = heads.box_outputs(features, proposals)
    stage_probs = [predictor.cls_loss.predict_probs(predictions[0]) for predictor, predictions, _ in outputs]
    average = sum(stage_probs) / 3
    counts = heads.class_stats.image_count.double().clamp(min=1)
    q = average.double() * torch.cat([counts ** -0.8, torch.ones(1, dtype=torch.float64)])
    q = q / q.sum(1, keepdim=True)
    # the scores fast_rcnn_inference receives: capture them
    import eqlosses_d2.modeling.roi_heads as module

    captured = {}
    original = module.fast_rcnn_inference

    def spy(boxes, scores, *args):
        captured["scores"] = scores
        return original(boxes, scores, *args)

    module.fast_rcnn_inference = spy
    try:
        heads._forward_box(features, proposals)
    finally:
        module.fast_rcnn_inference = original
    np.testing.assert_allclose(captured["scores"][0].double(), q, rtol=1e-5, atol=1e-8)
    # ...which is not what calibrating each stage and averaging gives
    per_stage = sum(ScoreCalibration("norcal", gamma=0.8).finish(p, outputs[0][0].cls_loss) for p in stage_probs) / 3
    assert (per_stage.double() - q).abs().max() > 1e-4


def test_sweep_tool_and_eval_only_on_a_checkpoint_without_class_stats(tiny_dataset, tmp_path):
    """The sweep on a briefly trained model: γ = 0 equals the plain evaluation, and a
    checkpoint without class statistics gets them from CLASS_STATS_DATASET."""
    import json

    import train_net
    from test_training import QUICKSTART, _opts, _run

    opts = _opts(tiny_dataset, tmp_path, max_iter=3) + ["TEST.DETECTIONS_PER_IMAGE", "50"]
    plain = _run(["--config-file", QUICKSTART] + opts)
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if "class_stats" not in k}
    torch.save(state, tmp_path / "no_stats.pth")
    sys_argv = ["--config-file", QUICKSTART, "--dataset", tiny_dataset["val"], "--values", "0", "0.5",
                "--output-dir", str(tmp_path / "sweep")] + opts + ["MODEL.WEIGHTS", str(tmp_path / "no_stats.pth")]
    tools = os.path.join(os.path.dirname(train_net.__file__), "tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibration_sweep_tool", os.path.join(tools, "calibration_sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(sys_argv) == 0
    with open(tmp_path / "sweep" / "calibration_sweep.json") as f:
        rows = json.load(f)["rows"]
    assert [r["value"] for r in rows] == [0.0, 0.5]
    for task in ("bbox", "segm"):
        for metric in ("AP", "APr", "APc", "APf"):
            a, b = rows[0][task][metric], plain[task][metric]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (task, metric)
    assert (tmp_path / "sweep" / "calibration_sweep.png").stat().st_size > 1000
    assert "| gamma |" in (tmp_path / "sweep" / "calibration_sweep.md").read_text()
    # --eval-only with calibration on the same stats-less checkpoint
    results = _run(["--config-file", QUICKSTART, "--eval-only"] + opts + [
        "MODEL.WEIGHTS", str(tmp_path / "no_stats.pth"), "TEST.EQLOSSES.CALIBRATION.METHOD", "norcal",
        "TEST.EQLOSSES.CALIBRATION.GAMMA", "0.5"])
    for task in ("bbox", "segm"):
        for metric in ("AP", "APr"):
            a, b = results[task][metric], rows[1][task][metric]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (task, metric)


def test_calibrates_a_checkpoint_trained_by_plain_detectron2(tiny_dataset, tmp_path):
    """A Detectron2 model (StandardROIHeads, FastRCNNOutputLayers, no class statistics)
    loads into our head unchanged and evaluates with NorCal in --eval-only."""
    import train_net
    from detectron2.modeling import build_model
    from test_training import QUICKSTART, _opts, _run

    from eqlosses_d2.checkpoint import AtomicCheckpointer

    opts = _opts(tiny_dataset, tmp_path, max_iter=3) + ["TEST.DETECTIONS_PER_IMAGE", "50"]
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(opts + ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    torch.manual_seed(3)
    theirs = build_model(cfg)
    assert type(theirs.roi_heads).__name__ == "StandardROIHeads"
    torch.save({"model": theirs.state_dict()}, tmp_path / "detectron2_model.pth")

    ours_cfg = get_cfg()
    add_eqlosses_config(ours_cfg)
    ours_cfg.merge_from_file(QUICKSTART)
    ours_cfg.merge_from_list(opts)
    ours = train_net.Trainer.build_model(ours_cfg, with_class_stats=False)
    AtomicCheckpointer(ours).load(str(tmp_path / "detectron2_model.pth"), checkpointables=[])
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert not bool(ours.roi_heads.class_stats.is_set)
    train_net.Trainer.fill_missing_class_stats(ours_cfg, ours)
    assert ours.roi_heads.class_stats.image_count.sum() > 0

    results = _run(["--config-file", QUICKSTART, "--eval-only"] + opts + [
        "MODEL.WEIGHTS", str(tmp_path / "detectron2_model.pth"), "TEST.EQLOSSES.CALIBRATION.METHOD", "norcal",
        "TEST.EQLOSSES.CALIBRATION.GAMMA", "0.6"])
    assert set(results["bbox"]) >= {"AP", "APr", "APc", "APf"}


def _allocated_bytes(function):
    """Bytes the CPU allocator handed out while ``function`` ran (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = function()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), out


def test_norcal_inference_allocates_only_its_output(monkeypatch):
    """NorCal (exps, renormalized) on a softmax head: one output-sized allocation plus a
    chunk of scratch (before: the softmax, the scaled copy and the renormalized copy, 3x),
    and the scores equal the softmax-then-calibrate definition across chunk boundaries."""
    import eqlosses_d2.losses.fused as fused

    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 64 * (C + 1))  # 64 rows a chunk
    rows = 1000
    loss = build_loss("softmax", C, class_stats=_stats())
    logits = _logits(C + 1, seed=10, rows=rows) * 5
    calibration = ScoreCalibration("norcal", gamma=0.6)
    allocated, out = _allocated_bytes(lambda: calibration.probs_from_logits(logits, loss))
    output_bytes = out.numel() * out.element_size()
    assert allocated <= 1.1 * output_bytes, allocated / output_bytes
    reference = norcal_softmax_probs(torch.softmax(logits, dim=1), norcal_factors(IMAGE_COUNT, 0.6))
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-7)
    expected = _softmax(logits.double().numpy() - np.append(0.6 * np.log(IMAGE_COUNT), 0.0))
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-8)


def test_chunked_calibrations_equal_the_whole_matrix(monkeypatch):
    """The row-chunked kernels (logits variant, IIF, binary rule, probs renormalization)
    give bit for bit what one pass over the whole matrix gives."""
    import eqlosses_d2.losses.fused as fused

    logits = _logits(C + 1, seed=11, rows=50)
    factors = norcal_factors(IMAGE_COUNT, 0.7)
    scale = torch.cat([factors.float(), torch.ones(1)])
    probs = torch.softmax(logits, dim=1)
    expected = {
        "logits": torch.softmax(logits * scale, dim=1),
        "iif": torch.softmax(logits * scale, dim=1),
        "probs": (lambda q: q / q.sum(dim=1, keepdim=True))(probs * scale),
        "binary": torch.cat([(lambda s: s / (s + (1.0 - probs[:, :C])))(probs[:, :C] * factors.float()),
                             probs[:, C:]], dim=1),
    }
    from eqlosses_d2.calibration import iif_softmax

    for chunk_rows in (1, 7, 50):
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk_rows * (C + 1))
        got = {
            "logits": norcal_softmax_logits(logits, factors),
            "iif": iif_softmax(logits, factors),
            "probs": norcal_softmax_probs(probs, factors),
            "binary": norcal_binary(probs, factors),
        }
        for name in expected:
            assert torch.equal(got[name], expected[name]), (name, chunk_rows)
    assert torch.equal(probs, torch.softmax(logits, dim=1))  # the inputs are left alone
