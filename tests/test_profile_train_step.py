"""tools/profile_train_step.py: operator categories, their shares, and profiled steps."""

from types import SimpleNamespace

import pytest
import torch
from repo_scripts import load_script


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/profile_train_step.py")


def test_operators_fall_into_their_categories(tool):
    assert tool.categorize("aten::convolution_backward") == "convolution"
    assert tool.categorize("aten::mkldnn_convolution") == "convolution"
    assert tool.categorize("aten::bmm") == "matrix product"
    assert tool.categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "matrix product"
    assert tool.categorize("aten::copy_") == "copy"
    assert tool.categorize("aten::grid_sampler_2d_backward") == "grid sampling"
    assert tool.categorize("aten::topk") == "top-k / sort"
    assert tool.categorize("aten::add") == "other"
    assert tool.categorize("aten::mul") == "other"  # "::mm" must not match "::mul"


def test_shares_partition_the_self_time(tool):
    events = [
        SimpleNamespace(key="aten::mm", self_cpu_time_total=30.0),
        SimpleNamespace(key="aten::bmm", self_cpu_time_total=20.0),
        SimpleNamespace(key="aten::copy_", self_cpu_time_total=25.0),
        SimpleNamespace(key="aten::add", self_cpu_time_total=25.0),
    ]
    shares = tool.category_shares(events)
    assert shares == {"matrix product": 50.0, "copy": 25.0, "other": 25.0}
    assert list(shares)[0] == "matrix product"  # largest first


def test_profiled_steps_train_and_see_the_model_operators(tool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 1)

    class Wrapped(torch.nn.Module):  # Detectron2 models return a dict of losses
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, batch):
            return {"loss_mse": torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])}

    wrapped = Wrapped()
    before = wrapped((x, y))["loss_mse"].item()
    batches = iter([(x, y)] * 20)
    seconds, events = tool.profile_steps(
        lambda b: tool.train_step(wrapped, opt, b), batches, steps=6, warmup=4
    )
    assert seconds > 0
    assert wrapped((x, y))["loss_mse"].item() < before  # the ten steps trained the model
    shares = tool.category_shares(events)
    assert shares["convolution"] > 0 and shares["matrix product"] > 0
    assert sum(shares.values()) == pytest.approx(100.0)
    assert len(list(batches)) == 10  # 4 warm-up + 6 profiled batches of 20 drawn
