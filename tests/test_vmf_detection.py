"""vMF-OP's classifier (Wang et al., ECCV 2022) as the RoI box classifier (``MODEL.EQLOSSES.DECOUPLING.
CLASSIFIER vmf``), with a 3-dimensional box feature so that the Bessel functions have closed forms
(I_{1/2}(κ) = √(2/(πκ)) sinh κ, A_3(κ) = coth κ − 1/κ): the training logits, the cross-entropy and
``loss_icd`` (with its decayed weight) against float64 values computed here, the κ gradient by finite
differences, the overlap-calibrated inference logits, the checkpoint round trip, cascade stages, the
config errors, the shipped configs, and the quickstart config trained 5 iterations and evaluated, then
re-evaluated without calibration."""
import math
import os

import pytest
import torch

import eqlosses_d2  # noqa: F401  # before detectron2 (its compatibility shims)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.heads.vmf import VMFHead
from eqlosses_d2.config import ConfigError, merge_config_file, merge_config_list, validate_config

from test_training import _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMF = os.path.join(ROOT, "configs", "quickstart", "vmf_mask_rcnn_R18_FPN_synthetic.yaml")
LVIS_VMF = os.path.join(ROOT, "configs", "LVISv1-InstanceSegmentation", "vmf_mask_rcnn_R_50_FPN_2x.yaml")
SOFTMAX = ["MODEL.EQLOSSES.LOSS", "softmax"]  # no class statistics needed (Balanced Softmax reads image counts)
P3 = ["MODEL.ROI_BOX_HEAD.FC_DIM", "3"] + SOFTMAX  # p = 3, plain softmax CE


def _cfg(config=VMF, opts=()):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    merge_config_list(cfg, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "3"] + list(opts))
    return cfg


def _model(opts=(), seed=0, config=VMF):
    torch.manual_seed(seed)
    return build_model(_cfg(config, opts)).eval()


def _predictors(model):
    predictor = model.roi_heads.box_predictor
    return list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]


def _proposals(labels):
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0]]).repeat(len(labels), 1)
    inst = Instances((64, 64))
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes + 1)
    inst.gt_classes = torch.tensor(labels)
    return [inst]


# -- closed forms for p = 3 --------------------------------------------------------------------------


def _b(kappa):
    """b(κ) = log C_3(κ) − log C_3(16), C_3(κ) ∝ κ / sinh κ."""
    return (math.log(kappa) - math.log(math.sinh(kappa))) - (math.log(16.0) - math.log(math.sinh(16.0)))


def _a(kappa):
    return 1 / math.tanh(kappa) - 1 / kappa


def _unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _setup(predictor, seed=0):
    """float64 predictor with random directions and κ' in [0.5, 6] (one below the clamp at 1)."""
    predictor.double()
    g = torch.Generator().manual_seed(seed)
    head = predictor.cls_score
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float64))
        head.kappa.copy_(torch.tensor([0.5, 2.0, 4.5, 6.0], dtype=torch.float64))
    features = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return head, features


def _hand_logits(head, features, kappas=None):
    mus = [_unit(w) for w in head.weight.tolist()]
    kappa = [max(k, 1.0) for k in head.kappa.tolist()]
    scale = kappa if kappas is None else kappas
    return [[scale[j] * _dot(_unit(x), mus[j]) + _b(kappa[j]) for j in range(len(mus))] for x in features.tolist()], mus, kappa


def _hand_overlap(mus, kappa):
    c = len(mus)
    op = [[0.0] * c for _ in range(c)]
    for i in range(c):
        for j in range(c):
            kl = _a(kappa[i]) * (kappa[i] - kappa[j] * _dot(mus[i], mus[j])) + _b(kappa[i]) - _b(kappa[j])
            op[i][j] = 1 / (1 + kl)
    return op


def test_training_logits_cross_entropy_and_icd_by_hand():
    (predictor,) = _predictors(_model(P3))
    assert isinstance(predictor.cls_score, VMFHead) and predictor.cls_score.weight.shape == (4, 3)
    head, features = _setup(predictor)
    labels = [0, 3, 2, 3, 1]
    predictor.train()
    scores, _ = predictor(features)
    expected, mus, kappa = _hand_logits(head, features)
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    losses = predictor.losses(predictor(features), _proposals(labels))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_icd"}
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(expected, labels)) / len(labels)
    assert math.isclose(losses["loss_cls"].item(), ce, rel_tol=1e-6)  # the loss casts to float32
    op = _hand_overlap(mus, kappa)
    icd = sum(op[i][j] for i in range(4) for j in range(4) if i != j) / 16
    assert math.isclose(losses["loss_icd"].item(), 0.2 * icd, rel_tol=1e-6)  # no trainer: the full weight
    mean_overlap = [sum(row) / 4 for row in op]
    assert torch.allclose(head.overlap.double(), torch.tensor(mean_overlap, dtype=torch.float64), rtol=1e-6)
    # in a trainer at iteration 300 of SOLVER.MAX_ITER 600: w (1 − 0.5)^0.9
    with EventStorage(300):
        decayed = predictor.losses(predictor(features), _proposals(labels))
    assert math.isclose(decayed["loss_icd"].item(), 0.2 * 0.5 ** 0.9 * icd, rel_tol=1e-6)


def test_kappa_gradient_matches_finite_differences():
    (predictor,) = _predictors(_model(P3))
    head, features = _setup(predictor, seed=1)
    with torch.no_grad():
        head.kappa.copy_(torch.tensor([1.5, 2.0, 4.5, 6.0], dtype=torch.float64))  # away from the clamp's kink
    predictor.train()
    labels = torch.tensor([0, 3, 2, 3, 1])

    def total(kappa):
        with torch.no_grad():
            head.kappa.copy_(kappa)
        logits = head(features)
        aux = head.auxiliary_losses(None, labels)
        return torch.nn.functional.cross_entropy(logits, labels) + aux["loss_icd"].double()

    base = head.kappa.detach().clone()
    head.kappa.grad = None
    total(base).backward()
    analytic = head.kappa.grad.clone()
    eps = 1e-3  # loss_icd is float32 (the head's): a wider step, central differences (error O(eps²))
    for j in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[j] = eps
        with torch.no_grad():
            numeric = (total(base + step) - total(base - step)) / (2 * eps)
        assert math.isclose(float(analytic[j]), float(numeric), rel_tol=1e-3, abs_tol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0])
def test_inference_with_overlap_calibration_by_hand(alpha):
    (predictor,) = _predictors(_model(P3 + ["MODEL.EQLOSSES.VMF.TEST_ALPHA", str(alpha)]))
    head, features = _setup(predictor, seed=2)
    predictor.train()
    predictor.losses(predictor(features), _proposals([0, 3, 1, 3, 2]))  # refreshes the overlaps
    predictor.eval()
    _, mus, kappa = _hand_logits(head, features)
    overlap = [sum(row) / 4 for row in _hand_overlap(mus, kappa)]
    lo, hi = min(overlap), max(overlap)
    rescaled = [(o - lo) / (hi - lo) * (max(kappa) - min(kappa)) + min(kappa) for o in overlap]
    calibrated = [k ** alpha * r ** (1 - alpha) for k, r in zip(kappa, rescaled)]
    expected, _, _ = _hand_logits(head, features, kappas=calibrated)
    scores, _ = predictor(features)
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    probs = predictor.predict_probs((scores, None), _proposals([0] * 5))[0]
    assert torch.allclose(probs, torch.softmax(torch.tensor(expected), dim=1).to(probs.dtype), atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = _model(SOFTMAX)
    (predictor,) = _predictors(model)
    predictor.train()
    with torch.no_grad():
        predictor.cls_score.kappa.uniform_(2.0, 20.0)
    predictor.losses(predictor(torch.rand(4, predictor.cls_score.in_features)), _proposals([0, 3, 1, 2]))
    overlap = predictor.cls_score.overlap.clone()
    assert overlap.abs().sum() > 0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("vmf")
    other = _model(SOFTMAX, seed=4)
    DetectionCheckpointer(other).load(str(tmp_path / "vmf.pth"))
    (loaded,) = _predictors(other)
    assert torch.equal(loaded.cls_score.overlap, overlap)
    assert torch.equal(loaded.cls_score.kappa, predictor.cls_score.kappa)
    x = torch.rand(3, predictor.cls_score.in_features)
    predictor.eval()
    assert torch.equal(predictor(x)[0], loaded(x)[0])


def test_cascade_stages_have_their_own_classifiers():
    model = _model(SOFTMAX + ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    predictors = _predictors(model)
    assert len(predictors) == 3 and all(isinstance(p.cls_score, VMFHead) for p in predictors)
    for k, predictor in enumerate(predictors):
        predictor.train()
        with torch.no_grad():
            predictor.cls_score.kappa.fill_(4.0 + k)
        losses = predictor.losses(predictor(torch.rand(4, predictor.cls_score.in_features)), _proposals([0, 3, 1, 2]))
        assert "loss_icd" in losses
    overlaps = [p.cls_score.overlap for p in predictors]
    assert not torch.equal(overlaps[0], overlaps[1])
    keys = [k for k in model.state_dict() if k.endswith("cls_score.overlap")]
    assert keys == [f"roi_heads.box_predictor.{k}.cls_score.overlap" for k in range(3)]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.EQLOSSES.VMF.K_INIT", "0.5"], "MODEL.EQLOSSES.VMF.K_INIT must be >= 1"),
        (["MODEL.EQLOSSES.VMF.ICD_WEIGHT", "-1.0"], "MODEL.EQLOSSES.VMF.ICD_WEIGHT must be >= 0"),
        (["MODEL.EQLOSSES.VMF.AUX_DECAY_POWER", "-1.0"], "MODEL.EQLOSSES.VMF.AUX_DECAY_POWER must be >= 0"),
        (["MODEL.EQLOSSES.VMF.TEST_ALPHA", "1.5"], "MODEL.EQLOSSES.VMF.TEST_ALPHA must be in [0, 1]"),
        (["MODEL.EQLOSSES.BALANCED_SOFTMAX.FORM", "sigmoid"], "MODEL.EQLOSSES.LOSS must be softmax or balanced_softmax"),
        (["MODEL.EQLOSSES.LOSS", "sigmoid"], "got 'sigmoid'"),
        (["MODEL.EQLOSSES.COSINE_SCALE", "20.0"], "MODEL.EQLOSSES.COSINE_SCALE must be 0"),
        (["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"], "RETRAIN_CLASSIFIER is not supported"),
        (["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal"], "TEST.EQLOSSES.CALIBRATION.METHOD must be none"),
        (["MODEL.ROI_HEADS.NAME", "LongTailIterativeROIHeads"], "MODEL.ROI_HEADS.NAME one of"),
    ],
)
def test_config_errors_are_one_line(opts, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_cfg(VMF, opts))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("config", [VMF, LVIS_VMF], ids=os.path.basename)
def test_shipped_configs(config):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    validate_config(cfg)
    node = cfg.MODEL.EQLOSSES
    assert (node.LOSS, node.BALANCED_SOFTMAX.FORM, node.DECOUPLING.CLASSIFIER) == ("balanced_softmax", "softmax", "vmf")
    assert (node.VMF.K_INIT, node.VMF.ICD_WEIGHT, node.VMF.AUX_DECAY_POWER, node.VMF.TEST_ALPHA) == (16.0, 0.2, 0.9, 0.5)
    if config == LVIS_VMF:
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (180000, (120000, 160000))
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"


def test_quickstart_trains_and_evaluates_and_eval_only_takes_another_alpha(tiny_dataset, tmp_path):
    out = tmp_path / "train"
    results = _run(["--config-file", VMF] + _opts(tiny_dataset, out, max_iter=5))
    assert set(results) >= {"bbox", "segm"}
    assert all(not math.isnan(results[t]["AP"]) for t in ("bbox", "segm"))
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert state["roi_heads.box_predictor.cls_score.overlap"].abs().sum() > 0
    assert not torch.equal(state["roi_heads.box_predictor.cls_score.kappa"],
                           torch.full_like(state["roi_heads.box_predictor.cls_score.kappa"], 16.0))
    again = _run(["--config-file", VMF, "--eval-only"] + _opts(tiny_dataset, tmp_path / "eval", max_iter=5) + [
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.EQLOSSES.VMF.TEST_ALPHA", "1.0"])
    assert set(again) >= {"bbox", "segm"}
