#!/usr/bin/env bash
# The quickstart study on one GPU (README: Results → The study with seeds): every method of
# benchmarks/train_methods.py in the standard and cascade RoI heads and the one-stage
# detectors, seeds 0 1 2, several runs side by side on the one GPU, in at most STUDY_SECONDS
# (default 500 s; runs still going then are stopped and leave no result). Runs are started seed
# by seed, so what finishes is whole seeds first. Prepare here, as for tools/gpu_check.sh:
#
#   bash tools/gpu_wheels.sh
#   run(command="bash tools/study_gpu.sh", carry=[".whl"], timeout_s=590)
#
# Writes $OUT/gpu_study.json (the runs, in benchmarks/study.py's format, with the date and the
# GPU), $OUT/study.log and the printed tables; commit gpu_study.json as
# benchmarks/results/gpu_study_<date>.json.
#
#   STUDY_JOBS     runs at a time (default 12)     STUDY_SEEDS  default "0 1 2"
#   STUDY_SECONDS  time limit of the runs          STUDY_HEADS  default "standard cascade one_stage"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${OUT:-output/study_gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
WHO=study_gpu
# shellcheck source=tools/gpu_env.sh
source tools/gpu_env.sh
"$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" \
  || { echo "study_gpu: needs a CUDA GPU" >&2; exit 1; }
# the embedded data once, before the parallel runs (each would otherwise generate it)
"$PY" -c "from eqlosses_d2.data.synthetic import ensure_synthetic_lvis; ensure_synthetic_lvis(progress=False)" \
  || { echo "study_gpu: generating the embedded data failed" >&2; exit 1; }
start=$(date +%s)
# shellcheck disable=SC2086
"$PY" benchmarks/train_methods.py --heads ${STUDY_HEADS:-standard cascade one_stage} --seeds ${STUDY_SEEDS:-0 1 2} \
  --jobs "${STUDY_JOBS:-12}" --threads 1 --time-limit "${STUDY_SECONDS:-500}" \
  --output-dir /tmp/study_runs --results "$OUT_DIR/gpu_study.json" \
  MODEL.DEVICE cuda DATALOADER.NUM_WORKERS 1 >"$OUT_DIR/study.log" 2>&1
rc=$?
grep -v -i warn "$OUT_DIR/study.log" | grep -v "^ *warnings.warn" | tail -120
echo "study_gpu: $(( $(date +%s) - start )) s, rc $rc, runs: $(grep -c '"seed"' "$OUT_DIR/gpu_study.json" 2>/dev/null || echo 0)"
