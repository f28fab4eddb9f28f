#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ in the repository root and installs FlowSeg with
# everything it needs, Detectron2 included. Re-running it is cheap (a stamp file records
# what was installed). Override the interpreter with PYTHON=..., the venv with FLOWSEG_VENV=...,
# and the PyTorch pair installed into a venv that has none with FLOWSEG_TORCH="torch==X torchvision==Y".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLOWSEG_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.flowseg-installed"
# A matched pair. Unpinned, pip takes the newest torch with several GB of CUDA libraries, which
# filled the disk of a CI machine; a local CPU build of 2.13.0 (pip's find-links) wins when present.
TORCH_SPEC="${FLOWSEG_TORCH:-torch==2.13.0 torchvision==0.28.0}"
MIN_FREE_MB="${FLOWSEG_MIN_FREE_MB:-2000}"

want="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import detectron2, flowseg" 2>/dev/null; then
  exit 0
fi

die() { echo "[setup] ERROR: $*" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  free_mb="$(df -Pm "$(dirname "$VENV")" | awk 'NR==2 {print $4}')"
  [ "$free_mb" -ge "$MIN_FREE_MB" ] || die "only ${free_mb} MB free at $(dirname "$VENV"); a new environment needs about ${MIN_FREE_MB} MB (FLOWSEG_MIN_FREE_MB=... to override)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# pip, with its "Location ... is ignored" noise (index folders in this machine's pip.conf)
# filtered out; a failure stops the script here instead of surfacing later as an import error.
pip_() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir "$@" >"$tmp/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$tmp/pip.log" >&2 || true
    die "pip $* failed (output above)"
  fi
  grep -v "^WARNING: Location" "$tmp/pip.log" >&2 || true
}

echo "[setup] creating/updating virtual environment at $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_ install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
  pip_ install -q $TORCH_SPEC
fi
pip_ install -q -r "$ROOT/requirements.txt"

# repack_pure <requirement> <pip download flags...>: installs the wheel of <requirement> with its
# compiled extensions dropped and re-tagged as pure Python; the function named by $PATCH_FN (if
# set) runs in the unpacked package folder first.
repack_pure() {
  local req="$1"; shift
  rm -rf "$tmp/dl" "$tmp/unpacked" "$tmp/packed"
  pip_ download -q --no-deps --only-binary=:all: "$@" "$req" -d "$tmp/dl"
  "$VENV/bin/python" -m wheel unpack -d "$tmp/unpacked" "$tmp"/dl/*.whl >&2
  local pkgdir; pkgdir="$(ls -d "$tmp"/unpacked/*/)"
  find "$pkgdir" \( -name '*.so' -o -name '*.so.*' \) -delete
  (cd "$pkgdir" && "${PATCH_FN:-true}")
  sed -i -E 's/^Tag: .*/Tag: py3-none-any/; s/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$pkgdir"/*.dist-info/WHEEL
  mkdir -p "$tmp/packed"
  "$VENV/bin/python" -m wheel pack -d "$tmp/packed" "$pkgdir" >&2
  pip_ install -q --no-deps --force-reinstall "$tmp"/packed/*.whl
}

if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null \
    && "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  # PyPI's torchvision wheels are CUDA builds: next to a CPU-only torch their C++ ops cannot load,
  # and torchvision then fails at import (its fake-tensor registration of nms is not guarded).
  # FlowSeg uses none of those ops: install the Python part, with that registration guarded.
  tv="$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torchvision'))")"
  echo "[setup] CPU-only torch: installing the Python part of torchvision==$tv" >&2
  guard_fake_registrations() {
    sed -i -E 's/^@torch\.library\.register_fake\((.*)\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' \
        torchvision/_meta_registrations.py
  }
  PATCH_FN=guard_fake_registrations repack_pure "torchvision==$tv"
  "$VENV/bin/python" -c "import torchvision" || die "torchvision==$tv still does not import next to a CPU-only torch"
fi

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  # Detectron2's Python sources from the `sal-detectron2` wheel: FlowSeg needs none of its
  # compiled ops, so the CPython-3.10 extension is dropped.
  echo "[setup] installing Detectron2 (Python sources of sal-detectron2==0.7.2)" >&2
  repack_pure sal-detectron2==0.7.2 --python-version 3.10
fi

# The web demo's browser test drives Debian's Chromium; where apt-get is missing (or not root)
# the rest still installs and that test skips, naming what is missing.
if ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium and chromium-driver (browser test of demo/app.py)" >&2
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
        >"$tmp/apt.log" 2>&1; then
      tail -n 5 "$tmp/apt.log" >&2
      echo "[setup] chromium not installed: the browser test will skip" >&2
    fi
  else
    echo "[setup] no apt-get as root: chromium not installed, the browser test will skip" >&2
  fi
fi

pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import detectron2, flowseg" >&2
echo "$want" > "$STAMP"
echo "[setup] done: $VENV ($(du -sm "$VENV" | cut -f1) MB)" >&2
