"""tools/setup_env.sh stops with the cause instead of failing later (a full disk once
surfaced in CI only as `No module named 'torchvision'`)."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "setup_env.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FLOWSEG_VENV": str(tmp_path / "venv"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=120)


def test_too_little_disk_stops_before_creating_the_venv(tmp_path: Path) -> None:
    out = _run(tmp_path, FLOWSEG_MIN_FREE_MB=str(10**12))
    assert out.returncode != 0
    assert "MB free at" in out.stderr and "FLOWSEG_MIN_FREE_MB" in out.stderr
    assert not (tmp_path / "venv").exists()


def test_pip_failure_stops_with_pips_output(tmp_path: Path) -> None:
    # An unresolvable PyTorch requirement, and no index: the first install after pip's own fails.
    out = _run(tmp_path, FLOWSEG_TORCH="flowseg-no-such-package==0.0.0", PIP_NO_INDEX="1")
    assert out.returncode != 0
    assert "flowseg-no-such-package" in out.stderr
    assert "[setup] ERROR: pip install" in out.stderr
    assert not (tmp_path / "venv" / ".flowseg-installed").exists()
