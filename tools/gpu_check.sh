#!/usr/bin/env bash
# The project's GPU check (README: GPU check; tools/gpu_check.py says what it measures), for
# a machine with one CUDA GPU and no network, in under 8 minutes. Prepare here:
#
#   bash tools/gpu_wheels.sh                      # .whl/: Detectron2 and what the image lacks
#
# then run it there from the repository root with .whl carried, e.g. through the device tool:
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
# It installs the wheels into /tmp/site, runs tools/gpu_check.py (all sections) and the
# CUDA-marked tests, and writes gpu_check.md, gpu_check.log and pytest_cuda.log to $OUT
# (default output/gpu_check). Exit status: 0 when every row passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${OUT:-output/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
WHO=gpu_check
# shellcheck source=tools/gpu_env.sh
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
start=$(date +%s)
timeout 360 "$PY" tools/gpu_check.py --out "$OUT_DIR" "$@" >"$OUT_DIR/gpu_check.log" 2>&1
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: tools/gpu_check.py stopped at 360 s; the tables below are the sections it finished"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT_DIR/pytest_cuda.log" 2>&1
trc=$?
cat "$OUT_DIR/gpu_check.md" 2>/dev/null || tail -40 "$OUT_DIR/gpu_check.log"
echo
echo "CUDA tests (tests/test_cuda.py): $(tail -1 "$OUT_DIR/pytest_cuda.log") [rc $trc]"
echo "gpu_check: $(( $(date +%s) - start )) s, rc $rc"
[ $rc -eq 0 ] && [ $trc -eq 0 ]
