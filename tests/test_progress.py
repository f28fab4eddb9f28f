"""flowseg.utils.progress: the overall ETA of a multi-stage job and its saved progress lines."""

import json
import subprocess
import sys

import pytest
from flowseg.utils.progress import JobProgress, last_iteration


def test_overall_eta_from_measured_seconds_per_iteration():
    p = JobProgress({"stage1": 100, "stage2": 0, "stage3": 50})
    assert p.eta_seconds() is None and "after the first logged iterations" in p.eta_text()
    p.update("stage1", 19, now=140.0, stage_start=100.0, first_it=0)  # 20 iterations in 40 s
    assert p.rate == 2.0 and p.eta_seconds() == 2.0 * (80 + 50)
    p.finish("stage1")
    p.update("stage3", 29, now=200.0, stage_start=190.0, first_it=20)  # resumed at 20: 10 it in 10 s
    assert p.eta_seconds() == 1.0 * 20
    assert "0.3 min of training (1.00 s/it" in p.eta_text()


_CHILD = """
import json, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"iteration": 99, "test/cIoU": 1}) + "\\n")  # not a training line
    for i in range(10):
        f.write(json.dumps({"iteration": i, "total_loss": 1.0}) + "\\n"); f.flush(); time.sleep(0.1)
sys.exit(int(sys.argv[2]))
"""


def test_run_stage_logs_iterations_and_eta_to_the_file(tmp_path):
    log_file = tmp_path / "job.log"
    p = JobProgress({"s1": 10, "s2": 30}, log_file=str(log_file))
    cmd = [sys.executable, "-c", _CHILD, str(tmp_path / "metrics.json"), "0"]
    p.run_stage(cmd, "s1", str(tmp_path), cwd=str(tmp_path), every=0.3)
    assert last_iteration(str(tmp_path / "metrics.json")) == 9
    assert p.done["s1"] == 10 and p.remaining_iterations() == 30
    assert 0.05 < p.rate < 1.0  # ~0.1 s per iteration plus the interpreter's start
    lines = log_file.read_text().splitlines()
    assert lines and all("s1: iteration" in x and "overall ETA" in x for x in lines)
    json.loads(json.dumps(p.plan))
    with pytest.raises(subprocess.CalledProcessError):
        p.run_stage(cmd[:-1] + ["3"], "s2", str(tmp_path / "other"), cwd=str(tmp_path), every=10)
