"""A plot is a by-product: when plotting fails (here: matplotlib cannot save, a full disk), the
evaluator still returns its metrics and writes its per-category json, and the sweep's
plot fails in one warning."""
import json
import logging
import math
import uuid

import pytest
import torch

from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

from eqlosses_d2.evaluation import LVISEvaluator
from eqlosses_d2.evaluation.calibration_sweep import plot_sweep
from eqlosses_d2.evaluation.plot import plot_or_warn, plot_per_category_ap

from test_lvis_evaluation import _tiny_gt, near


@pytest.fixture
def broken_matplotlib(monkeypatch):
    from matplotlib.figure import Figure

    def savefig(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)


def _instances(boxes, scores, classes):
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros(len(boxes), 100, 100, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst.pred_masks = masks
    return inst


def test_evaluator_keeps_its_metrics_when_the_plot_fails(tmp_path, broken_matplotlib, caplog):
    json_file = tmp_path / "tiny_lvis.json"
    json_file.write_text(json.dumps(_tiny_gt()))
    name = f"eqlosses_test_plot_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=["one", "two", "three"])
    out_dir = tmp_path / "out"
    evaluator = LVISEvaluator(name, distributed=False, output_dir=str(out_dir))
    evaluator.reset()
    evaluator.process([{"image_id": 1, "height": 100, "width": 100}],
                      [{"instances": _instances([[10, 10, 30, 30], [50, 50, 90, 90]], [0.9, 0.5], [0, 1])}])
    evaluator.process([{"image_id": 2, "height": 100, "width": 100}], [{"instances": _instances([], [], [])}])
    with caplog.at_level(logging.WARNING, logger="eqlosses_d2.evaluation.plot"):
        results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == near(100) and math.isnan(results[task]["APr"])
        records = json.loads((out_dir / f"lvis_per_category_{task}.json").read_text())
        assert [r["AP"] for r in records] == [near(100), near(100), None]
        assert not (out_dir / f"lvis_per_category_{task}.png").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("lvis_per_category_bbox.png not written (OSError" in w and "\n" not in w for w in warnings), warnings


def test_plot_or_warn(tmp_path, broken_matplotlib, caplog):
    rows = [{"value": 0.0, "bbox": {"AP": 1.0, "APr": 0.5, "APc": 1.0, "APf": 2.0}}]
    with caplog.at_level(logging.WARNING, logger="eqlosses_d2.evaluation.plot"):
        assert plot_or_warn(plot_sweep, rows, "norcal", path=str(tmp_path / "sweep.png")) is None
        assert plot_or_warn(plot_per_category_ap, [], path=str(tmp_path / "ap.png")) is None
    assert len([r for r in caplog.records if "not written (OSError" in r.getMessage()]) == 2
    assert not list(tmp_path.iterdir())


def test_plot_or_warn_returns_what_the_plot_returns(tmp_path):
    records = [{"id": 1, "AP": 50.0, "image_count": 10, "frequency": "c"}]
    assert plot_or_warn(plot_per_category_ap, records, path=str(tmp_path / "ap.png")) == 1
    assert (tmp_path / "ap.png").stat().st_size > 1000
