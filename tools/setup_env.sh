#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ in the repository root and installs FlowSeg with
# everything it needs, Detectron2 included. Re-running it is cheap (a stamp file records
# what was installed). Override the interpreter with PYTHON=..., the venv with FLOWSEG_VENV=...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLOWSEG_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.flowseg-installed"

want="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import detectron2, flowseg" 2>/dev/null; then
  exit 0
fi

echo "[setup] creating/updating virtual environment at $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip >&2
"${PIP[@]}" install -q -r "$ROOT/requirements.txt" 2>&1 | grep -v "^WARNING: Location" >&2 || true

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  # Detectron2's Python sources from the `sal-detectron2` wheel: FlowSeg needs none of its
  # compiled ops, so the CPython-3.10 extension is dropped and the wheel re-tagged as pure Python.
  echo "[setup] installing Detectron2 (Python sources of sal-detectron2==0.7.2)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 \
      sal-detectron2==0.7.2 -d "$tmp/dl" >&2
  whl="$(ls "$tmp"/dl/*.whl)"
  "$VENV/bin/python" -m wheel unpack -d "$tmp/unpacked" "$whl" >&2
  pkgdir="$(ls -d "$tmp"/unpacked/*/)"
  find "$pkgdir" -name '*.so' -delete
  sed -i -E 's/^Tag: .*/Tag: py3-none-any/; s/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$pkgdir"/*.dist-info/WHEEL
  mkdir -p "$tmp/packed"
  "$VENV/bin/python" -m wheel pack -d "$tmp/packed" "$pkgdir" >&2
  "${PIP[@]}" install -q --no-deps "$tmp"/packed/*.whl >&2
fi

"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" >&2
"$VENV/bin/python" -c "import detectron2, flowseg" >&2
echo "$want" > "$STAMP"
echo "[setup] done: $VENV" >&2
