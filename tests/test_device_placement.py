"""GPU readiness on the CPU: inside FlowSeg's forward (a training step and inference of the tiny
paper scaffold) every tensor factory call either names its device or is one of a few known calls
of Detectron2, peft and the matcher. A tensor created without ``device=`` lands on the CPU while
the model runs on the GPU: a device-mismatch error or a silent host copy per step."""

from __future__ import annotations

import inspect
import os
from typing import List, Tuple

import detectron2
import flowseg
import pytest
import torch
from detectron2.modeling import build_model
from flowseg.utils.tiny_models import make_tiny_llm_dir
from paper_scaffold import paper_scaffold_cfg, referring_batch
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.arange, torch.as_tensor, torch.empty, torch.eye, torch.full, torch.linspace, torch.ones, torch.rand,
    torch.randint, torch.randn, torch.randperm, torch.scalar_tensor, torch.tensor, torch.zeros,
}  # fmt: skip
TORCH_DIR = os.path.dirname(torch.__file__)
FLOWSEG_DIR = os.path.dirname(flowseg.__file__)
DETECTRON2_DIR = os.path.dirname(detectron2.__file__)

#: (file relative to its package, function) of calls known to create host tensors on purpose
ALLOWED = {
    # Hungarian matching runs on the CPU (scipy), as in Mask2Former: its indices are CPU tensors
    ("flowseg", "modeling/matcher.py", "forward"),
    # Detectron2: ImageList's padding sizes, boxes of empty masks, ViT relative positions
    ("detectron2", "layers/wrappers.py", "shapes_to_tensor"),
    ("detectron2", "structures/masks.py", "get_bounding_boxes"),
    ("detectron2", "modeling/backbone/utils.py", "get_rel_pos"),
}


class FactoryCallRecorder(TorchFunctionMode):
    """Records ``(package, file, function, factory)`` of every factory call without ``device=``,
    attributed to the innermost caller outside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[str, str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            if not (func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor)):
                self.calls.append((*_caller(), func.__name__))
        return func(*args, **kwargs)


def _caller() -> Tuple[str, str, str]:
    for frame in inspect.stack(context=0)[2:]:
        path = os.path.abspath(frame.filename)
        if path.startswith(TORCH_DIR) or path == os.path.abspath(__file__):
            continue
        for package, root in (("flowseg", FLOWSEG_DIR), ("detectron2", DETECTRON2_DIR)):
            if path.startswith(root + os.sep):
                return package, os.path.relpath(path, root), frame.function
        site = path.split("site-packages" + os.sep)
        return (site[1].split(os.sep)[0] if len(site) > 1 else "other"), path, frame.function
    return "other", "?", "?"


def offending(calls: List[Tuple[str, str, str, str]]) -> List[Tuple[str, str, str, str]]:
    """The project's own factory calls without a device, and any unknown Detectron2 one."""
    return sorted({c for c in calls if c[0] in ("flowseg", "detectron2") and c[:3] not in ALLOWED})


@pytest.fixture(scope="module")
def model_and_cfg(tmp_path_factory):
    llm = make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))
    cfg = paper_scaffold_cfg(llm, lora=True)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_forward_creates_no_host_tensor_in_the_project_code(model_and_cfg):
    model, _ = model_and_cfg
    batch = referring_batch()
    recorder = FactoryCallRecorder()
    model.train()
    with recorder:
        losses = model(batch)
    sum(losses.values()).backward()
    model.eval()
    with recorder, torch.no_grad():
        out = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    assert out[0]["ref_seg"]["mask"].shape == (96, 128)
    assert len(recorder.calls) > 0  # the allowed calls were seen: the recorder watches the forward
    bad = offending(recorder.calls)
    assert not bad, "tensor factory calls without device= inside the forward: " + "; ".join(
        f"{pkg}/{path}:{func} torch.{factory}" for pkg, path, func, factory in bad
    )
