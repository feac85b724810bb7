#!/usr/bin/env bash
# The main job, on a fresh machine or not: set up the environment, generate the embedded
# synthetic long-tailed data if absent, train the quickstart Mask R-CNN from scratch,
# evaluate it on the synthetic val split and print the LVIS AP table.
# Extra arguments go to train_net.py (e.g. `SOLVER.MAX_ITER 100`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/tools/setup_env.sh")
cd "$ROOT"
exec "$PY" train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml "$@"
