"""tools/ablations.py: the paired difference to the baseline and its bootstrap interval."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("ablations", os.path.join(ROOT, "tools", "ablations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
