"""The decoupled two-stage protocol (Kang et al. 2020; MARC): the heads tau_norm, lws, marc and the
grw loss against hand-derived float64 values, what stage 2 freezes (a stage-1 model trained here for
a few iterations on the tiny set, then cRT / LWS / MARC for a few more: backbone weights bit-for-bit
unchanged, BatchNorm running statistics updated as in the authors' code, the classifier (cRT), only
the scales (LWS), only ω, β (MARC) changed), cRT's head left out of a stage-1 checkpoint and loaded
from a stage-2 one, the missing stage-1 error, the configs' stage-1 paths, and the τ sweep."""
import math
import os
import shlex
import shutil

import numpy as np
import pytest
import torch

import train_net
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.classification.data import TINY_CLS_SPEC, register_synthetic_classification
from eqlosses_d2.classification.heads import build_head
from eqlosses_d2.classification.losses import build_image_loss
from eqlosses_d2.classification import tau_sweep
from eqlosses_d2.config import ConfigError, merge_config_file, merge_config_list, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "configs/quickstart/{}_R18_synthetic_cls.yaml"


def _node(**keys):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    node = cfg.MODEL.EQLOSSES.CLASSIFICATION
    for key, value in keys.items():
        node[key] = value
    return node


def _classifier(seed=0, c=3, d=4):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64) * torch.tensor([[3.0], [1.0], [0.2]])[:c]
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    x = torch.randn(2, d, generator=g, dtype=torch.float64)
    return weight, bias, x


def _load_fc(head, weight, bias):
    head.double()
    with torch.no_grad():
        head.fc.weight.copy_(weight)
        head.fc.bias.copy_(bias)
    return head


# -- heads and loss against hand-derived values --------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.7])
def test_tau_norm_head(tau):
    weight, bias, x = _classifier()
    node = _node(HEAD="tau_norm")
    node.TAU_NORM.TAU = tau
    head = _load_fc(build_head(node, 4, 3), weight, bias)
    assert set(head.state_dict()) == {"fc.weight", "fc.bias"}  # the linear head's names
    w, xs = weight.numpy(), x.numpy()
    expected = np.zeros((2, 3))
    for i in range(2):
        for j in range(3):
            norm = math.sqrt(sum(w[j, k] ** 2 for k in range(4)))
            expected[i, j] = sum(xs[i, k] * w[j, k] for k in range(4)) / norm ** tau  # no bias
    assert np.allclose(head(x).double().detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    if tau == 1.0:  # unit-norm rows: the logits of x are |x| cos(x, w_j)
        cos = torch.nn.functional.cosine_similarity(x[:, None], weight[None], dim=2)
        assert torch.allclose(head(x).double(), x.norm(dim=1, keepdim=True) * cos, atol=1e-6)


def test_tau_norm_refuses_negative_tau():
    node = _node(HEAD="tau_norm")
    node.TAU_NORM.TAU = -0.1
    with pytest.raises(ValueError, match="TAU_NORM.TAU must be >= 0"):
        build_head(node, 4, 3)


def test_lws_head_values_and_gradients():
    weight, bias, x = _classifier(1)
    head = _load_fc(build_head(_node(HEAD="lws"), 4, 3), weight, bias)
    assert torch.equal(head.scales, torch.ones(3, dtype=torch.float64))  # f = 1: the stage-1 classifier
    assert torch.allclose(head(x), x @ weight.T + bias)
    with torch.no_grad():
        head.scales.copy_(torch.tensor([0.5, 2.0, -1.5]))
    head.fc.requires_grad_(True)  # even trainable, W and b get no gradient (detached)
    out = head(x)
    w, b, f, xs = weight.numpy(), bias.numpy(), [0.5, 2.0, -1.5], x.numpy()
    expected = np.array([[f[j] * (xs[i] @ w[j] + b[j]) for j in range(3)] for i in range(2)])  # the bias is scaled
    assert np.allclose(out.detach().numpy(), expected, rtol=1e-12)
    upstream = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 2.0]], dtype=torch.float64)
    (out * upstream).sum().backward()
    grad_f = [sum(upstream[i, j].item() * (xs[i] @ w[j] + b[j]) for i in range(2)) for j in range(3)]
    assert np.allclose(head.scales.grad.numpy(), grad_f, rtol=1e-12)
    assert head.fc.weight.grad is None and head.fc.bias.grad is None
    assert [n for n, p in build_head(_node(HEAD="lws"), 4, 3).named_parameters() if p.requires_grad] == ["scales"]


def test_marc_head_values_and_gradients():
    weight, bias, x = _classifier(2)
    head = _load_fc(build_head(_node(HEAD="marc"), 4, 3), weight, bias)
    assert torch.allclose(head(x), x @ weight.T + bias)  # ω = 1, β = 0: the stage-1 classifier
    omega, beta = [1.5, 0.5, 2.0], [0.1, -0.4, 3.0]
    with torch.no_grad():
        head.omega.copy_(torch.tensor(omega))
        head.beta.copy_(torch.tensor(beta))
    head.fc.requires_grad_(True)
    out = head(x)
    w, b, xs = weight.numpy(), bias.numpy(), x.numpy()
    norms = [math.sqrt(sum(w[j, k] ** 2 for k in range(4))) for j in range(3)]
    expected = np.array([[omega[j] * (xs[i] @ w[j] + b[j]) + beta[j] * norms[j] for j in range(3)] for i in range(2)])
    assert np.allclose(out.detach().numpy(), expected, rtol=1e-12)
    upstream = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 2.0]], dtype=torch.float64)
    (out * upstream).sum().backward()
    grad_omega = [sum(upstream[i, j].item() * (xs[i] @ w[j] + b[j]) for i in range(2)) for j in range(3)]
    grad_beta = [sum(upstream[i, j].item() for i in range(2)) * norms[j] for j in range(3)]
    assert np.allclose(head.omega.grad.numpy(), grad_omega, rtol=1e-12)
    assert np.allclose(head.beta.grad.numpy(), grad_beta, rtol=1e-12)
    assert head.fc.weight.grad is None and head.fc.bias.grad is None


class _Counts:
    def __init__(self, counts):
        self.image_count = torch.tensor(counts)
        self.is_set = torch.tensor(True)


def test_grw_loss_values():
    counts = [100, 10, 1]
    node = _node(LOSS="grw")
    loss = build_image_loss(node, 3, class_stats=_Counts(counts))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    total = sum(counts)
    raw = [(n / total) ** -1.2 for n in counts]
    r = [3 * v / sum(raw) for v in raw]
    assert np.allclose(loss.class_weights().numpy(), r, rtol=1e-6)
    z = logits.numpy()
    ce = [math.log(sum(math.exp(v) for v in z[i])) - z[i][labels[i]] for i in range(4)]
    expected = sum(r[labels[i]] * ce[i] for i in range(4)) / sum(r[labels[i]] for i in range(4))
    assert loss(logits, labels)["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    node.GRW.EXP_SCALE = -1.0
    with pytest.raises(ValueError, match="GRW.EXP_SCALE must be >= 0"):
        build_image_loss(node, 3)


# -- stage 2 through train_net.py on the tiny set --------------------------------------------------


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoupling")
    train, _, test = register_synthetic_classification("pytest_decoupling", TINY_CLS_SPEC, root=str(root / "data"))
    data = {"train": train, "test": test, "val": test[: -len("_test")] + "_val"}
    out = root / "stage1"
    _run(["--config-file", QUICKSTART.format("softmax")] + _opts(data, out, 4))
    yield data, out / "model_final.pth"
    shutil.rmtree(root, ignore_errors=True)


def _opts(data, out, max_iter, **extra):
    opts = ["DATASETS.TRAIN", f"('{data['train']}',)", "DATASETS.TEST", "()",
            "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(TINY_CLS_SPEC.num_classes), "MODEL.DEVICE", "cpu",
            "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "0",
            "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", str(out)]
    for key, value in extra.items():
        opts += [key, value]
    return opts


def _run(argv):
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.check_args(args)
    return train_net.main(args)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _stage2(method, stage1, tmp_path):
    data, weights = stage1
    out = tmp_path / method
    _run(["--config-file", QUICKSTART.format(method)] + _opts(data, out, 3, **{"MODEL.WEIGHTS": str(weights)}))
    return _state(weights), _state(out / "model_final.pth")


def _check_backbone_frozen(before, after):
    backbone = [k for k in before if k.startswith("backbone.")]
    statistics = [k for k in backbone if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    weights = [k for k in backbone if k not in statistics]
    assert weights and statistics
    for key in weights:  # convolutions and BatchNorm affine parameters, bit for bit
        assert torch.equal(before[key], after[key]), key
    # the authors' stage 2 keeps the frozen backbone in train mode: BatchNorm statistics follow the new batches
    counts = [k for k in statistics if k.endswith("num_batches_tracked")]
    assert all(int(after[k]) == int(before[k]) + 3 for k in counts)
    assert any(not torch.equal(before[k], after[k]) for k in statistics if k.endswith("running_mean"))


def test_crt_freezes_backbone_and_retrains_a_fresh_head(stage1, tmp_path):
    before, after = _stage2("crt", stage1, tmp_path)
    _check_backbone_frozen(before, after)
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert bool(after["retrained_head"]) and "retrained_head" not in before
    # the head is left out of a stage-1 checkpoint (fresh initialisation), loaded from a stage-2 one
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, QUICKSTART.format("crt")))
    merge_config_list(cfg, ["MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES", str(TINY_CLS_SPEC.num_classes), "MODEL.DEVICE", "cpu"])
    torch.manual_seed(5)
    model = build_model(cfg)
    fresh = model.head.fc.weight.detach().clone()
    DetectionCheckpointer(model).load(str(stage1[1]))
    assert torch.equal(model.head.fc.weight, fresh) and not torch.equal(fresh, before["head.fc.weight"])
    assert torch.equal(model.backbone.stem.conv1.weight, before["backbone.stem.conv1.weight"])
    DetectionCheckpointer(model).load(str(tmp_path / "crt" / "model_final.pth"))
    assert torch.equal(model.head.fc.weight, after["head.fc.weight"])


def test_lws_trains_only_the_scales(stage1, tmp_path):
    before, after = _stage2("lws", stage1, tmp_path)
    _check_backbone_frozen(before, after)
    assert torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert torch.equal(before["head.fc.bias"], after["head.fc.bias"])
    assert not torch.equal(after["head.scales"], torch.ones_like(after["head.scales"]))


def test_marc_trains_only_omega_and_beta(stage1, tmp_path):
    before, after = _stage2("marc", stage1, tmp_path)
    _check_backbone_frozen(before, after)
    assert torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert torch.equal(before["head.fc.bias"], after["head.fc.bias"])
    assert not torch.equal(after["head.omega"], torch.ones_like(after["head.omega"]))
    assert not torch.equal(after["head.beta"], torch.zeros_like(after["head.beta"]))


@pytest.mark.parametrize("method", ["crt", "lws", "marc", "tau_norm"])
def test_missing_stage1_is_one_line_with_its_command(method, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model_final.pth"
    argv = ["--config-file", QUICKSTART.format(method)] + (["--eval-only"] if method == "tau_norm" else [])
    argv += ["MODEL.WEIGHTS", str(missing), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o")]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert str(missing) in err and "python train_net.py --config-file configs/quickstart/softmax_R18_synthetic_cls.yaml" in err


def test_retrain_head_refused_with_a_frozen_classifier_head():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, QUICKSTART.format("lws")))
    cfg.MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING.RETRAIN_HEAD = True
    with pytest.raises(ConfigError, match="DECOUPLING.RETRAIN_HEAD re-initialises the head, but HEAD 'lws'"):
        validate_config(cfg)


@pytest.mark.parametrize("config", ["quickstart/{}_R18_synthetic_cls.yaml", "ImageNet-LT/{}.yaml"])
def test_stage2_configs_start_from_the_stage1_their_command_writes(config):
    names = (["crt", "lws", "marc", "tau_norm"] if config.startswith("quickstart")
             else ["crt_R50_10ep", "lws_R50_5ep", "marc_R50_10ep", "tau_norm_R50"])
    for name in names:
        cfg = get_cfg()
        add_eqlosses_config(cfg)
        merge_config_file(cfg, os.path.join(ROOT, "configs", config.format(name)))
        args = shlex.split(cfg.MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING.STAGE1_COMMAND)
        assert args[:2] == ["python", "train_net.py"]
        stage1 = get_cfg()
        add_eqlosses_config(stage1)
        merge_config_file(stage1, os.path.join(ROOT, args[args.index("--config-file") + 1]))
        rest = args[args.index("--config-file") + 2:]
        if "--num-gpus" in rest:
            rest = rest[rest.index("--num-gpus") + 2:]
        merge_config_list(stage1, rest)
        assert stage1.MODEL.EQLOSSES.CLASSIFICATION.HEAD == "linear" and stage1.MODEL.WEIGHTS == ""
        assert os.path.normpath(cfg.MODEL.WEIGHTS) == os.path.normpath(os.path.join(stage1.OUTPUT_DIR, "model_final.pth"))
        trainable = cfg.MODEL.EQLOSSES.TRAINABLE_MODULES
        assert trainable == {"crt": ["head."], "lws": ["head.scales"], "marc": ["head.omega", "head.beta"],
                             "tau": []}[name.split("_")[0]]


# -- the τ sweep -----------------------------------------------------------------------------------


def test_sweep_picks_the_tau_of_the_best_val_accuracy():
    # class 0 has the large weight norm (3), class 1 norm 1; logits (3 x1, x2) / (3^τ, 1)
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.9], [0.7, 1.0]])  # a class-0 and a class-1 image
    labels = [0, 1]
    rows = tau_sweep.sweep_tau(weight, features, labels, [0.0, 0.5, 1.0, 2.0], train_image_count=[150, 10])
    # τ = 0: (3, .9) right, (2.1, 1) wrong; τ = .5: (1.73, .9) right, (1.21, 1) wrong;
    # τ = 1: (1, .9) right, (.7, 1) right; τ = 2: (.33, .9) wrong, (.23, 1) right
    assert [row["top1"] for row in rows] == [50.0, 50.0, 100.0, 50.0]
    assert [row["few"] for row in rows] == [0.0, 0.0, 100.0, 100.0]
    assert tau_sweep.best_tau(rows)["tau"] == 1.0
    # equal accuracies: the first in the grid
    assert tau_sweep.best_tau(rows[:2])["tau"] == 0.0
    assert tau_sweep.parse_taus("0:2:0.1") == [round(0.1 * i, 10) for i in range(21)]
    with pytest.raises(ValueError, match="--taus"):
        tau_sweep.parse_taus("1:0:0.1")


def test_sweep_cli_on_a_tiny_model_agrees_with_eval_only(stage1, tmp_path, capsys):
    data, weights = stage1
    opts = ["DATASETS.TEST", f"('{data['test']}',)", "MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES",
            str(TINY_CLS_SPEC.num_classes), "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", str(weights)]
    config = QUICKSTART.format("tau_norm")
    assert tau_sweep.main(["--config-file", config, "--taus", "0,0.5,1,1.5"] + opts) == 0
    printed = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| ") and "τ" not in line]
    val_rows, test_row = rows[:4], rows[4]
    val_top1 = [float(r[1]) for r in val_rows]
    best = next(i for i, v in enumerate(val_top1) if v == max(val_top1))
    assert val_rows[best][0].strip().endswith("*") and float(test_row[0]) == [0, 0.5, 1, 1.5][best]
    # the tau_norm head through train_net's evaluator gives the sweep's test row
    tau = test_row[0].strip()
    results = _run(["--config-file", config, "--eval-only"] + opts +
                   ["MODEL.EQLOSSES.CLASSIFICATION.TAU_NORM.TAU", tau, "OUTPUT_DIR", str(tmp_path / "eval")])
    assert f"{results['classification']['top1']:.2f}" == test_row[1].strip()
    assert f"{results['classification']['few']:.2f}" == test_row[5].strip()
