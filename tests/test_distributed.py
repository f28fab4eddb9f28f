"""Distributed training / evaluation on CPU (gloo, two processes through Detectron2's ``launch``)
and the DDP arguments of :mod:`flowseg.engine.ddp`."""

import json
import os
import socket

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.engine.ddp import ddp_kwargs, needs_find_unused_parameters, unused_parameters
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

CONFIG = "configs/tiny/flowseg_refer_tiny.yaml"
TEST_SET = "synthref_val"
ITERS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "synthetic"
    generate_synthetic_datasets(str(data), {"train": 4, "val": 2, "test": 0}, seed=5)
    register_synthetic_datasets(str(data))
    yield {"root": root, "data": str(data), "llm": make_tiny_llm_dir(root / "llm")}
    register_synthetic_datasets()  # back to the default root for the tests that follow


def _cfg(llm_paths, *opts):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [
            *tiny_llm_cfg_overrides(llm_paths, lora=False),
            "DATASETS.TEST",
            f"('{TEST_SET}',)",
            "SOLVER.IMS_PER_BATCH",
            4,  # 2 per process
            *opts,
        ]
    )
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    # SigLIP's pooling head is never used by FlowSeg: frozen, DDP needs no find_unused_parameters.
    model.condition_head.vision_encoder.tower.head.requires_grad_(False)
    return model


def _evaluate(cfg, model, distributed: bool, output_dir=None):
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset
    from flowseg.data.build import build_test_mapper
    from flowseg.evaluation import ReferringEvaluator

    loader = build_detection_test_loader(
        DatasetCatalog.get(TEST_SET), mapper=build_test_mapper(cfg, TEST_SET)
    )
    evaluator = ReferringEvaluator(TEST_SET, output_dir=output_dir, distributed=distributed)
    return inference_on_dataset(model, loader, evaluator)


# ----------------------------------------------------------------------------------- 2 processes
def _worker(llm_paths, data_root, out_dir):
    """One of the two ``launch``-ed processes: DDP training, then distributed evaluation."""
    torch.set_num_threads(1)  # same kernels as the single-process reference below
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import create_ddp_model
    from detectron2.utils import comm
    from flowseg.data.build import build_train_mapper
    from flowseg.engine import CheckedSimpleTrainer, build_optimizer
    from flowseg.engine.shared_features import evaluate_with_shared_features
    from flowseg.evaluation import ReferringEvaluator

    assert torch.distributed.get_backend() == "gloo" and comm.get_world_size() == 2
    assert comm.get_local_size() == 2  # launch created Detectron2's local process group
    register_synthetic_datasets(data_root)
    cfg = _cfg(llm_paths)
    model = _build(cfg)
    kwargs = ddp_kwargs(cfg, model)
    assert kwargs == {"broadcast_buffers": False, "find_unused_parameters": False, "device_ids": None}
    optimizer = build_optimizer(cfg, model)
    ddp = create_ddp_model(model, **kwargs)
    loader = build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))
    trainer = CheckedSimpleTrainer(ddp, loader, optimizer)  # raises on a non-finite loss on any rank
    trainer.train(0, ITERS)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = comm.all_gather(state)
    rank = comm.get_rank()
    result = {}
    if rank == 0:
        result["losses"] = [v for v, _ in trainer.storage.history("total_loss").values()]
        result["max_rank_diff"] = max(float((states[0][k] - states[1][k]).abs().max()) for k in state)
        result["changed"] = any(not torch.equal(state[k], v) for k, v in _build(cfg).state_dict().items())
        torch.save(state, os.path.join(out_dir, "weights.pth"))
    model.eval()
    result["metrics"] = _evaluate(cfg, model, distributed=True, output_dir=os.path.join(out_dir, "eval2"))
    shared = evaluate_with_shared_features(
        cfg, model, TEST_SET, ReferringEvaluator(TEST_SET, distributed=True)
    )
    result["shared_metrics"] = shared
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    else:
        assert result["metrics"] == {} and shared == {}  # results live on the main process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_training_and_distributed_evaluation_on_cpu(setup, monkeypatch):
    from detectron2.engine import launch

    # launch picks NCCL when it sees a GPU; this test is about the CPU (gloo) path.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = setup["root"] / "ddp"
    out.mkdir()
    launch(
        _worker,
        num_gpus_per_machine=2,
        dist_url=f"tcp://127.0.0.1:{_free_port()}",
        args=(setup["llm"], setup["data"], str(out)),
    )
    with open(out / "result.json") as f:
        result = json.load(f)
    assert len(result["losses"]) == ITERS and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["max_rank_diff"] == 0.0  # DDP kept both replicas identical
    assert result["changed"]  # and the steps did update them

    # The same weights evaluated in this (single) process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(setup["llm"])
        model = _build(cfg)
        model.load_state_dict(torch.load(out / "weights.pth"))
        single = _evaluate(cfg, model.eval(), distributed=False, output_dir=str(out / "eval1"))["referring"]
    finally:
        torch.set_num_threads(threads)
    dist_metrics = result["metrics"]["referring"]
    print(f"\nDDP losses {result['losses']}; 2 processes: {dist_metrics}")
    # Per expression (IoU counts, selected query's score, oracle), gathered in dataset order.
    records = [json.loads((out / d / "per_expression.json").read_text()) for d in ("eval1", "eval2")]
    assert len(records[0]) == len(records[1]) == single["num_samples"]
    assert len({r["score"] for r in records[0]}) > 1  # not a degenerate model
    for a, b in zip(*records):
        assert a.keys() == b.keys() and (a["image_id"], a["sentence_id"]) == (b["image_id"], b["sentence_id"])
        for key, value in a.items():
            if isinstance(value, float):
                assert abs(b[key] - value) <= 1e-9, (key, a, b)
            else:
                assert b[key] == value, (key, a, b)
    assert single["num_samples"] == len(DatasetCatalog.get(TEST_SET)) == dist_metrics["num_samples"]
    assert set(single) == set(dist_metrics)
    for key, value in single.items():
        assert abs(dist_metrics[key] - value) <= 1e-9, (key, dist_metrics[key], value)
    # shared image features, sharded by image over the two processes: same numbers up to the
    # float reduction order of a batched decoder (tests/test_shared_features.py)
    shared = result["shared_metrics"]["referring"]
    assert shared["num_samples"] == single["num_samples"]
    for key, value in single.items():
        assert abs(shared[key] - value) < 0.05, (key, shared[key], value)


# ----------------------------------------------------------------------------------- DDP arguments
def test_ddp_kwargs_and_unused_parameters(setup):
    from flowseg.data.build import build_train_mapper

    cfg = _cfg(setup["llm"])
    torch.manual_seed(0)
    model = build_model(cfg)
    mapper = build_train_mapper(cfg)
    dicts = DatasetCatalog.get("synthref_train")
    batch = [mapper(dicts[0]), mapper(dicts[-1])]
    head = model.condition_head.vision_encoder.tower.head
    if any(p.requires_grad for p in head.parameters()):
        # VANILLA_ENCODER.FREEZE off (tiny config) and SigLIP's pooling head left trainable: it is
        # never used, so it gets no gradient and DDP needs find_unused_parameters.
        unused = unused_parameters(model, batch)
        assert unused and all(n.startswith("condition_head.vision_encoder.tower.head.") for n in unused)
        assert ddp_kwargs(cfg, model)["find_unused_parameters"] is True
        head.requires_grad_(False)
    assert unused_parameters(model, batch) == []
    assert ddp_kwargs(cfg, model) == {
        "broadcast_buffers": False,
        "find_unused_parameters": False,
        "device_ids": None,
    }
    assert ddp_kwargs(cfg, model, find_unused_parameters=True)["find_unused_parameters"] is True

    # Table 11's control: every trainable parameter still gets a gradient.
    visual = _build(_cfg(setup["llm"], "MODEL.FLOWSEG.VISUAL_CROSS_ATTN_CONTROL", True))
    assert unused_parameters(visual, batch) == []

    # A conversation data set in training: conversation-only steps leave the segmentor unused.
    MetadataCatalog.get("test_dist_llava").set(evaluator_type="conversation")
    conv = _cfg(setup["llm"], "DATASETS.TRAIN", "('synthref_train', 'test_dist_llava')")
    assert needs_find_unused_parameters(conv) and ddp_kwargs(conv, model)["find_unused_parameters"] is True


# ----------------------------------------------------------------------------------- frozen -> no_grad
class _SavedBytes:
    """Bytes autograd saves for backward inside the context."""

    def __enter__(self):
        self.bytes = 0

        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
