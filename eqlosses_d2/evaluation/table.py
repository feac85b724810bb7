"""The LVIS AP table printed after evaluation: one row per task (bbox, segm)."""
import math

__all__ = ["format_ap_table", "AP_COLUMNS"]

AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def format_ap_table(results, dataset_name=None):
    """
    Args:
        results: ``{task: {metric: value}}`` as returned by Detectron2's evaluators
            (``{"bbox": {"AP": ...}, "segm": {...}}``), or ``{dataset: that}``.
    Returns:
        str: a Markdown table, one row per (dataset,) task.
    """
    if results and all(isinstance(v, dict) and set(v) <= {"bbox", "segm", "proposals"} for v in results.values()):
        blocks = results.items()
    else:
        blocks = [(dataset_name, results)]
    header = "| dataset | task | " + " | ".join(AP_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(AP_COLUMNS) + 2)]
    for name, tasks in blocks:
        for task in ("bbox", "segm"):
            metrics = tasks.get(task) if tasks else None
            if not metrics:
                continue
            cells = []
            for key in AP_COLUMNS:
                value = metrics.get(key, float("nan"))
                cells.append("nan" if value is None or math.isnan(value) else f"{value:.2f}")
            lines.append(f"| {name or ''} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
