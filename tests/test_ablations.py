"""tools/ablations.py: the paired difference to the baseline and its bootstrap interval."""

import os

import numpy as np
import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/ablations.py")


def _runs(intersections, unions):
    return [
        {k: (i, u, i / u) for k, (i, u) in enumerate(zip(ii, uu))} for ii, uu in zip(intersections, unions)
    ]


def test_identical_runs_differ_by_zero(tool):
    rng = np.random.default_rng(0)
    u = rng.integers(50, 100, size=(2, 40))
    runs = _runs(rng.integers(0, 50, size=(2, 40)), u)
    d = tool.paired_difference(runs, runs, n_boot=200)
    assert d["d_cIoU"] == 0 and d["d_cIoU_ci95"] == [0, 0] and d["d_gIoU_ci95"] == [0, 0]


def test_known_difference_and_an_interval_that_narrows_with_more_expressions(tool):
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        u = np.full((3, n), 100)
        base_i = rng.integers(20, 80, size=(3, n))
        var_i = np.clip(base_i + rng.integers(-5, 16, size=(3, n)), 0, 100)  # +5 points on average
        d = tool.paired_difference(_runs(base_i, u), _runs(var_i, u), n_boot=500)
        # equal unions: cIoU and gIoU differences are both the mean intersection gain, in points
        expected = (var_i - base_i).mean()
        assert d["d_cIoU"] == pytest.approx(expected) and d["d_gIoU"] == pytest.approx(expected)
        lo, hi = d["d_cIoU_ci95"]
        assert lo < expected < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_runs_on_different_expressions_are_refused(tool):
    a = [{1: (1, 2, 0.5)}]
    b = [{2: (1, 2, 0.5)}]
    with pytest.raises(ValueError, match="share no expression"):
        tool.paired_difference(a, b)


_WAIT_FOR = (
    "import os, sys, time\n"
    "open(sys.argv[1], 'w').write(os.environ['OMP_NUM_THREADS'])\n"
    "t = time.time()\n"
    "while not os.path.exists(sys.argv[2]):\n"
    "    time.sleep(0.05)\n"
    "    if time.time() - t > 20: sys.exit(5)\n"
)


def test_run_parallel_runs_jobs_at_once_with_a_share_of_the_cores(tool, tmp_path):
    # each job waits for the other to have started: only a parallel run can finish
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    jobs = [
        ([tool.sys.executable, "-c", _WAIT_FOR, a, b], str(tmp_path / "a.log")),
        ([tool.sys.executable, "-c", _WAIT_FOR, b, a], str(tmp_path / "b.log")),
    ]
    tool.run_parallel(jobs, 2)
    threads = str(max((os.cpu_count() or 1) // 2, 1))
    assert open(a).read() == threads and open(b).read() == threads


def test_run_parallel_stops_at_a_failure_and_names_its_log(tool, tmp_path):
    log = str(tmp_path / "bad.log")
    jobs = [([tool.sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log)]
    jobs.append(([tool.sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "slow.log")))
    with pytest.raises(SystemExit, match="exit 3.*bad.log"):
        tool.run_parallel(jobs, 2)
    assert "boom" in open(log).read()
