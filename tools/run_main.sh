#!/usr/bin/env bash
# The README's main command: set-up if needed, then the synthetic referring benchmark on CPU
# (generate data if missing, train, evaluate the held-out split, save overlay pictures).
# Extra arguments go to tools/main_job.py (e.g. --iters 500, --output-dir DIR, KEY VALUE ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "${FLOWSEG_VENV:-$ROOT/.venv}/bin/python" tools/main_job.py "$@"
