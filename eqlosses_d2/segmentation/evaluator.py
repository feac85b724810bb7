"""
``LongTailSemSegEvaluator``: Detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC, IoU-<class>,
ACC-<class>, from one confusion matrix summed over processes) plus the mIoU of each frequency group
of the classes, ``mIoU-r`` / ``mIoU-c`` / ``mIoU-f``, by training image count: rare if a class is
in at most ``RARE_MAX_IMAGES`` training images, common if at most ``COMMON_MAX_IMAGES``, else
frequent (``MODEL.EQLOSSES.SEM_SEG``, defaults 10 / 100, LVIS's thresholds); a per-class json
(``per_class_iou.json``: class, name, IoU, ACC, training pixel and image counts, group) and its
plot against the training image counts (``per_class_iou.png``, :mod:`.plot`), both written
atomically into the output directory; :func:`format_sem_seg_table`, the printed table.

Definitions (all in percent). With the confusion matrix over the evaluation pixels whose ground
truth is not ignored, per class c: TP_c, GT_c (pixels of class c), PRED_c (pixels predicted c),
``IoU_c = TP_c / (GT_c + PRED_c − TP_c)`` and ``ACC_c = TP_c / GT_c``, both undefined (NaN) when
GT_c = 0. ``mIoU`` is the mean of the defined IoU_c, ``mIoU-<g>`` the mean over the classes of
group g with a defined IoU_c: NaN (the key is always present) when the group has no class, or
none with ground-truth pixels in the evaluation set. ``fwIoU = Σ_c GT_c / Σ GT · IoU_c``, ``mACC``
the mean of the defined ACC_c, ``pACC = Σ TP / Σ GT``. The training counts come from the
statistics passed in (the model's), else from those of the dataset's ``class_count_dataset``
(its training split, computed from the masks: :mod:`.data.statistics`); their thresholds are the
statistics' ``rare_max_images`` / ``common_max_images``. The evaluation masks are checked when the
evaluator is built (:func:`~eqlosses_d2.segmentation.data.prepare_sem_seg_dataset`: a missing image or
mask, or a label neither a class nor the ignore value, is one :class:`~eqlosses_d2.data.DatasetError`
line then, not an exception after the inference pass).

Differences from Detectron2: v0.6's ``SemSegEvaluator`` divides the IoU sum by the classes with
ground truth *or* predictions (a class predicted but absent from the evaluation set counts as 0);
Detectron2 main (since f3c1bc1, "Fix semantic errors in code for calculating IoU metrics", 2022)
by the classes with ground truth. We report main's ``mIoU`` on both lines (the same number
whichever Detectron2 is installed; on ADE20K val, where every class has ground truth, the two
agree). Main also reports Boundary IoU per class when OpenCV is installed; we keep whatever the
installed line reports. v0.6's ``np.int`` / ``np.float`` are handled by
:mod:`eqlosses_d2.compat` (``numpy-int-sem-seg``).

ADE20K (150 classes, 20,210 training images): by the training image counts the SceneParsing
release publishes (``objectInfo150.csv``, column ``Train``: 42 (escalator) to 11,664 (wall)), the
default thresholds 10 / 100 make 0 rare, 19 common (runway, arcade machine, hovel, booth, dirt
track, escalator, ship, fountain, conveyer belt, washer, swimming pool, barrel, waterfall, tent,
cradle, tank, animal, lake, pier) and 131 frequent classes, so ``mIoU-r`` would be NaN there. The
ADE20K configs (``configs/ADE20K/Base-ADE20K.yaml``) therefore set 100 / 1000: those 19 rare, 89
common and 42 frequent classes (no published convention exists for ADE20K's groups). The
evaluator uses the counts computed from Detectron2's masks at first use, which should agree
(Detectron2's masks relabel, they do not move pixels).
"""
import json
import logging
import math
import os
from collections import OrderedDict

import numpy as np

from detectron2.evaluation import SemSegEvaluator

from ..atomic import atomic_write
from .stats import SemSegClassStatistics

__all__ = ["LongTailSemSegEvaluator", "per_class_iou_acc", "group_mean_iou", "format_sem_seg_table",
           "SEM_SEG_COLUMNS", "FREQUENCY_GROUP_KEYS"]

logger = logging.getLogger(__name__)

#: group letter -> result key
FREQUENCY_GROUP_KEYS = OrderedDict([("r", "mIoU-r"), ("c", "mIoU-c"), ("f", "mIoU-f")])
#: the printed table's columns
SEM_SEG_COLUMNS = ("mIoU", "mIoU-r", "mIoU-c", "mIoU-f", "fwIoU", "mACC", "pACC")


def per_class_iou_acc(conf_matrix):
    """
    Args:
        conf_matrix: (C+1, C+1) counts, Detectron2's layout: ``[predicted, ground truth]``, the last
            column the ignored ground truth (left out), the last row unused.
    Returns:
        (iou, acc): (C,) float64 fractions, NaN for a class without ground-truth pixels.
    """
    conf = np.asarray(conf_matrix, dtype=np.float64)[:-1, :-1]
    tp = conf.diagonal()
    gt = conf.sum(axis=0)
    pred = conf.sum(axis=1)
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    valid = gt > 0
    iou[valid] = tp[valid] / (gt[valid] + pred[valid] - tp[valid])
    acc[valid] = tp[valid] / gt[valid]
    return iou, acc


def group_mean_iou(iou, frequency):
    """``{"mIoU-r": .., "mIoU-c": .., "mIoU-f": ..}`` in percent: the mean of the defined IoUs of
    each group's classes (``frequency``: 'r' / 'c' / 'f' per class), NaN if it has none."""
    iou = np.asarray(iou, dtype=np.float64)
    frequency = np.asarray(list(frequency))
    out = OrderedDict()
    for group, key in FREQUENCY_GROUP_KEYS.items():
        values = iou[(frequency == group) & ~np.isnan(iou)]
        out[key] = 100.0 * float(values.mean()) if len(values) else float("nan")
    return out


def format_sem_seg_table(results, dataset_name=None):
    """The Markdown table of ``{"sem_seg": {metric: value}}`` (or ``{dataset: that}``): one row per
    dataset, columns :data:`SEM_SEG_COLUMNS`."""
    if results and "sem_seg" not in results:
        blocks = results.items()
    else:
        blocks = [(dataset_name, results)]
    lines = ["| dataset | " + " | ".join(SEM_SEG_COLUMNS) + " |", "|" + "---|" * (len(SEM_SEG_COLUMNS) + 1)]
    for name, tasks in blocks:
        metrics = (tasks or {}).get("sem_seg")
        if not metrics:
            continue
        cells = []
        for key in SEM_SEG_COLUMNS:
            value = metrics.get(key)
            cells.append("nan" if value is None or math.isnan(value) else f"{value:.2f}")
        lines.append(f"| {name or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class LongTailSemSegEvaluator(SemSegEvaluator):
    """See the module docstring. ``class_statistics``: the training split's
    :class:`SemSegClassStatistics` (with the config's thresholds); default: those of the
    dataset's ``class_count_dataset``."""

    def __init__(self, dataset_name, distributed=True, output_dir=None, class_statistics=None):
        from .data.datasets import prepare_sem_seg_dataset

        # generate what is embedded; check every image and mask now (a missing file or a label that is no
        # class is one line here, not a failure after the inference pass); the masks' statistics are cached
        prepare_sem_seg_dataset(dataset_name)
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        if class_statistics is not None and class_statistics.num_classes != self._num_classes:
            raise ValueError(f"class_statistics have {class_statistics.num_classes} classes but dataset "
                             f"'{dataset_name}' has {self._num_classes} (stuff_classes)")
        self._class_statistics = class_statistics

    def class_statistics(self) -> SemSegClassStatistics:
        """The training statistics the groups come from (see the class docstring)."""
        if self._class_statistics is None:
            from .data.datasets import get_sem_seg_class_statistics, training_split_of

            source = training_split_of(self._dataset_name)
            stats = get_sem_seg_class_statistics(source)
            if stats.num_classes != self._num_classes:
                raise ValueError(f"training split '{source}' has {stats.num_classes} classes but dataset "
                                 f"'{self._dataset_name}' has {self._num_classes}")
            self._class_statistics = stats
        return self._class_statistics

    def evaluate(self):
        results = super().evaluate()  # gathers and sums the confusion matrices
        if not results:  # not the main process
            return results
        res = results["sem_seg"]
        iou, acc = per_class_iou_acc(self._conf_matrix)
        defined = iou[~np.isnan(iou)]
        miou = 100.0 * float(defined.mean()) if len(defined) else float("nan")
        if not (math.isnan(miou) and math.isnan(res["mIoU"])) and not math.isclose(miou, res["mIoU"], abs_tol=1e-9):
            logger.info("mIoU over the classes with ground truth: %.4f (this Detectron2's SemSegEvaluator: %.4f, "
                        "which also counts classes predicted but absent)", miou, res["mIoU"])
        res["mIoU"] = miou
        stats = self.class_statistics()
        res.update(group_mean_iou(iou, stats.frequency))
        sizes = {g: stats.frequency.count(g) for g in FREQUENCY_GROUP_KEYS}
        logger.info("Frequency groups by training images (rare <= %d < common <= %d < frequent): %d / %d / %d classes",
                    stats.rare_max_images, stats.common_max_images, sizes["r"], sizes["c"], sizes["f"])
        if self._output_dir:
            self._write_per_class(iou, acc, stats)
        return results

    def _write_per_class(self, iou, acc, stats):
        records = []
        for c, name in enumerate(self._class_names):
            records.append({
                "class": c, "name": name,
                "IoU": None if np.isnan(iou[c]) else 100.0 * float(iou[c]),
                "ACC": None if np.isnan(acc[c]) else 100.0 * float(acc[c]),
                "train_pixel_count": int(stats.pixel_count[c]), "train_image_count": int(stats.image_count[c]),
                "group": stats.frequency[c],
            })
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write(os.path.join(self._output_dir, "per_class_iou.json"),
                     lambda f: json.dump(records, f, indent=1), binary=False)
        from ..evaluation.plot import plot_or_warn
        from .plot import plot_per_class_iou

        plot_or_warn(plot_per_class_iou, records, path=os.path.join(self._output_dir, "per_class_iou.png"),
                     title=f"{self._dataset_name}: per-class IoU")
        return records
