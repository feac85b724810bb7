#!/usr/bin/env bash
# The test suite, on a fresh machine or not: sets up the environment, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh -k synthetic`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/tools/setup_env.sh")
cd "$ROOT"
exec "$PY" -m pytest -q tests "$@"
