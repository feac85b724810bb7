"""
``ClassificationEvaluator``: top-1 and top-5 accuracy, and the many-shot (> 100 training
images), medium-shot (20-100) and few-shot (< 20) accuracies the long-tail literature reports
(the OLTR / decoupling protocol: the mean over the test images of each group's classes, which on
balanced test sets is the mean of the per-class accuracies), all in percent; a per-class json
(``classification_per_class.json``: name, training images, accuracy) and its plot against the
training counts (``classification_per_class.png``, :mod:`.plot`) written atomically into the
output directory; :func:`format_accuracy_table`, the printed table.

The training image counts come from the class statistics of the dataset's ``class_count_dataset``
(its training split), or are given (``train_image_count``).
"""
import itertools
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..atomic import atomic_write

__all__ = ["ClassificationEvaluator", "split_accuracies", "format_accuracy_table", "SHOT_SPLITS", "ACCURACY_COLUMNS"]

logger = logging.getLogger(__name__)

#: (name, lowest, highest training images), inclusive
SHOT_SPLITS = (("many", 101, None), ("medium", 20, 100), ("few", 0, 19))
ACCURACY_COLUMNS = ("top1", "top5", "many", "medium", "few")


def split_accuracies(labels, top_k, train_image_count, num_classes=None):
    """
    Args:
        labels: (M,) true classes of the evaluated images.
        top_k: (M, k) predicted classes, best first (k >= 1).
        train_image_count: (C,) training images per class.
    Returns:
        (metrics, per_class): ``{"top1", "top5" (when k >= 5), "many", "medium", "few"}`` in percent
        (NaN for a split without test images), and (C,) per-class top-1 accuracy in percent (NaN
        for a class without test images).
    """
    labels = np.asarray(labels, dtype=np.int64)
    top_k = np.asarray(top_k, dtype=np.int64).reshape(len(labels), -1)
    counts = np.asarray(train_image_count, dtype=np.int64)
    num_classes = num_classes or len(counts)
    correct1 = top_k[:, 0] == labels
    metrics = OrderedDict()
    metrics["top1"] = 100.0 * correct1.mean() if len(labels) else float("nan")
    if top_k.shape[1] >= 5:
        metrics["top5"] = 100.0 * (top_k[:, :5] == labels[:, None]).any(1).mean() if len(labels) else float("nan")
    for name, lo, hi in SHOT_SPLITS:
        in_split = (counts >= lo) & (counts <= (hi if hi is not None else np.iinfo(np.int64).max))
        selected = in_split[labels]
        metrics[name] = 100.0 * correct1[selected].mean() if selected.any() else float("nan")
    hits = np.bincount(labels, weights=correct1, minlength=num_classes)
    totals = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, 100.0 * hits / np.maximum(totals, 1), np.nan)
    return metrics, per_class


def format_accuracy_table(results, dataset_name=None):
    """The Markdown table of ``{"classification": {metric: value}}`` (or ``{dataset: that}``)."""
    if results and "classification" not in results:
        blocks = results.items()
    else:
        blocks = [(dataset_name, results)]
    lines = ["| dataset | " + " | ".join(ACCURACY_COLUMNS) + " |", "|" + "---|" * (len(ACCURACY_COLUMNS) + 1)]
    for name, tasks in blocks:
        metrics = (tasks or {}).get("classification")
        if not metrics:
            continue
        cells = []
        for key in ACCURACY_COLUMNS:
            value = metrics.get(key)
            cells.append("nan" if value is None or value != value else f"{value:.2f}")
        lines.append(f"| {name or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ClassificationEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name, output_dir=None, train_image_count=None, top_k: int = 5):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.top_k = top_k
        self._train_image_count = train_image_count
        self._labels, self._top = [], []

    def reset(self):
        self._labels, self._top = [], []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            scores = out["scores"]
            k = min(self.top_k, scores.numel())
            self._top.append(torch.topk(scores, k).indices.cpu().numpy())
            self._labels.append(int(inp["label"]))

    def train_image_count(self):
        if self._train_image_count is not None:
            return np.asarray(self._train_image_count)
        from .data.datasets import prepare_classification_dataset

        meta = MetadataCatalog.get(self.dataset_name)
        source = meta.get("class_count_dataset")
        if source is None:
            raise ValueError(f"dataset '{self.dataset_name}' names no class_count_dataset (its training split)")
        return np.asarray(prepare_classification_dataset(source).class_statistics.image_count)

    def evaluate(self):
        labels = list(itertools.chain(*comm.gather(self._labels, dst=0)))
        top = list(itertools.chain(*comm.gather(self._top, dst=0)))
        if not comm.is_main_process():
            return {}
        if not labels:
            logger.warning("ClassificationEvaluator: no predictions")
            return {}
        counts = self.train_image_count()
        metrics, per_class = split_accuracies(labels, np.stack(top), counts)
        if self.output_dir:
            names = MetadataCatalog.get(self.dataset_name).get("thing_classes") or [str(c) for c in range(len(counts))]
            records = [{"class": i, "name": names[i] if i < len(names) else str(i), "train_images": int(counts[i]),
                        "accuracy": None if per_class[i] != per_class[i] else float(per_class[i])}
                       for i in range(len(counts))]
            os.makedirs(self.output_dir, exist_ok=True)
            atomic_write(os.path.join(self.output_dir, "classification_per_class.json"),
                         lambda f: json.dump(records, f, indent=1), binary=False)
            from ..evaluation.plot import plot_or_warn
            from .plot import plot_per_class_accuracy

            plot_or_warn(plot_per_class_accuracy, records, path=os.path.join(self.output_dir, "classification_per_class.png"),
                         title=f"{self.dataset_name}: per-class top-1 accuracy")
        return OrderedDict(classification={k: float(v) for k, v in metrics.items()})
