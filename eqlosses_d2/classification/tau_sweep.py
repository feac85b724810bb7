"""
Choose τ of the τ-normalised classifier (``HEAD tau_norm``; Kang et al., ICLR 2020) on the
validation split, as the decoupling authors do (their ``tau_norm.py`` evaluates
``np.linspace(0, 2, 21)`` on the features of a split), then report that τ's test accuracy:

    python -m eqlosses_d2.classification.tau_sweep \\
        --config-file configs/quickstart/tau_norm_R18_synthetic_cls.yaml \\
        MODEL.WEIGHTS output/quickstart/softmax_R18_synthetic_cls/model_final.pth

One backbone pass per split (pooled features kept), then every τ scores
``<x, w_j> / ‖w_j‖^τ`` (no bias; :func:`eqlosses_d2.calibration.tau_norm.tau_normalized_logits`)
from the checkpoint's ``head.fc.weight`` (a ``linear`` or ``tau_norm`` head). Prints one row per τ
(val top-1 and many / medium / few), the τ of the best val top-1 (ties: the first in the grid),
and the test row of that τ only (the test split plays no part in the choice). The val split is
``--val-dataset`` or ``DATASETS.TEST[0]`` with ``_test`` replaced by ``_val``; the test split
``--test-dataset`` or ``DATASETS.TEST[0]``. Accuracies are the evaluator's
(:func:`~eqlosses_d2.classification.evaluator.split_accuracies`; the authors' script prints the
mean of the per-class accuracies, the same number on the balanced val/test splits).

Single process: ``WORLD_SIZE`` above 1 is refused.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Sequence

import numpy as np
import torch

__all__ = ["parse_taus", "extract_features", "sweep_tau", "best_tau", "format_tau_table", "tau_text", "run", "main"]

logger = logging.getLogger(__name__)

#: the decoupling authors' grid (tau_norm.py: np.linspace(0, 2, 21))
DEFAULT_TAUS = "0:2:0.1"


def parse_taus(text: str) -> List[float]:
    """``"a:b:step"`` (inclusive of b) or ``"t1,t2,..."``; a bad value is a one-line ValueError."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            taus = [round(start + i * step, 10) for i in range(count)]
        else:
            taus = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--taus: expected 'start:stop:step' or 't1,t2,...', got '{text}'") from None
    if not taus or any(not t >= 0 for t in taus):
        raise ValueError(f"--taus: values must be >= 0, got '{text}'")
    return taus


@torch.no_grad()
def extract_features(model, loader):
    """(N, D) float32 pooled features and (N,) labels of every image of ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for batch in loader:
            features.append(model.features(batch).float().cpu())
            labels.extend(int(x["label"]) for x in batch)
    finally:
        model.train(was_training)
    return torch.cat(features), torch.as_tensor(labels, dtype=torch.long)


def sweep_tau(weight: torch.Tensor, features: torch.Tensor, labels, taus: Sequence[float], train_image_count,
              top_k: int = 5) -> List[Dict]:
    """One row ``{"tau", "top1", "top5", "many", "medium", "few"}`` (percent) per τ, of the logits
    ``<x, w_j> / ‖w_j‖^τ`` of ``weight`` (C, D) on ``features`` (N, D)."""
    from ..calibration.tau_norm import tau_normalized_logits
    from .evaluator import split_accuracies

    weight = weight.detach().float().cpu()
    raw = features.float() @ weight.t()
    num_classes = weight.shape[0]
    k = min(top_k, num_classes)
    rows = []
    for tau in taus:
        logits = tau_normalized_logits(raw, weight, None, tau, num_classes)
        top = torch.topk(logits, k, dim=1).indices.numpy()
        metrics, _ = split_accuracies(np.asarray(labels), top, train_image_count, num_classes)
        rows.append({"tau": float(tau), **{key: float(value) for key, value in metrics.items()}})
    return rows


def best_tau(rows: Sequence[Dict]) -> Dict:
    """The row of the highest top-1 (the first of equal ones)."""
    best = rows[0]
    for row in rows[1:]:
        if row["top1"] > best["top1"]:
            best = row
    return best


def tau_text(tau: float) -> str:
    """τ as a config value: always a float literal ("1.0", not "1", which the config would take for an int)."""
    text = f"{tau:g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _cell(value):
    return "nan" if value != value else f"{value:.2f}"


def format_tau_table(rows: Sequence[Dict], dataset: str, best: Dict = None) -> str:
    lines = [f"| τ | {dataset} top1 | many | medium | few |", "|---|---|---|---|---|"]
    for row in rows:
        mark = " *" if best is not None and row is best else ""
        lines.append(f"| {tau_text(row['tau'])}{mark} | " + " | ".join(_cell(row[k]) for k in ("top1", "many", "medium", "few")) + " |")
    return "\n".join(lines)


def _setup(config_file, opts):
    from detectron2.config import get_cfg

    from .. import add_eqlosses_config
    from ..config import merge_config_file, merge_config_list, validate_config

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, config_file)
    merge_config_list(cfg, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg)
    cfg.freeze()
    return cfg


def run(cfg, val_dataset: str = None, test_dataset: str = None, taus: Sequence[float] = None):
    """The sweep of a frozen config (MODEL.WEIGHTS loaded): ``(rows on val, best row, test row, names)``."""
    from detectron2.modeling import build_model

    from ..checkpoint import AtomicCheckpointer, check_checkpoint_file
    from ..config import ConfigError
    from .data import build_classification_test_loader, prepare_classification_dataset
    from .decoupling import missing_weights_hint
    from .evaluator import ClassificationEvaluator

    weights = cfg.MODEL.WEIGHTS
    if not weights or ("://" not in weights and not os.path.isfile(weights)):
        raise ConfigError(f"MODEL.WEIGHTS: checkpoint not found: {weights!r}{missing_weights_hint(cfg)}")
    if "://" not in weights:
        check_checkpoint_file(weights, "MODEL.WEIGHTS")
    test_dataset = test_dataset or cfg.DATASETS.TEST[0]
    if val_dataset is None:
        if not test_dataset.endswith("_test"):
            raise ConfigError(f"tau_sweep: no val split known for '{test_dataset}': give --val-dataset")
        val_dataset = test_dataset[: -len("_test")] + "_val"
    for name in (val_dataset, test_dataset):
        prepare_classification_dataset(name)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights, checkpointables=[])
    fc = getattr(model.head, "fc", None)
    if not isinstance(getattr(fc, "weight", None), torch.Tensor):
        raise ConfigError(f"MODEL.EQLOSSES.CLASSIFICATION.HEAD '{cfg.MODEL.EQLOSSES.CLASSIFICATION.HEAD}' has no "
                          f"linear classifier (head.fc.weight) to τ-normalise")
    taus = list(taus if taus is not None else parse_taus(DEFAULT_TAUS))
    out = {}
    for split, name in (("val", val_dataset), ("test", test_dataset)):
        counts = ClassificationEvaluator(name).train_image_count()
        features, labels = extract_features(model, build_classification_test_loader(cfg, name))
        out[split] = (features, labels, counts)
    rows = sweep_tau(fc.weight, *out["val"][:2], taus, out["val"][2])
    best = best_tau(rows)
    test_row = sweep_tau(fc.weight, *out["test"][:2], [best["tau"]], out["test"][2])[0]
    return rows, best, test_row, (val_dataset, test_dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eqlosses_d2.classification.tau_sweep",
                                     description="Choose τ of the τ-normalised classifier on val; report it on test.")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--val-dataset", default=None, help="default: DATASETS.TEST[0] with _test -> _val")
    parser.add_argument("--test-dataset", default=None, help="default: DATASETS.TEST[0]")
    parser.add_argument("--taus", default=DEFAULT_TAUS, help="'start:stop:step' (inclusive) or 't1,t2,...' "
                                                             "(default: the authors' 0:2:0.1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (MODEL.WEIGHTS ...)")
    args = parser.parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data import DatasetError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if world_size != 1:
            raise ConfigError(f"WORLD_SIZE={world_size}: the sweep runs in one process")
        taus = parse_taus(args.taus)
        cfg = _setup(args.config_file, args.opts)
        rows, best, test_row, (val_name, test_name) = run(cfg, args.val_dataset, args.test_dataset, taus)
    except (ConfigError, DatasetError, CheckpointError, ValueError, KeyError) as e:
        print(f"tau_sweep: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(format_tau_table(rows, val_name, best))
    tau = tau_text(best["tau"])
    print(f"\nbest τ = {tau} (val top-1 {best['top1']:.2f}); {test_name} with τ = {tau}:")
    print(f"| τ | top1 | top5 | many | medium | few |\n|---|---|---|---|---|---|\n| {tau} | "
          + " | ".join(_cell(test_row.get(k, float("nan"))) for k in ("top1", "top5", "many", "medium", "few")) + " |")
    print(f"\nevaluate it: python train_net.py --config-file {args.config_file} --eval-only "
          f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} MODEL.EQLOSSES.CLASSIFICATION.HEAD tau_norm "
          f"MODEL.EQLOSSES.CLASSIFICATION.TAU_NORM.TAU {tau}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
