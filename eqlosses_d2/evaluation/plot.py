"""
The long-tail picture: per-category AP against the category's number of training images
(log scale), coloured by LVIS frequency group, with each group's mean AP as a line.

:func:`plot_per_category_ap` reads the records :func:`per_category_records` returns (or
the ``lvis_per_category_<task>.json`` the evaluator writes) and saves a PNG atomically.
CLI: ``python -m eqlosses_d2.evaluation.plot lvis_per_category_segm.json [out.png]``.

A plot is a by-product: :func:`plot_or_warn` runs a plotting function so that its failure
(matplotlib missing or broken, an unwritable font cache or output directory, a full disk)
is one warning, never an exception that would discard the metrics computed before it.
"""
import argparse
import json
import logging
import os

from ..atomic import atomic_write

__all__ = ["plot_or_warn", "plot_per_category_ap", "scatter_against_counts"]

logger = logging.getLogger(__name__)

GROUP_STYLE = {"r": ("rare", "tab:red"), "c": ("common", "tab:orange"), "f": ("frequent", "tab:blue")}


def plot_per_category_ap(records, path, title=None):
    """
    Save the scatter of per-category AP (y) against training image count (x, log) to
    ``path`` (PNG). Categories without AP (no ground truth) or without an image count
    are left out; the title says how many. Returns the number of categories plotted.
    """
    plotted = [r for r in records if r.get("AP") is not None and r.get("image_count")]
    groups = []
    for group, (label, color) in GROUP_STYLE.items():
        members = [r for r in plotted if r.get("frequency") == group]
        groups.append((label, color, [r["image_count"] for r in members], [r["AP"] for r in members]))
    left_out = len(records) - len(plotted)
    heading = title or "per-category AP"
    scatter_against_counts(
        groups, path, xlabel="training images of the category", ylabel="AP",
        title=heading + (f" ({left_out} categories without AP left out)" if left_out else ""),
        legend="{label} ({n}): mean AP {mean:.1f}", size=12,
    )
    return len(plotted)


def scatter_against_counts(groups, path, *, xlabel, ylabel, title, legend, size):
    """
    The long-tail figure both tasks draw: for each group ``(label, color, xs, ys)`` (a
    group without points is skipped), its points against training counts (x, log scale)
    and its mean as a dashed line, labelled ``legend.format(label=, n=, mean=)``; y from −2
    to 102; saved to ``path`` as a PNG, atomically.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for label, color, xs, ys in groups:
            if not ys:
                continue
            mean = sum(ys) / len(ys)
            ax.scatter(xs, ys, s=size, color=color, alpha=0.7, label=legend.format(label=label, n=len(ys), mean=mean))
            ax.axhline(mean, color=color, linewidth=1, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-2, 102)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_or_warn(function, *args, path, **kwargs):
    """``function(*args, path=path, **kwargs)``; on any exception, log one warning naming
    ``path`` and the error and return None (the caller's results stand)."""
    try:
        return function(*args, path=path, **kwargs)
    except Exception as e:  # noqa: BLE001  # a plot must never cost the metrics
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        logger.warning(f"plot {path} not written ({type(e).__name__}: {message}); the metrics are unaffected")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot per-category AP against training image count.")
    parser.add_argument("records", help="lvis_per_category_<task>.json written by the evaluator")
    parser.add_argument("output", nargs="?", help="PNG path (default: next to the json)")
    args = parser.parse_args(argv)
    try:
        with open(args.records) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{args.records}: {e}\n")
    output = args.output or os.path.splitext(args.records)[0] + ".png"
    n = plot_per_category_ap(records, output, title=os.path.basename(args.records))
    print(f"{output}: {n} categories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
