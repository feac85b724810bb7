"""TDE (Tang et al., NeurIPS 2020) as the RoI box classifier (``MODEL.EQLOSSES.DECOUPLING.CLASSIFIER
tde``): the training logits, the TDE logits and the Background-Exempted probabilities against float64
loops written here (and against the authors' own epsilon formula), the weight gradient by finite
differences, the foreground moving direction over 3 steps by hand, its checkpoint round trip, two
gloo processes (the same direction on both ranks, equal to the one-process global-batch update),
cascade stages with their own directions, the config errors, the shipped configs, and the
quickstart config trained 5 iterations and evaluated, then re-evaluated with another α."""
import math
import os

import numpy as np
import pytest
import torch

import eqlosses_d2  # noqa: F401  # before detectron2 (its compatibility shims), also in spawned processes
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import ConfigError, merge_config_file, merge_config_list, validate_config
from eqlosses_d2.modeling import CausalNormClassifier, LongTailOutputLayers
from eqlosses_d2.modeling.tde import background_exempted_log_probs

from test_training import _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TDE = os.path.join(ROOT, "configs", "quickstart", "tde_mask_rcnn_R18_FPN_synthetic.yaml")
LVIS_TDE = os.path.join(ROOT, "configs", "LVISv1-InstanceSegmentation", "tde_cascade_mask_rcnn_R_101_FPN_20e.yaml")
CASCADE = ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]


def _np(t):
    return t.detach().double().numpy()


def _norm(v):
    return math.sqrt(sum(a * a for a in v))


def _reference_logits(x, w, num_head, tau, gamma, alpha=0.0, c=None):
    """z_nj = (τ/K) Σ_k <x̂_k − α cos_k ĉ_k, w_jk/(‖w_jk‖ + γ)>, loops in float64 (α = 0: training)."""
    size = x.shape[1] // num_head
    out = np.zeros((x.shape[0], w.shape[0]))
    for n in range(x.shape[0]):
        for j in range(w.shape[0]):
            total = 0.0
            for k in range(num_head):
                xs, ws = x[n, k * size:(k + 1) * size], w[j, k * size:(k + 1) * size]
                xh = [a / _norm(xs) for a in xs]
                wh = [a / (_norm(ws) + gamma) for a in ws]
                if alpha:
                    cs = c[k * size:(k + 1) * size]
                    ch = [a / _norm(cs) for a in cs]
                    cos = sum(a * b for a, b in zip(xh, ch))
                    xh = [a - alpha * cos * b for a, b in zip(xh, ch)]
                total += sum(a * b for a, b in zip(xh, wh))
            out[n, j] = tau / num_head * total
    return out


def _softmax_rows(z):
    out = np.zeros_like(z)
    for n in range(z.shape[0]):
        m = max(z[n])
        e = [math.exp(v - m) for v in z[n]]
        out[n] = [v / sum(e) for v in e]
    return out


def _authors_exempted(z, y, eps=0.0):
    """Their KEEP_FG (lvis1.0, background last): bg = p_bg; fg_j = Σ p_fg / (Σ q_fg + ε) · (q_j + ε)."""
    p, q = _softmax_rows(z), _softmax_rows(y)
    out = np.zeros_like(z)
    for n in range(z.shape[0]):
        p_fg, q_fg = sum(p[n, :-1]), sum(q[n, :-1])
        out[n, :-1] = [p_fg / (q_fg + eps) * (v + eps) for v in q[n, :-1]]
        out[n, -1] = p[n, -1]
    return out


def _classifier(d=6, k=4, num_head=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return CausalNormClassifier(d, k, num_head=num_head, **kwargs).double()


# -- the classifier against hand values ------------------------------------------------------------


@pytest.mark.parametrize("num_head", [1, 2, 3])
def test_training_logits_by_hand(num_head):
    layer = _classifier(num_head=num_head, tau=16.0, gamma=0.03125).train()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = _reference_logits(_np(x), _np(layer.weight), num_head, 16.0, 0.03125)
    assert np.allclose(_np(layer(x)), expected, rtol=1e-12, atol=1e-12)
    assert layer.weight.shape == (4, 6) and not hasattr(layer, "bias")  # background a row, no bias
    bound = 6 ** -0.5
    assert float(layer.weight.detach().abs().max()) <= bound  # U(−1/√D, 1/√D), theirs


def test_weight_gradient_matches_finite_differences():
    layer = _classifier(num_head=2).train()
    x = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([0, 3, 2, 1])

    def loss_of(weight):
        from eqlosses_d2.classification.heads.tde import causal_norm_logits

        return torch.nn.functional.cross_entropy(causal_norm_logits(x, weight, 2, 16.0, 0.03125), labels)

    assert torch.autograd.gradcheck(loss_of, (layer.weight.detach().clone().requires_grad_(),))
    torch.nn.functional.cross_entropy(layer(x), labels).backward()
    weight = layer.weight.detach().clone().requires_grad_()
    loss_of(weight).backward()
    assert torch.allclose(layer.weight.grad, weight.grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("num_head", [1, 2, 3])
def test_tde_inference_by_hand(num_head):
    """Eval mode: the TDE logits y (BACKGROUND_EXEMPTED False), log p̃ (True, the default: exp gives
    the authors' KEEP_FG probabilities, exactly without their ε, within P ε / Q with it) and α = 0: the
    training logits."""
    layer = _classifier(num_head=num_head, alpha=1.3)
    c = torch.randn(6, dtype=torch.float64)
    layer.feature_moving_average.copy_(c)
    x = torch.randn(5, 6, dtype=torch.float64)
    w = _np(layer.weight)
    z = _reference_logits(_np(x), w, num_head, 16.0, 0.03125)
    y = _reference_logits(_np(x), w, num_head, 16.0, 0.03125, alpha=1.3, c=_np(c))
    layer.eval()
    out = _np(layer(x))
    assert np.allclose(np.exp(out), _authors_exempted(z, y), rtol=1e-12, atol=1e-14)
    # their ε: |P (q_j + ε)/(Q + ε) − P q_j/Q| <= P ε / Q (P, Q: the foreground masses of p and q)
    p, q = _softmax_rows(z), _softmax_rows(y)
    bound = p[:, :-1].sum(1, keepdims=True) * 1e-10 / q[:, :-1].sum(1, keepdims=True)
    assert (np.abs(np.exp(out) - _authors_exempted(z, y, eps=1e-10)) <= bound + 1e-15).all()
    assert np.allclose(np.exp(out).sum(axis=1), 1.0, rtol=0, atol=1e-14)
    assert np.allclose(_np(torch.softmax(torch.from_numpy(out), dim=1)), np.exp(out), rtol=1e-12, atol=1e-15)
    assert not np.allclose(np.exp(out), _softmax_rows(z))  # TDE moved the foreground
    assert np.allclose(np.exp(out[:, -1]), _softmax_rows(z)[:, -1], rtol=1e-12)  # background kept
    layer.background_exempted = False
    assert np.allclose(_np(layer(x)), y, rtol=1e-12, atol=1e-12)
    layer.alpha = 0.0
    assert np.allclose(_np(layer(x)), z, rtol=1e-12, atol=1e-12)


def test_background_exempted_log_probs_is_stable_for_large_logits():
    z = torch.tensor([[900.0, -900.0, 0.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([[-900.0, 900.0, 0.0, 1.0]], dtype=torch.float64)
    out = background_exempted_log_probs(z, y)
    assert torch.isfinite(out).all() and torch.allclose(out.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(out[0, 1], torch.tensor(0.0, dtype=torch.float64))  # all fg mass to class 1


def test_no_rois():
    layer = _classifier().train()
    assert layer(torch.zeros(0, 6, dtype=torch.float64)).shape == (0, 4)
    layer.update_direction(torch.zeros(0, dtype=torch.long))
    assert layer.feature_moving_average.abs().sum() == 0
    assert layer.eval()(torch.zeros(0, 6, dtype=torch.float64)).shape == (0, 4)


def test_inference_before_any_training_step_is_finite():
    layer = _classifier().eval()
    out = layer(torch.randn(3, 6, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_moving_direction_three_steps_by_hand():
    """c ← μ c + mean of the foreground rows (labels 0 .. C − 1; C = 3 the background, −1 ignored);
    a step without foreground only decays c."""
    layer = _classifier(d=4, k=4, momentum=0.9).train()
    torch.manual_seed(3)
    steps = [
        (torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 2, 3, 1])),
        (torch.randn(3, 4, dtype=torch.float64), torch.tensor([3, 3, 3])),
        (torch.randn(4, 4, dtype=torch.float64), torch.tensor([2, -1, 2, 3])),
    ]
    c = [0.0] * 4
    for x, labels in steps:
        layer(x)
        layer.update_direction(labels)
        rows = [_np(x)[i] for i in range(len(labels)) if 0 <= int(labels[i]) < 3]
        mean = [sum(r[d] for r in rows) / len(rows) if rows else 0.0 for d in range(4)]
        c = [0.9 * a + b for a, b in zip(c, mean)]
        assert layer.feature_moving_average.dtype == torch.float64
        assert np.allclose(_np(layer.feature_moving_average), c, rtol=1e-14, atol=1e-14)
    with pytest.raises(RuntimeError, match="no training forward"):
        layer.update_direction(torch.tensor([0]))  # the features were consumed


# -- the box predictor and the heads ---------------------------------------------------------------


def _cfg(config=TDE, opts=()):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    merge_config_list(cfg, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "4"] + list(opts))
    return cfg


def _model(opts=(), seed=0, config=TDE):
    torch.manual_seed(seed)
    return build_model(_cfg(config, opts)).eval()


def _predictors(model):
    predictor = model.roi_heads.box_predictor
    return list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]


def _proposals(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(len(labels), 4, generator=g) * 20
    boxes[:, 2:] += boxes[:, :2] + 5
    inst = Instances((64, 64))
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes + 1)
    inst.gt_classes = torch.tensor(labels)
    return [inst]


def _predictor_step(predictor, seed, labels):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(len(labels), predictor.cls_score.in_features, generator=g)
    predictor.train()
    losses = predictor.losses(predictor(features), _proposals(labels, seed))
    return features, losses


def test_predictor_builds_the_classifier_and_updates_the_direction():
    model = _model()
    (predictor,) = _predictors(model)
    assert isinstance(predictor, LongTailOutputLayers) and isinstance(predictor.cls_score, CausalNormClassifier)
    layer = predictor.cls_score
    assert (layer.out_features, layer.num_head, layer.tau, layer.gamma, layer.alpha, layer.momentum) == (
        5, 2, 16.0, 0.03125, 1.5, 0.96)
    labels = [0, 4, 2, 4, 3]
    features, losses = _predictor_step(predictor, 1, labels)
    assert set(losses) == {"loss_cls", "loss_box_reg"} and torch.isfinite(losses["loss_cls"])
    fg = torch.tensor([label < 4 for label in labels])
    assert torch.allclose(layer.feature_moving_average, features[fg].double().mean(0), rtol=1e-6, atol=1e-7)
    # inference: the softmax loss's probabilities are the exempted ones (α, background kept)
    predictor.eval()
    probs = predictor.predict_probs(predictor(features), _proposals(labels))[0]
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    layer.alpha = 0.0
    train_probs = predictor.predict_probs(predictor(features), _proposals(labels))[0]
    assert torch.allclose(probs[:, -1], train_probs[:, -1], atol=1e-6)
    assert not torch.allclose(probs, train_probs)


def test_inference_keys_reach_the_classifier():
    (predictor,) = _predictors(_model(["MODEL.EQLOSSES.TDE.ALPHA", "0.7", "MODEL.EQLOSSES.TDE.BACKGROUND_EXEMPTED", "False",
                                       "MODEL.EQLOSSES.TDE.NUM_HEAD", "4", "MODEL.EQLOSSES.TDE.TAU", "10.0",
                                       "MODEL.EQLOSSES.TDE.GAMMA", "0.5", "MODEL.EQLOSSES.TDE.MOMENTUM", "0.5"]))
    layer = predictor.cls_score
    assert (layer.alpha, layer.background_exempted, layer.num_head, layer.tau, layer.gamma, layer.momentum) == (
        0.7, False, 4, 10.0, 0.5, 0.5)


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    _predictor_step(model.roi_heads.box_predictor, 2, [1, 4, 0])
    saved = model.roi_heads.box_predictor.cls_score.feature_moving_average.clone()
    assert saved.abs().sum() > 0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tde")
    state = torch.load(tmp_path / "tde.pth", weights_only=True)["model"]
    key = "roi_heads.box_predictor.cls_score.feature_moving_average"
    assert state[key].dtype == torch.float64 and torch.equal(state[key], saved)
    other = _model(seed=5)
    DetectionCheckpointer(other).load(str(tmp_path / "tde.pth"))
    assert torch.equal(other.roi_heads.box_predictor.cls_score.feature_moving_average, saved)
    x = torch.rand(3, saved.numel())
    model.eval()
    assert torch.equal(model.roi_heads.box_predictor.cls_score(x), other.roi_heads.box_predictor.cls_score(x))


def test_cascade_stages_have_their_own_directions():
    model = _model(CASCADE)
    predictors = _predictors(model)
    assert len(predictors) == 3 and all(isinstance(p.cls_score, CausalNormClassifier) for p in predictors)
    means = []
    for k, predictor in enumerate(predictors):
        features, _ = _predictor_step(predictor, 10 + k, [k, 4, 1, 4])
        means.append(features[[0, 2]].double().mean(0))
    for predictor, mean in zip(predictors, means):
        assert torch.allclose(predictor.cls_score.feature_moving_average, mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(predictors[0].cls_score.feature_moving_average, predictors[1].cls_score.feature_moving_average)
    keys = [k for k in model.state_dict() if k.endswith("feature_moving_average")]
    assert keys == [f"roi_heads.box_predictor.{k}.cls_score.feature_moving_average" for k in range(3)]


# -- two processes (gloo on the CPU) -----------------------------------------------------------------


def _rank_batches(rank):
    g = torch.Generator().manual_seed(200 + rank)
    num = [5, 2] if rank == 0 else [3, 4]
    batches = []
    for n in num:
        labels = torch.randint(0, 4, (n,), generator=g)  # C = 3: label 3 the background
        batches.append((torch.randn(n, 6, generator=g, dtype=torch.float64), labels))
    return batches


def _ddp_worker(rank, tmp_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=2)
    try:
        layer = _classifier(d=6, k=4, momentum=0.8, seed=rank).train()  # the direction does not depend on W
        for x, labels in _rank_batches(rank):
            layer(x)
            layer.update_direction(labels)
        torch.save(layer.feature_moving_average.clone(), os.path.join(tmp_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_accumulate_the_global_foreground_mean(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    layer = _classifier(d=6, k=4, momentum=0.8).train()
    for (x0, l0), (x1, l1) in zip(_rank_batches(0), _rank_batches(1)):
        layer(torch.cat([x0, x1]))
        layer.update_direction(torch.cat([l0, l1]))
    assert torch.allclose(ranks[0], layer.feature_moving_average, rtol=1e-14, atol=1e-14)


# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.EQLOSSES.TDE.NUM_HEAD", "0"], "MODEL.EQLOSSES.TDE.NUM_HEAD must be an integer >= 1"),
        (["MODEL.EQLOSSES.TDE.TAU", "0.0"], "MODEL.EQLOSSES.TDE.TAU must be > 0"),
        (["MODEL.EQLOSSES.TDE.GAMMA", "-0.1"], "MODEL.EQLOSSES.TDE.GAMMA must be >= 0"),
        (["MODEL.EQLOSSES.TDE.ALPHA", "-1.0"], "MODEL.EQLOSSES.TDE.ALPHA must be >= 0"),
        (["MODEL.EQLOSSES.TDE.MOMENTUM", "1.5"], "MODEL.EQLOSSES.TDE.MOMENTUM must be in [0, 1]"),
        (["MODEL.EQLOSSES.LOSS", "sigmoid"], "MODEL.EQLOSSES.LOSS must be softmax, got 'sigmoid'"),
        (["MODEL.EQLOSSES.COSINE_SCALE", "20.0"], "MODEL.EQLOSSES.COSINE_SCALE must be 0"),
        (["MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER", "True"], "RETRAIN_CLASSIFIER is not supported"),
        (["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal"], "TEST.EQLOSSES.CALIBRATION.METHOD must be none"),
        (["MODEL.ROI_HEADS.NAME", "LongTailIterativeROIHeads"], "MODEL.ROI_HEADS.NAME one of"),
    ],
)
def test_config_errors_are_one_line(opts, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_cfg(TDE, opts))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_num_head_must_divide_the_box_feature():
    with pytest.raises(ValueError, match="MODEL.EQLOSSES.TDE.NUM_HEAD 3 does not divide the box head's feature size 256"):
        _model(["MODEL.EQLOSSES.TDE.NUM_HEAD", "3"])


@pytest.mark.parametrize("config", [TDE, LVIS_TDE], ids=os.path.basename)
def test_shipped_configs(config):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config)
    validate_config(cfg)
    node = cfg.MODEL.EQLOSSES
    assert (node.LOSS, node.DECOUPLING.CLASSIFIER, node.COSINE_SCALE) == ("softmax", "tde", 0.0)
    assert (node.TDE.NUM_HEAD, node.TDE.TAU, node.TDE.GAMMA, node.TDE.ALPHA, node.TDE.BACKGROUND_EXEMPTED) == (
        2, 16.0, 0.03125, 1.5, True)
    if config == LVIS_TDE:
        epoch = 99388 // 16
        assert node.TDE.MOMENTUM == 0.9998 and cfg.MODEL.RESNETS.DEPTH == 101
        assert cfg.MODEL.ROI_HEADS.NAME == "LongTailCascadeROIHeads" and cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (20 * epoch, (16 * epoch, 19 * epoch))
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_ITERS) == (16, 0.02, 500)
    else:
        assert node.TDE.MOMENTUM == 0.96 and (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (600, (450, 550))


def test_lvis_recipe_builds_a_cascade_of_tde_classifiers():
    model = _model(config=LVIS_TDE, opts=["MODEL.RESNETS.DEPTH", "50"])
    predictors = _predictors(model)
    assert len(predictors) == 3
    assert all(p.cls_score.momentum == 0.9998 and p.cls_score.out_features == 5 for p in predictors)


# -- end to end on the tiny set ----------------------------------------------------------------------


def test_quickstart_trains_and_evaluates_and_eval_only_takes_another_alpha(tiny_dataset, tmp_path):
    out = tmp_path / "train"
    results = _run(["--config-file", TDE] + _opts(tiny_dataset, out, max_iter=5))
    assert set(results) >= {"bbox", "segm"}
    assert all(not math.isnan(results[t]["AP"]) for t in ("bbox", "segm"))
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    direction = state["roi_heads.box_predictor.cls_score.feature_moving_average"]
    assert direction.dtype == torch.float64 and direction.abs().sum() > 0
    again = _run(["--config-file", TDE, "--eval-only"] + _opts(tiny_dataset, tmp_path / "eval", max_iter=5) + [
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.EQLOSSES.TDE.ALPHA", "0.5"])
    assert set(again) >= {"bbox", "segm"}


def test_cascade_quickstart_trains_and_evaluates(tiny_dataset, tmp_path):
    """Detectron2's cascade training runs every stage's forward, then every stage's losses: each
    stage's direction is updated from its own features and saved."""
    out = tmp_path / "cascade"
    results = _run(["--config-file", TDE] + _opts(tiny_dataset, out, max_iter=3) + CASCADE)
    assert set(results) >= {"bbox", "segm"}
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    directions = [state[f"roi_heads.box_predictor.{k}.cls_score.feature_moving_average"] for k in range(3)]
    assert all(d.abs().sum() > 0 for d in directions)
    assert not torch.equal(directions[0], directions[1]) and not torch.equal(directions[1], directions[2])
