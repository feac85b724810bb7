"""
Sweep a post-hoc calibration setting (NorCal's γ, τ-norm's τ...) on a held-out split
with one pass of the network: per batch, the backbone, the RPN and the box head(s) run
once (:meth:`box_outputs` of our RoI heads); for each setting the scores are calibrated,
detections selected (``instances_from_box_outputs``), the mask head run on them (the
masks depend on which boxes are selected) and the result handed to that setting's LVIS
evaluator. Writes ``calibration_sweep.json``, ``calibration_sweep.md`` and a plot of AP,
APr, APc and APf against the swept value.

Memory: each setting's evaluator holds its results until the end (LVIS val: 20k images
× 300 detections per setting); sweep a handful of values at a time on LVIS.

Single process: the evaluators are not distributed, so :func:`calibration_sweep` refuses
to run in a process group of several processes (each would evaluate its own shard).
"""
import copy
import json
import logging
import os

import torch

from detectron2.data import build_detection_test_loader
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.utils import comm

from ..atomic import atomic_write
from ..calibration import ScoreCalibration
from ..modeling.box_predictor import CosineClassifier
from .evaluator import LVISEvaluator
from .plot import plot_or_warn

__all__ = ["SWEPT_PARAMETER", "best_row", "calibration_sweep", "format_sweep_table", "plot_sweep"]

logger = logging.getLogger(__name__)

#: the parameter each method's sweep varies
SWEPT_PARAMETER = {"norcal": "gamma", "tau_norm": "tau"}
_METRICS = ("AP", "APr", "APc", "APf")


def _settings(base: ScoreCalibration, method: str, values):
    if method not in SWEPT_PARAMETER:
        raise ValueError(f"--method must be one of {', '.join(SWEPT_PARAMETER)}, got '{method}'")
    settings = []
    for value in values:
        setting = copy.copy(base)
        setting.method = method
        setattr(setting, SWEPT_PARAMETER[method], float(value))
        settings.append(setting)
    return settings


@torch.no_grad()
def calibration_sweep(cfg, model, dataset_name, method, values, base=None, output_dir=None):
    """
    Evaluate ``model`` on ``dataset_name`` once per value of ``method``'s parameter; the
    other calibration options come from ``base`` (default: the config's). Returns a list
    of ``{"value": v, "bbox": {...}, "segm": {...}}`` in the order of ``values``.
    """
    from ..calibration import calibration_from_cfg

    if comm.get_world_size() > 1:
        raise ValueError(
            f"the calibration sweep runs in one process, not in {comm.get_world_size()} (its evaluators are "
            f"not distributed): run it with one GPU"
        )
    base = base if base is not None else calibration_from_cfg(cfg)
    settings = _settings(base, method, values)
    roi_heads = model.roi_heads
    if not hasattr(roi_heads, "box_outputs"):
        raise ValueError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME}: the sweep needs one of eqlosses_d2's RoI heads")
    for setting in settings:
        for predictor in _predictors(roi_heads):
            setting.check_head(predictor.cls_loss, cosine=isinstance(predictor.cls_score, CosineClassifier))
    evaluators = [LVISEvaluator(dataset_name, distributed=False, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
                  for _ in settings]
    for evaluator in evaluators:
        evaluator.reset()
    model.eval()
    loader = build_detection_test_loader(cfg, dataset_name)
    for inputs in loader:
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        box_outputs = roi_heads.box_outputs(features, proposals)
        image_sizes = [p.image_size for p in proposals]
        for setting, evaluator in zip(settings, evaluators):
            instances = roi_heads.instances_from_box_outputs(box_outputs, image_sizes, setting)
            instances = roi_heads.forward_with_given_boxes(features, instances)
            evaluator.process(inputs, GeneralizedRCNN._postprocess(instances, inputs, images.image_sizes))
    rows = []
    for value, evaluator in zip(values, evaluators):
        results = evaluator.evaluate()
        rows.append({"value": float(value), **{task: dict(metrics) for task, metrics in results.items()}})
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        payload = {"method": method, "parameter": SWEPT_PARAMETER[method], "dataset": dataset_name,
                   "base": repr(base), "rows": rows}
        atomic_write(os.path.join(output_dir, "calibration_sweep.json"),
                     lambda f: f.write(json.dumps(payload, indent=2).encode()))
        table = format_sweep_table(rows, method)
        atomic_write(os.path.join(output_dir, "calibration_sweep.md"), lambda f: f.write(table.encode()))
        plot_or_warn(plot_sweep, rows, method, path=os.path.join(output_dir, "calibration_sweep.png"))
    return rows


def _predictors(roi_heads):
    predictor = roi_heads.box_predictor
    return list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]


def best_row(rows, task=None, metric="AP"):
    """The row with the highest ``task`` ``metric`` (segm if present, else bbox)."""
    task = task or ("segm" if "segm" in rows[0] else "bbox")
    return max(rows, key=lambda row: row[task][metric]), task


def format_sweep_table(rows, method):
    """A markdown table: the swept value, then AP/APr/APc/APf per task."""
    parameter = SWEPT_PARAMETER[method]
    tasks = [t for t in ("bbox", "segm") if t in rows[0]]
    header = [parameter] + [f"{t} {m}" for t in tasks for m in _METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['value']:g}"] + [f"{row[t][m]:.2f}" for t in tasks for m in _METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows, method, path):
    """AP, APr, APc, APf against the swept value (one panel per task), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("bbox", "segm") if t in rows[0]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    values = [row["value"] for row in rows]
    for ax, task in zip(axes[0], tasks):
        for metric, style in zip(_METRICS, ("k-o", "r-s", "g-^", "b-v")):
            ax.plot(values, [row[task][metric] for row in rows], style, label=metric)
        ax.set_xlabel(SWEPT_PARAMETER[method])
        ax.set_ylabel(f"{task} AP")
        ax.set_title(f"{method}: {task}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
