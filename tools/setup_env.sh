#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment: PyTorch, Detectron2, eqlosses_d2.
# Idempotent: a second run only checks what is there. Prints the path of the venv's python.
#
#   EQLOSSES_VENV      venv directory (default: <repo>/.venv)
#   DETECTRON2_SOURCE  what to pip-install as Detectron2 (a path or a VCS URL), overriding
#                      the default: the official repository when reachable, else PyPI's
#                      pb1-detectron2==0.6 source built without its C++ extension
#   PYTHON             interpreter for a new venv (default: python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${EQLOSSES_VENV:-$ROOT/.venv}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/eqlosses_d2
D2_REPO=https://github.com/facebookresearch/detectron2.git
log() { echo "[setup_env] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {
  local out
  if ! out=$("$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1); then
    echo "$out" >&2
    log "failed: pip install $*"
    exit 1
  fi
  echo "$out" | grep -v '^WARNING: Location' >&2 || true
}

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch 2.14.1 / torchvision 0.29.1"
  pip_install torch==2.14.1 torchvision==0.29.1
fi
# pip >= 25.3 always builds through PEP 517 (older ones fall back to `setup.py develop`
# for projects without pyproject.toml, such as Detectron2, which recent setuptools turns
# into an isolated build without torch);
# wheel+setuptools build Detectron2 and this package
"$PY" -c "import sys, pip; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (25, 3))" 2>/dev/null \
  || pip_install -U "pip>=25.3"
"$PY" -c "import wheel, setuptools" 2>/dev/null || pip_install wheel setuptools

if ! "$PY" -c "import detectron2" 2>/dev/null; then
  if [ -n "${DETECTRON2_SOURCE:-}" ]; then
    log "installing Detectron2 from $DETECTRON2_SOURCE"
    pip_install --no-build-isolation "$DETECTRON2_SOURCE"
  elif timeout 20 git ls-remote -q "$D2_REPO" HEAD >/dev/null 2>&1; then
    log "installing Detectron2 from its official repository"
    pip_install --no-build-isolation "git+$D2_REPO"
  else
    log "official Detectron2 repository unreachable: installing PyPI's pb1-detectron2==0.6 without C++ ops"
    "$PY" "$ROOT/tools/install_detectron2_v06.py" --cache "$CACHE/wheels" >&2
  fi
  "$PY" -c "import detectron2" || { log "Detectron2 did not install"; exit 1; }
fi

# lvis-api without its GUI opencv requirement (the headless build comes with the package)
"$PY" -c "import lvis" 2>/dev/null || pip_install --no-deps lvis==0.5.3

stamp="$VENV/.eqlosses_d2-installed"
want=$(cat "$ROOT/setup.py" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$PY" -c "import eqlosses_d2" 2>/dev/null; then
  log "installing eqlosses_d2 (editable) with its test requirements"
  pip_install --no-build-isolation -e "$ROOT[test]"
  "$PY" -c "import eqlosses_d2" || { log "eqlosses_d2 does not import"; exit 1; }
  echo "$want" > "$stamp"
fi
echo "$PY"
