#!/usr/bin/env bash
# The README's test command: set up .venv/ if needed, then run the pytest suite (CPU only).
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow"` or `-k bsf`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
exec "${FLOWSEG_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
