#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU machine's image lacks, for
# tools/gpu_check.sh there: that machine reaches no network and has PyTorch, torchvision,
# numpy, Pillow, matplotlib, OpenCV, SciPy, PyYAML, tqdm, tabulate, cloudpickle and
# portalocker (CPython 3.12, x86-64; /work/.library/device/KINDS.md), not Detectron2 and its
# own requirements, lvis-api, hotcoco or msgspec. Run here (where pip reaches PyPI), then carry .whl:
#
#   bash tools/gpu_wheels.sh && du -sh .whl      # a few MB; the device tool carries <= 64 MiB
#
#   PY_VERSION   the GPU machine's CPython (default 3.12)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$ROOT/.whl
PY=$(bash "$ROOT/tools/setup_env.sh")
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
quiet() { "$@" 2>&1 | grep -v '^WARNING: Location' >&2 || true; test "${PIPESTATUS[0]}" -eq 0; }
# binary wheels for the GPU machine's interpreter and platform
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  pycocotools==2.0.11 hotcoco==1.3.0 iopath==0.1.9 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8 \
  termcolor==3.3.0 lvis==0.5.3 msgspec==0.23.0
# pure-Python projects published as source only
quiet "$PY" -m pip wheel -q --no-deps -w "$DEST" fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3
# Detectron2 v0.6 as a pure-Python wheel (no C++ extension), as setup_env.sh builds it
"$PY" "$ROOT/tools/install_detectron2_v06.py" --cache "${XDG_CACHE_HOME:-$HOME/.cache}/eqlosses_d2/wheels" --wheel-to "$DEST"
ls "$DEST"
