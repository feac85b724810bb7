"""
The long-tail picture of a classifier: per-class top-1 accuracy (y) against the class's training
images (x, log scale), coloured by many / medium / few-shot split, each split's mean as a dashed
line (the figure of :func:`eqlosses_d2.evaluation.plot.scatter_against_counts`, as LVIS's per-category
AP); saved atomically as a PNG from the evaluator's ``classification_per_class.json`` records.
Written through :func:`eqlosses_d2.evaluation.plot.plot_or_warn`: a plotting failure is one
warning, never the metrics' loss.
"""
from ..evaluation.plot import scatter_against_counts

__all__ = ["plot_per_class_accuracy"]

SPLIT_STYLE = (("many", 101, None, "tab:blue"), ("medium", 20, 100, "tab:orange"), ("few", 0, 19, "tab:red"))


def plot_per_class_accuracy(records, path, title=None):
    """Records ``{"train_images", "accuracy"}`` (accuracy None: no test image, left out). Returns the
    number of classes plotted."""
    plotted = [r for r in records if r.get("accuracy") is not None]
    groups = []
    for name, lo, hi, color in SPLIT_STYLE:
        members = [r for r in plotted if r["train_images"] >= lo and (hi is None or r["train_images"] <= hi)]
        groups.append((name, color, [max(r["train_images"], 0.5) for r in members], [r["accuracy"] for r in members]))
    scatter_against_counts(
        groups, path, xlabel="training images of the class", ylabel="top-1 accuracy (%)",
        title=title or "per-class accuracy", legend="{label} ({n}): mean {mean:.1f}", size=14,
    )
    return len(plotted)
