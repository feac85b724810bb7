"""The ``tde`` and ``vmf`` classifier heads against float64 references written here (numpy loops,
closed forms of the p = 3 Bessel functions, the Bessel power series), their state across
training steps, the meta-architecture's training step, and their configs through the builder
and a 2-iteration training."""
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.heads import build_head
from eqlosses_d2.classification.heads.tde import TDEHead
from eqlosses_d2.classification.heads.vmf import VMFHead, mean_resultant_length, vmf_log_normalizer
from eqlosses_d2.config import merge_config_file, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/quickstart/tde_R18_synthetic_cls.yaml", "configs/quickstart/vmf_R18_synthetic_cls.yaml",
           "configs/ImageNet-LT/tde_R50_90ep.yaml", "configs/ImageNet-LT/vmf_R50_45ep.yaml"]


def _np(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------------------- TDE
def _tde_reference(x, w, num_head, tau, gamma, alpha=0.0, c=None):
    """z_nj = (τ/K) Σ_k <x̂_k − α cos_k ĉ_k, w_jk / (‖w_jk‖ + γ)>, loops in float64."""
    n_rows, dim = x.shape
    size = dim // num_head
    out = np.zeros((n_rows, w.shape[0]))
    for n in range(n_rows):
        for j in range(w.shape[0]):
            total = 0.0
            for k in range(num_head):
                xs = x[n, k * size:(k + 1) * size]
                ws = w[j, k * size:(k + 1) * size]
                xh = xs / math.sqrt(sum(v * v for v in xs))
                wh = ws / (math.sqrt(sum(v * v for v in ws)) + gamma)
                if alpha:
                    cs = c[k * size:(k + 1) * size]
                    ch = cs / math.sqrt(sum(v * v for v in cs))
                    # the authors' get_cos_sin: <x̂, ĉ> / ‖x̂‖ / ‖ĉ‖ (its sine is unused)
                    cos = sum(a * b for a, b in zip(xh, ch))
                    cos = cos / math.sqrt(sum(a * a for a in xh)) / math.sqrt(sum(b * b for b in ch))
                    xh = xh - alpha * cos * ch
                total += sum(a * b for a, b in zip(xh, wh))
            out[n, j] = tau / num_head * total
    return out


@pytest.mark.parametrize("num_head", [1, 2, 3])
def test_tde_training_logits(num_head):
    torch.manual_seed(0)
    head = TDEHead(6, 4, num_head=num_head, tau=16.0, gamma=0.03125, alpha=3.0).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = _tde_reference(_np(x), _np(head.weight), num_head, 16.0, 0.03125)
    assert np.allclose(_np(head(x)), expected, rtol=1e-12, atol=1e-12)


def test_tde_moving_average_three_steps():
    torch.manual_seed(1)
    head = TDEHead(4, 3, num_head=2, momentum=0.9, momentum_lr_scale=50.0).double()
    batches = [torch.randn(n, 4, dtype=torch.float64) for n in (3, 5, 2)]
    # lr unknown -> μ = 0.9; lr 0.2 -> min(10, 1) -> 0.9; lr 0.01 -> 1 − 0.1·0.5 = 0.95
    lrs, mus = [None, 0.2, 0.01], [0.9, 0.9, 0.95]
    c = np.zeros(4)
    for batch, lr, mu in zip(batches, lrs, mus):
        head(batch, learning_rate=lr)
        c = mu * c + _np(batch).mean(axis=0)
        assert head.feature_moving_average.dtype == torch.float64
        assert np.allclose(_np(head.feature_moving_average), c, rtol=1e-14, atol=1e-14)
    # MOMENTUM_LR_SCALE 0: the CIFAR rule, μ = m whatever the lr
    fixed = TDEHead(4, 3, momentum=0.8, momentum_lr_scale=0.0).double()
    fixed(batches[0], learning_rate=0.001)
    fixed(batches[1], learning_rate=0.001)
    assert np.allclose(_np(fixed.feature_moving_average), 0.8 * _np(batches[0]).mean(0) + _np(batches[1]).mean(0))


@pytest.mark.parametrize("num_head", [1, 2])
def test_tde_inference(num_head):
    torch.manual_seed(2)
    head = TDEHead(6, 5, num_head=num_head, alpha=0.0).double()
    head(torch.randn(7, 6, dtype=torch.float64).abs())  # one training step: c
    c = _np(head.feature_moving_average)
    x = torch.randn(4, 6, dtype=torch.float64)
    plain = head(x).detach()  # training mode: the causal-norm logits (c moves, the logits do not depend on it)
    head.eval()
    assert torch.equal(head(x), plain)  # α = 0: the plain causal-norm logits
    head.alpha = 1.7
    expected = _tde_reference(_np(x), _np(head.weight), num_head, 16.0, 0.03125, alpha=1.7, c=c)
    tde = _np(head(x))
    assert np.allclose(tde, expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(tde, _np(plain))


def test_tde_inference_before_training_is_finite():
    head = TDEHead(4, 3)
    x = torch.randn(2, 4)
    plain = head(x).detach()  # training mode
    head.feature_moving_average.zero_()
    head.eval()
    assert torch.allclose(head(x), plain)  # c = 0: no counterfactual term, no NaN


def test_tde_state_dict_round_trip():
    torch.manual_seed(3)
    head = TDEHead(6, 3, num_head=2)
    head(torch.randn(4, 6))
    head(torch.randn(4, 6), learning_rate=0.001)
    state = head.state_dict()
    assert set(state) == {"weight", "feature_moving_average"} and state["feature_moving_average"].dtype == torch.float64
    again = TDEHead(6, 3, num_head=2)
    again.load_state_dict(state)
    x = torch.randn(3, 6)
    assert torch.equal(again.eval()(x), head.eval()(x))


def test_tde_gradient_matches_finite_differences():
    torch.manual_seed(4)
    head = TDEHead(4, 3, num_head=2).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])

    def loss_of(weight):
        head.weight.data.copy_(weight)
        return F.cross_entropy(head(x), labels)

    weight = head.weight.detach().clone().requires_grad_(True)
    head.weight.grad = None
    F.cross_entropy(head(x), labels).backward()
    analytic = head.weight.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    for index in np.ndindex(*weight.shape):
        plus, minus = weight.detach().clone(), weight.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = (loss_of(plus) - loss_of(minus)) / (2 * eps)
    assert torch.allclose(analytic, numeric, atol=1e-7)


@pytest.mark.parametrize("kwargs, key", [({"num_head": 3}, "TDE.NUM_HEAD"), ({"num_head": 0}, "TDE.NUM_HEAD"),
                                         ({"tau": 0.0}, "TDE.TAU"), ({"alpha": -1.0}, "TDE.ALPHA"),
                                         ({"momentum": 1.5}, "TDE.MOMENTUM"), ({"gamma": -0.1}, "TDE.GAMMA")])
def test_tde_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        TDEHead(8, 3, **kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- vMF
def _a3(k):
    """A_3(κ) = coth κ − 1/κ."""
    return 1 / math.tanh(k) - 1 / k


def _logc3(k):
    """log C_3(κ) up to a constant: log κ − log sinh κ."""
    return math.log(k) - math.log(math.sinh(k))


def _log_bessel(v, k, terms=2000):
    """log I_v(κ) by the power series, a float64 log-sum-exp in plain Python."""
    logs = [(2 * m + v) * math.log(k / 2) - math.lgamma(m + 1) - math.lgamma(m + v + 1) for m in range(terms)]
    top = max(logs)
    return top + math.log(sum(math.exp(t - top) for t in logs))


def test_bessel_functions_closed_form_p3():
    kappa = torch.tensor([0.3, 1.0, 16.0, 45.0, 300.0], dtype=torch.float64)
    assert np.allclose(_np(mean_resultant_length(kappa, 3)), [_a3(k) for k in kappa.tolist()], rtol=1e-12)
    reference = [_logc3(k) for k in kappa.tolist()]
    ours = _np(vmf_log_normalizer(kappa, 3))
    assert np.allclose(ours - ours[2], np.array(reference) - reference[2], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dim", [64, 2048])
def test_bessel_functions_series_high_dim(dim):
    v = dim / 2 - 1
    for k in (1.0, 16.0, 80.0, 600.0):
        t = torch.tensor(k, dtype=torch.float64)
        a = math.exp(_log_bessel(v + 1, k) - _log_bessel(v, k))
        assert math.isclose(mean_resultant_length(t, dim).item(), a, rel_tol=1e-10)
        assert math.isclose(vmf_log_normalizer(t, dim).item(), v * math.log(k) - _log_bessel(v, k), rel_tol=1e-12)


@pytest.mark.parametrize("dim", [3, 64])
def test_bessel_derivatives_are_the_authors_backward(dim):
    kappa = torch.tensor([2.0, 16.0, 70.0], dtype=torch.float64, requires_grad=True)
    a = mean_resultant_length(kappa, dim)
    (grad_logc,) = torch.autograd.grad(vmf_log_normalizer(kappa, dim).sum(), kappa)
    assert torch.allclose(grad_logc, -a.detach(), rtol=1e-10)  # ∂ log C / ∂κ = −A_p
    (grad_a,) = torch.autograd.grad(a.sum(), kappa)
    k = kappa.detach()
    assert torch.allclose(grad_a, 1 - a.detach() ** 2 - (dim - 1) / k * a.detach(), rtol=1e-8)


def _vmf_head(kappas, test_alpha=1.0, icd=0.0, cfc=0.0, seed=5):
    torch.manual_seed(seed)
    head = VMFHead(3, len(kappas), icd_weight=icd, cfc_weight=cfc, test_alpha=test_alpha).double()
    head.kappa.data.copy_(torch.tensor(kappas, dtype=torch.float64))
    return head


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_vmf_training_logits():
    head = _vmf_head([0.5, 2.0, 16.0, 30.0])  # 0.5 is clamped to 1
    x = torch.randn(5, 3, dtype=torch.float64)
    mu, xs = _unit(_np(head.weight)), _unit(_np(x))
    kappa = [1.0, 2.0, 16.0, 30.0]
    expected = np.array([[kappa[j] * xs[n] @ mu[j] + _logc3(kappa[j]) - _logc3(16.0) for j in range(4)] for n in range(5)])
    assert np.allclose(_np(head(x)), expected, rtol=1e-12, atol=1e-12)


def _overlaps(mu, kappa):
    c = len(kappa)
    op = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            kl = _a3(kappa[i]) * (kappa[i] - kappa[j] * mu[i] @ mu[j]) + _logc3(kappa[i]) - _logc3(kappa[j])
            op[i, j] = 1 / (1 + kl)
    return op


def test_vmf_icd_loss_and_overlap_buffer():
    kappa = [3.0, 8.0, 16.0, 25.0]
    head = _vmf_head(kappa, icd=0.2)
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 3, 2, 3])
    op = _overlaps(_unit(_np(head.weight)), kappa)
    icd = sum(op[i, j] for i in range(4) for j in range(4) if i != j) / 16
    for progress, factor in ((None, 1.0), (0.0, 1.0), (0.5, 0.5 ** 0.9), (1.0, 0.0)):
        logits, losses = head.training_step(x, labels, progress=progress)
        assert set(losses) == {"loss_icd"}
        assert math.isclose(losses["loss_icd"].item(), 0.2 * factor * icd, rel_tol=1e-6, abs_tol=1e-12)
        assert torch.equal(logits, head(x))
    assert np.allclose(_np(head.overlap), op.mean(axis=1), rtol=1e-6)
    # the loss trains κ and the directions
    _, losses = head.training_step(x, labels, progress=0.0)
    losses["loss_icd"].backward()
    assert head.kappa.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_vmf_overlap_buffer_without_icd_is_the_normalizer():
    kappa = [3.0, 8.0, 16.0]
    head = _vmf_head(kappa)
    _, losses = head.training_step(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    assert losses == {}
    assert np.allclose(_np(head.overlap), [_logc3(k) - _logc3(16.0) for k in kappa], rtol=1e-6)


def test_vmf_cfc_loss():
    kappa = [3.0, 8.0, 16.0, 25.0]
    head = _vmf_head(kappa, cfc=0.5)
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 3, 0, 3])
    mu, xs = _unit(_np(head.weight)), _unit(_np(x))
    terms = []
    for c in (0, 1, 3):  # the classes of the batch
        m = _unit(xs[_np(labels) == c].sum(axis=0))
        kl = _a3(kappa[c]) * kappa[c] * (1 - mu[c] @ m)
        terms.append(1 - 1 / (1 + kl))
    _, losses = head.training_step(x, labels, progress=0.25)
    assert set(losses) == {"loss_cfc"}
    assert math.isclose(losses["loss_cfc"].item(), 0.5 * 0.75 ** 0.9 * np.mean(terms), rel_tol=1e-6)


def test_vmf_calibrated_inference():
    kappa = [3.0, 8.0, 16.0, 25.0]
    head = _vmf_head(kappa, test_alpha=0.3, icd=0.2)
    x = torch.randn(5, 3, dtype=torch.float64)
    head.training_step(x, torch.tensor([0, 1, 2, 3, 0]))
    train_logits = head(x).detach()
    o = _np(head.overlap)
    r = (o - o.min()) / (o.max() - o.min()) * (max(kappa) - min(kappa)) + min(kappa)
    calibrated = [kappa[j] ** 0.3 * r[j] ** 0.7 for j in range(4)]
    mu, xs = _unit(_np(head.weight)), _unit(_np(x))
    expected = np.array([[calibrated[j] * xs[n] @ mu[j] + _logc3(kappa[j]) - _logc3(16.0) for j in range(4)]
                         for n in range(5)])
    head.eval()
    assert np.allclose(_np(head(x)), expected, rtol=1e-10, atol=1e-10)
    head.test_alpha = 1.0
    assert torch.allclose(head(x), train_logits)  # α = 1: no calibration
    # equal overlaps (an untrained head): r = min κ, finite
    head.overlap.fill_(0.3)
    head.test_alpha = 0.5
    assert torch.isfinite(head(x)).all()


def test_vmf_state_dict_round_trip():
    head = _vmf_head([3.0, 8.0, 16.0], test_alpha=0.5, icd=0.2).float()
    head.training_step(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    state = head.state_dict()
    assert set(state) == {"weight", "kappa", "overlap"}
    again = VMFHead(3, 3, test_alpha=0.5)
    again.load_state_dict(state)
    x = torch.randn(2, 3)
    assert torch.equal(again.eval()(x), head.eval()(x))


@pytest.mark.parametrize("kwargs, key", [({"k_init": 0.5}, "VMF.K_INIT"), ({"icd_weight": -1.0}, "VMF.ICD_WEIGHT"),
                                         ({"test_alpha": 1.5}, "VMF.TEST_ALPHA")])
def test_vmf_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        VMFHead(8, 3, **kwargs)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ builder, meta-architecture
def _cfg(config_file, **opts):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, config_file))
    cfg.MODEL.DEVICE = "cpu"
    for key, value in opts.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cfg


@pytest.mark.parametrize("config_file", CONFIGS)
def test_configs_build(config_file):
    cfg = _cfg(config_file)
    validate_config(cfg)
    node = cfg.MODEL.EQLOSSES.CLASSIFICATION
    head = build_head(node, 2048, node.NUM_CLASSES)
    assert head.name == node.HEAD and head.num_classes == node.NUM_CLASSES


def test_configs_have_the_authors_settings():
    tde = _cfg("configs/ImageNet-LT/tde_R50_90ep.yaml")
    t = tde.MODEL.EQLOSSES.CLASSIFICATION
    assert (t.HEAD, t.LOSS, t.TDE.NUM_HEAD, t.TDE.TAU, t.TDE.GAMMA, t.TDE.ALPHA) == ("tde", "softmax", 2, 16.0, 0.03125, 3.0)
    assert (tde.SOLVER.IMS_PER_BATCH, tde.SOLVER.BASE_LR, tde.SOLVER.MAX_ITER) == (512, 0.2, 20364)
    vmf = _cfg("configs/ImageNet-LT/vmf_R50_45ep.yaml")
    v = vmf.MODEL.EQLOSSES.CLASSIFICATION
    assert (v.HEAD, v.LOSS, v.VMF.K_INIT, v.VMF.ICD_WEIGHT, v.VMF.TEST_ALPHA) == ("vmf", "balanced_softmax", 16.0, 0.2, 0.5)
    assert (vmf.SOLVER.IMS_PER_BATCH, vmf.SOLVER.BASE_LR, vmf.SOLVER.MAX_ITER) == (256, 0.2, 20364)


def _images(n, num_classes):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8, generator=g), "label": i % num_classes}
            for i in range(n)]


def test_meta_arch_passes_progress_and_learning_rate():
    cfg = _cfg("configs/quickstart/tde_R18_synthetic_cls.yaml", **{"MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES": 4,
                                                                   "SOLVER.MAX_ITER": 10})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    images = _images(3, 4)
    assert model.schedule_position() == {"progress": None, "learning_rate": None}
    with EventStorage(start_iter=4) as storage:
        storage.put_scalar("lr", 0.01)
        assert model.schedule_position() == {"progress": 0.4, "learning_rate": 0.01}
        before = model.head.feature_moving_average.clone()
        with torch.no_grad():
            features = model.features(images).double()
            losses = model(images)
    assert set(losses) == {"loss_cls"}
    # μ = 1 − 0.1 · min(50 · 0.01, 1) = 0.95
    assert torch.allclose(model.head.feature_moving_average, 0.95 * before + features.mean(0), rtol=1e-6, atol=1e-6)


def test_meta_arch_adds_the_head_losses():
    cfg = _cfg("configs/quickstart/vmf_R18_synthetic_cls.yaml", **{"MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES": 4})
    model = build_model(cfg)
    model.class_stats.image_count.copy_(torch.tensor([8, 4, 2, 1]))
    model.class_stats.is_set.fill_(True)
    model.train()
    losses = model(_images(4, 4))
    assert set(losses) == {"loss_cls", "loss_icd"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(_images(2, 4))
    assert torch.allclose(out[0]["scores"].sum(), torch.tensor(1.0))


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    from eqlosses_d2.classification.data import TINY_CLS_SPEC, register_synthetic_classification

    root = str(tmp_path_factory.mktemp("synthetic_cls_tde_vmf"))
    train, _, test = register_synthetic_classification("pytest_cls_tde_vmf", TINY_CLS_SPEC, root=root)
    return {"train": train, "test": test, "num_classes": TINY_CLS_SPEC.num_classes}


@pytest.mark.parametrize("config_file, buffer", [("configs/quickstart/tde_R18_synthetic_cls.yaml", "head.feature_moving_average"),
                                                 ("configs/quickstart/vmf_R18_synthetic_cls.yaml", "head.overlap")])
def test_two_iteration_training(tiny_cls, tmp_path, config_file, buffer):
    import train_net

    out = tmp_path / "run"
    argv = ["--config-file", config_file,
            "DATASETS.TRAIN", f"('{tiny_cls['train']}',)", "DATASETS.TEST", f"('{tiny_cls['test']}',)",
            "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(tiny_cls["num_classes"]), "MODEL.DEVICE", "cpu",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
            "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", str(out)]
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    results = train_net.main(args)
    assert 0.0 <= results["classification"]["top1"] <= 100.0
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert state[buffer].abs().sum() > 0  # the head's state was trained and saved
