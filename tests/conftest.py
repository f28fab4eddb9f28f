import os

import torch

# Two cores here: keep intra-op threads low so the suite's timing stays predictable.
torch.set_num_threads(int(os.environ.get("FLOWSEG_TEST_THREADS", "2")))
