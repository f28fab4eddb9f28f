"""Helpers of ``tools/benchmark.py`` and ``tools/dry_run.py``: model configs at the paper's sizes,
Table 9 parameter counts, timing / FLOP measurement, and the dry run's inputs and checks."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
