"""CPU peak-memory measurement (:mod:`flowseg.utils.memory`) sees a known allocation."""

import numpy as np
import pytest
import torch
from flowseg.utils.memory import PeakRSS, peak_rss_bytes, rss_bytes


def test_peak_rss_sees_a_freed_allocation():
    with PeakRSS() as m:
        a = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, written, then freed
        del a
    if not m.exact:
        pytest.skip("the kernel does not allow resetting the peak RSS here")
    assert 180e6 < m.extra < 400e6, m.extra
    assert rss_bytes() < m.peak <= peak_rss_bytes()


def test_peak_rss_is_per_block():
    with PeakRSS() as big:
        a = np.ones(25_000_000)  # 200 MB
        del a
    with PeakRSS() as small:
        b = np.ones(1_000_000)  # 8 MB
        del b
    if not (big.exact and small.exact):
        pytest.skip("the kernel does not allow resetting the peak RSS here")
    assert small.extra < 50e6 < 150e6 < big.extra
