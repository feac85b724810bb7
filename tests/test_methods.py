"""Every registered classification loss: its config node mirrors its constructor, and it
trains (a few iterations) and evaluates end to end in the standard and cascade heads."""
import inspect
import json
import math

import pytest
import torch

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.losses import LOSS_REGISTRY, build_loss, loss_hparams_from_cfg, required_opts
from eqlosses_d2.registry import names

from test_training import QUICKSTART, _opts, _run

LOSSES = names(LOSS_REGISTRY)


def _cfg():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    return cfg


@pytest.mark.parametrize("name", LOSSES)
def test_config_node_mirrors_constructor(name):
    cls = LOSS_REGISTRY.get(name)
    params = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k not in ("self", "num_classes", "class_stats") and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    hparams = loss_hparams_from_cfg(cls, _cfg().MODEL.EQLOSSES)
    assert hparams == params, f"MODEL.EQLOSSES.{cls.config_node} and {cls.__name__}.__init__ disagree"
    loss = build_loss(name, 5, **hparams)
    assert loss.num_logits in ((5, 6, 7) if name != "bags" else (5 + 6,))  # BAGS: C + G + 2, G = 4 groups


def test_unknown_loss_is_one_line():
    with pytest.raises(KeyError, match="MODEL.EQLOSSES.LOSS: unknown loss 'nope'"):
        build_loss("nope", 3)


@pytest.mark.parametrize("head", ["LongTailStandardROIHeads", "LongTailCascadeROIHeads"])
@pytest.mark.parametrize("name", LOSSES)
def test_trains_and_evaluates(name, head, tiny_dataset, tmp_path):
    opts = _opts(tiny_dataset, tmp_path, max_iter=3) + [
        "MODEL.EQLOSSES.LOSS", name,
        "MODEL.ROI_HEADS.NAME", head,
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", str(head == "LongTailCascadeROIHeads"),
        "TEST.DETECTIONS_PER_IMAGE", "50",
    ] + required_opts(name)  # CDB-S: its sampler
    results = _run(["--config-file", QUICKSTART] + opts)
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "APr", "APc", "APf"}
        assert math.isnan(results[task]["AP"]) or 0.0 <= results[task]["AP"] <= 100.0
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert bool(state["roi_heads.class_stats.is_set"])
    # the method's own scalars reach the event storage (TensorBoard / metrics.json)
    with open(tmp_path / "metrics.json") as f:
        logged = set().union(*(json.loads(line) for line in f if line.strip()))
    # (the cascade logs each stage's own under stage<k>/)
    for key in LOSS_REGISTRY.get(name)(6).scalars():
        assert any(k == f"{name}/{key}" or k.endswith(f"/{name}/{key}") for k in logged), (key, logged)
