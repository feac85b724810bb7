"""One Detectron2 registry per kind of method; each method declares its own config node; the
default config is what it was before the registries; a loss defined outside the package trains
by its name; unknown registry names are config errors found before OUTPUT_DIR is written."""
import contextlib
import inspect
import json
import os

import pytest
import torch
from torch.nn import functional as F

import train_net
from detectron2.config import CfgNode, get_cfg
from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import ConfigError, validate_config
from eqlosses_d2.losses import ClassificationLoss, build_loss_from_cfg
from eqlosses_d2.losses.base import empty_loss
from eqlosses_d2.registry import (
    CALIBRATION_REGISTRY,
    CONFIG_CHECK_REGISTRY,
    DENSE_CLS_LOSS_REGISTRY,
    KINDS,
    ROI_CLS_LOSS_REGISTRY,
    config_node,
    names,
    register,
)

from test_training import QUICKSTART, _opts, _run

HERE = os.path.dirname(os.path.abspath(__file__))
BEFORE = os.path.join(HERE, "data", "default_config_eqlosses.yaml")
TOPS = ("MODEL", "TEST", "INPUT", "SOLVER")  # SOLVER.EQLOSSES: the segmentation recipes' poly LR


def _eqlosses_nodes(cfg):
    out = CfgNode()
    for top in TOPS:
        out[top] = CfgNode()
        out[top]["EQLOSSES"] = cfg[top]["EQLOSSES"]
    return out


def test_default_config_unchanged():
    """Every default key and value dumped from main before the registries
    (tests/data/default_config_eqlosses.yaml) is there unchanged, now that the registries'
    classes declare them; methods added since bring nodes of their own."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    with open(BEFORE) as f:
        before = _flatten(CfgNode.load_cfg(f))
    now = _flatten(_eqlosses_nodes(cfg))
    changed = {key: (value, now.get(key, "<missing>")) for key, value in before.items() if now.get(key, "<missing>") != value}
    assert not changed, changed
    # keys added since (new methods' nodes) are new nodes, not new keys of the nodes that were
    new_nodes = {key.rsplit(".", 1)[0] for key in now if key not in before}
    before_nodes = {key.rsplit(".", 1)[0] for key in before}
    assert not new_nodes & before_nodes, sorted(new_nodes & before_nodes)


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_only_our_nodes_are_added():
    """Detectron2's own keys are untouched: the full dump without our nodes is Detectron2's."""
    base, cfg = get_cfg(), get_cfg()
    add_eqlosses_config(cfg)
    for top in TOPS:
        del cfg[top]["EQLOSSES"]
    assert cfg.dump() == base.dump()


def test_registries_are_detectron2s():
    from detectron2.utils.registry import Registry

    for registry in (ROI_CLS_LOSS_REGISTRY, DENSE_CLS_LOSS_REGISTRY, CALIBRATION_REGISTRY, CONFIG_CHECK_REGISTRY):
        assert isinstance(registry, Registry)
    assert names(ROI_CLS_LOSS_REGISTRY) == sorted([
        "softmax", "sigmoid", "eql", "eqlv2", "softmax_eql", "seesaw", "federated", "gumbel",
        "gumbel_droploss", "iif", "pcb", "equilibrium", "balanced_softmax", "bal_bce", "ecm", "db", "bags",
        "cdb_w", "cdb_s",
    ])
    assert names(DENSE_CLS_LOSS_REGISTRY) == ["efl", "focal"]
    assert names(CALIBRATION_REGISTRY) == ["iif", "none", "norcal", "tau_norm"]
    assert [k.key for k in KINDS][:3] == [
        "MODEL.EQLOSSES.LOSS", "MODEL.EQLOSSES.ONE_STAGE.LOSS", "TEST.EQLOSSES.CALIBRATION.METHOD"]


@pytest.mark.parametrize("registry", [ROI_CLS_LOSS_REGISTRY, DENSE_CLS_LOSS_REGISTRY], ids=["roi", "dense"])
def test_each_loss_declares_its_own_node(registry):
    """A loss's ``add_config`` adds its node (and only keys under it) to an empty config: the
    node is declared next to the loss, not in config.py."""
    for name, cls in registry:
        cfg = CfgNode()
        cls.add_config(cfg)
        if cls.config_node is None:
            assert cfg == CfgNode(), name
            continue
        assert list(cfg) == ["MODEL"] and list(cfg.MODEL) == ["EQLOSSES"], name
        assert list(cfg.MODEL.EQLOSSES) == [cls.config_node], name
        # its keys are its constructor's keyword arguments, with the same defaults
        signature = inspect.signature(cls.__init__).parameters
        for key, value in cfg.MODEL.EQLOSSES[cls.config_node].items():
            assert signature[key.lower()].default == value, (name, key)


def test_config_py_declares_no_method_node():
    """config.py's own part holds no loss or calibration node: without the registered classes
    those nodes are absent."""
    import eqlosses_d2.config as config

    saved = {kind.registry: dict(kind.registry._obj_map) for kind in KINDS}
    try:
        for kind in KINDS:
            kind.registry._obj_map.clear()
        cfg = get_cfg()
        config.add_eqlosses_config(cfg)
    finally:
        for registry, objects in saved.items():
            registry._obj_map.update(objects)
    for node in ("SIGMOID", "EQL", "EQLV2", "SOFTMAX_EQL", "SEESAW", "FEDERATED", "GUMBEL", "PCB", "EQUILIBRIUM",
                 "IIF", "FOCAL", "EFL"):
        assert node not in cfg.MODEL.EQLOSSES, node
    assert list(cfg.TEST.EQLOSSES.CALIBRATION) == ["METHOD"]


def test_register_by_name_and_twice():
    registry = type(ROI_CLS_LOSS_REGISTRY)("TEST_ONLY")

    @register(registry)
    class Named:
        name = "named"

    assert registry.get("named") is Named
    with pytest.raises(KeyError, match="TEST_ONLY: 'named' is registered twice"):
        register(registry)(type("Other", (), {"name": "named"}))
    with pytest.raises(TypeError, match="needs a 'name'"):
        register(registry)(type("Nameless", (), {}))


# -- a loss from outside the package ------------------------------------------------------------


class OutsideScaledSoftmax(ClassificationLoss):
    """Softmax CE of logits times ``scale``; defined and registered here, not in the package."""

    name = "outside_scaled_softmax"
    config_node = "OUTSIDE_SCALED_SOFTMAX"
    softmax_logits = True
    calls = []  # (scale, number of RoIs) of every training forward

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX")
        # Factor of the logits.
        _C.SCALE = 1.0

    def __init__(self, num_classes, class_stats=None, scale=1.0):
        super().__init__(num_classes, class_stats)
        if scale <= 0:
            raise ValueError(f"OUTSIDE_SCALED_SOFTMAX.SCALE must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        if self.training:
            OutsideScaledSoftmax.calls.append((self.scale, logits.shape[0]))
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        return {"loss_cls": F.cross_entropy(logits.float() * self.scale, labels)}

    def predict_probs(self, logits):
        return F.softmax(logits.float() * self.scale, dim=-1)

    def activation_logits(self, logits):
        return logits.float() * self.scale


@contextlib.contextmanager
def _registered(registry, cls):
    register(registry)(cls)
    try:
        yield cls
    finally:
        del registry._obj_map[cls.name]


def test_outside_loss_config_and_build():
    with _registered(ROI_CLS_LOSS_REGISTRY, OutsideScaledSoftmax):
        cfg = get_cfg()
        add_eqlosses_config(cfg)
        assert cfg.MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX.SCALE == 1.0
        cfg.merge_from_list(["MODEL.EQLOSSES.LOSS", "outside_scaled_softmax", "MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX.SCALE", "0.5"])
        validate_config(cfg)
        loss = build_loss_from_cfg(cfg.MODEL.EQLOSSES, 4)
        assert isinstance(loss, OutsideScaledSoftmax) and loss.scale == 0.5
        cfg.MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX.SCALE = -1.0
        with pytest.raises(ConfigError, match=r"^MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX.SCALE must be > 0, got -1.0$"):
            validate_config(cfg)
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    assert "OUTSIDE_SCALED_SOFTMAX" not in cfg.MODEL.EQLOSSES  # gone with its registration


def test_outside_loss_trains(tiny_dataset, tmp_path):
    """Registered from here, selected by MODEL.EQLOSSES.LOSS with its own key: trains a few
    iterations through train_net and the package's box predictor, and evaluates."""
    OutsideScaledSoftmax.calls.clear()
    with _registered(ROI_CLS_LOSS_REGISTRY, OutsideScaledSoftmax):
        opts = _opts(tiny_dataset, tmp_path, max_iter=3) + [
            "MODEL.EQLOSSES.LOSS", "outside_scaled_softmax",
            "MODEL.EQLOSSES.OUTSIDE_SCALED_SOFTMAX.SCALE", "0.5",
            "TEST.DETECTIONS_PER_IMAGE", "20",
        ]
        results = _run(["--config-file", QUICKSTART] + opts)
    assert len(OutsideScaledSoftmax.calls) == 3 and all(scale == 0.5 and n > 0 for scale, n in OutsideScaledSoftmax.calls)
    assert set(results["bbox"]) >= {"AP", "APr", "APc", "APf"}
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == tiny_dataset["spec"].num_categories + 1
    with open(tmp_path / "metrics.json") as f:
        losses = [json.loads(line)["loss_cls"] for line in f if line.strip() and "loss_cls" in line]
    assert losses and all(value > 0 for value in losses)


# -- issue 23 item 5: unknown registry names are config errors --------------------------------


@pytest.mark.parametrize("key, value, names_listed", [
    ("MODEL.EQLOSSES.LOSS", "nope", "bags, bal_bce, balanced_softmax, cdb_s, cdb_w, db, ecm, eql, eqlv2, equilibrium, "
                                    "federated, gumbel, gumbel_droploss, iif, pcb, seesaw, sigmoid, softmax, softmax_eql"),
    ("MODEL.EQLOSSES.ONE_STAGE.LOSS", "nope", "efl, focal"),
    ("TEST.EQLOSSES.CALIBRATION.METHOD", "nope", "iif, none, norcal, tau_norm"),
])
def test_unknown_registry_name_is_one_line_before_output_dir(key, value, names_listed, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--config-file", QUICKSTART] + _opts(tiny_dataset, out, max_iter=1) + [key, value]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train_net.py: error:"), err
    assert f"{key}: unknown" in err and f"'{value}'" in err and f"(known: {names_listed})" in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("key, value, registry", [
    ("MODEL.ROI_HEADS.NAME", "LongTailNope", "ROI_HEADS"),
    ("MODEL.META_ARCHITECTURE", "Nope", "META_ARCH"),
    ("MODEL.BACKBONE.NAME", "build_nope", "BACKBONE"),
])
def test_unknown_detectron2_name_is_one_line_before_output_dir(key, value, registry, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--config-file", QUICKSTART] + _opts(tiny_dataset, out, max_iter=1) + [key, value]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{key}: unknown '{value}' in Detectron2's {registry} registry (known: " in err, err
    if registry == "ROI_HEADS":
        assert "LongTailStandardROIHeads" in err and "StandardROIHeads" in err
    assert not out.exists()


def test_a_kind_without_its_keys_is_skipped():
    """A registry kind whose config keys a config lacks (added by a package the run does not
    use) is not checked there."""
    from eqlosses_d2 import registry
    from eqlosses_d2.config import validate_registry_names

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    extra = registry.Kind(registry.Registry("TEST_ONLY_KIND"), "MODEL.EQLOSSES.NOT_A_NODE.NAME", "thing")
    original = registry.KINDS
    import eqlosses_d2.config as config

    try:
        config.KINDS = original + (extra,)
        validate_registry_names(cfg)  # no KeyError
        cfg.MODEL.EQLOSSES.LOSS = "nope"
        with pytest.raises(ConfigError, match="MODEL.EQLOSSES.LOSS: unknown loss 'nope'"):
            validate_registry_names(cfg)
    finally:
        config.KINDS = original


def test_every_check_runs_from_validate_config():
    order = [name for name, _ in CONFIG_CHECK_REGISTRY]
    assert order[0] == "validate_registry_names"
    assert {"validate_losses", "validate_eval_protocol", "validate_one_stage", "validate_copy_paste"} <= set(order)
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.INPUT.EQLOSSES.COPY_PASTE.ENABLED = True  # without LSJ: the copy-paste mapper's own check
    with pytest.raises(ConfigError, match="COPY_PASTE.ENABLED needs INPUT.EQLOSSES.LSJ.ENABLED"):
        validate_config(cfg)
    import eqlosses_d2.config
    from eqlosses_d2.data.copy_paste import validate_copy_paste

    assert eqlosses_d2.config.validate_copy_paste is validate_copy_paste
