"""
The long-tail picture of a segmenter: per-class IoU (y) against the class's training images (x, log
scale), coloured by frequency group (rare / common / frequent, the evaluator's ``mIoU-r/c/f``),
each group's mean as a dashed line (:func:`eqlosses_d2.evaluation.plot.scatter_against_counts`, the
figure of LVIS's per-category AP and of classification's per-class accuracy); saved atomically as a
PNG from the records of the evaluator's ``per_class_iou.json``. Written through
:func:`eqlosses_d2.evaluation.plot.plot_or_warn`: a plotting failure (no matplotlib) is one warning,
never the metrics' loss.
"""
from ..evaluation.plot import GROUP_STYLE, scatter_against_counts

__all__ = ["plot_per_class_iou"]


def plot_per_class_iou(records, path, title=None):
    """Records ``{"IoU", "train_image_count", "group"}`` (IoU None: no ground truth in the evaluation
    set; left out, and so is a class without training images, which a log axis cannot show).
    Returns the number of classes plotted."""
    plotted = [r for r in records if r.get("IoU") is not None and r.get("train_image_count")]
    groups = []
    for group, (label, color) in GROUP_STYLE.items():
        members = [r for r in plotted if r.get("group") == group]
        groups.append((label, color, [r["train_image_count"] for r in members], [r["IoU"] for r in members]))
    left_out = len(records) - len(plotted)
    heading = title or "per-class IoU"
    scatter_against_counts(
        groups, path, xlabel="training images of the class", ylabel="IoU (%)",
        title=heading + (f" ({left_out} classes without IoU or training images left out)" if left_out else ""),
        legend="{label} ({n}): mIoU {mean:.1f}", size=14,
    )
    return len(plotted)
