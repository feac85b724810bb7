# Sourced by tools/gpu_check.sh and tools/study_gpu.sh (from the repository root, with PY set and
# WHO naming the caller): installs the wheels of .whl/ (tools/gpu_wheels.sh) into /tmp/site, puts
# them and the repository on PYTHONPATH, points the caches and the embedded data at /tmp, and
# checks that torch, Detectron2 and eqlosses_d2 import; exits the caller with 1 otherwise.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "$WHO: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 EQLOSSES_D2_CACHE=${EQLOSSES_D2_CACHE:-/tmp/eqlosses_d2_cache}
export EQLOSSES_D2_DATA=${EQLOSSES_D2_DATA:-/tmp/eqlosses_d2_data}
"$PY" -c "import torch, detectron2, eqlosses_d2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'detectron2', detectron2.__version__)" \
  || { echo "$WHO: the environment does not import (run tools/gpu_wheels.sh here and carry .whl)" >&2; exit 1; }
