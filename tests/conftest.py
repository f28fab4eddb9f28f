import os

import torch

# Two cores here: keep intra-op threads low so the suite's timing stays predictable.
torch.set_num_threads(int(os.environ.get("FLOWSEG_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    # The paper-scale dry run takes tens of minutes per config: only when `-m` names it
    # (an `-m "not slow"` or no `-m` at all leaves it out).
    import pytest

    if "paper_scale" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="paper-scale dry run: run with -m paper_scale")
    for item in items:
        if "paper_scale" in item.keywords:
            item.add_marker(skip)
