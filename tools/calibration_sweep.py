#!/usr/bin/env python
"""
Sweep NorCal's γ (or τ-norm's τ) on a held-out split with one network pass, write a table
and a plot of AP/APr/APc/APf against it, and print the best setting.

    python tools/calibration_sweep.py --config-file CONFIG --dataset HELD_OUT_SPLIT \\
        --method norcal --values 0 0.2 0.4 0.6 0.8 1.0 --output-dir OUT MODEL.WEIGHTS model.pth

Single process: one GPU (or the CPU) runs the network once and evaluates every setting;
``--num-gpus`` above 1 is refused (the sweep's evaluators are not distributed), and so is
a launch under torchrun with several processes. Other calibration options (VARIANT,
FACTOR, RENORM, COUNT) come from the config's ``TEST.EQLOSSES.CALIBRATION`` and the
trailing KEY VALUE pairs. Choose the value on a
split you don't report on, then evaluate the test split once with it
(``--eval-only TEST.EQLOSSES.CALIBRATION.METHOD norcal TEST.EQLOSSES.CALIBRATION.GAMMA v``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_net  # noqa: E402
from eqlosses_d2.checkpoint import AtomicCheckpointer  # noqa: E402
from eqlosses_d2.config import ConfigError  # noqa: E402
from eqlosses_d2.data import DatasetError, prepare_dataset  # noqa: E402
from eqlosses_d2.evaluation.calibration_sweep import best_row, calibration_sweep, format_sweep_table  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", default=None, help="held-out split (default: DATASETS.TEST[0])")
    parser.add_argument("--method", default="norcal", choices=["norcal", "tau_norm"])
    parser.add_argument("--values", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--output-dir", default="output/calibration_sweep")
    parser.add_argument("--num-gpus", type=int, default=1, help="must be 1: the sweep runs in one process")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (MODEL.WEIGHTS ...)")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_gpus != 1 or world_size != 1:
        what = f"--num-gpus {args.num_gpus}" if args.num_gpus != 1 else f"WORLD_SIZE={world_size}"
        print(f"calibration_sweep.py: error: {what}: the sweep runs in one process (one network pass, every "
              f"setting evaluated in it); run it with one GPU", file=sys.stderr)
        return 2
    try:
        cfg = train_net.setup_cfg(argparse.Namespace(config_file=args.config_file, opts=args.opts))
        if not cfg.MODEL.WEIGHTS or ("://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS)):
            raise ConfigError(f"MODEL.WEIGHTS: checkpoint not found: {cfg.MODEL.WEIGHTS!r}")
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        prepare_dataset(dataset)
        model = train_net.Trainer.build_model(cfg, with_class_stats=False)
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
        train_net.Trainer.fill_missing_class_stats(cfg, model)
        rows = calibration_sweep(cfg, model, dataset, args.method, args.values, output_dir=args.output_dir)
    except (ConfigError, DatasetError, ValueError) as e:
        print(f"calibration_sweep.py: error: {e}", file=sys.stderr)
        return 2
    print(format_sweep_table(rows, args.method))
    best, task = best_row(rows)
    print(f"best {args.method} {'gamma' if args.method == 'norcal' else 'tau'} = {best['value']:g} "
          f"({task} AP {best[task]['AP']:.2f}, APr {best[task]['APr']:.2f}); "
          f"table and plot in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
