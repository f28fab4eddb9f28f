"""Stage-3 mixed-task loader: one task per batch, ratios, seeding, rank sharding, mapper resolution."""

from __future__ import annotations

import functools
import itertools
import json
import math
import uuid
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg.config import add_flowseg_config
from flowseg.data.datasets.conversation import register_llava_dataset
from flowseg.data.mixed import _build_mixed_train_loader, build_mixed_train_loader, resolve_task_ratios
from PIL import Image

SIZES = {"ref": 30, "pan": 50, "conv": 20}


def _tag(task: str, d: Dict[str, Any]) -> Dict[str, Any]:
    return {**d, "task": task}


def _skip_odd(task: str, d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return None if d["idx"] % 2 else {**d, "task": task}


def _register(sizes: Dict[str, int], evaluator_types: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Register in-memory datasets of {"idx", "src"} dicts; returns task -> dataset name."""
    names = {}
    for task, n in sizes.items():
        name = f"test_mixed_{task}_{uuid.uuid4().hex[:8]}"
        DatasetCatalog.register(name, lambda n=n, name=name: [{"idx": i, "src": name} for i in range(n)])
        if evaluator_types and task in evaluator_types:
            MetadataCatalog.get(name).set(evaluator_type=evaluator_types[task])
        names[task] = name
    return names


def _cfg(names: List[str], ratios=(), ims_per_batch: int = 4, seed: int = 123, workers: int = 0):
    cfg = add_flowseg_config(get_cfg())
    cfg.DATASETS.TRAIN = tuple(names)
    cfg.DATALOADER.TASK_RATIOS = list(ratios)
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SOLVER.IMS_PER_BATCH = ims_per_batch
    cfg.SEED = seed
    return cfg


@pytest.fixture(scope="module")
def datasets() -> Dict[str, str]:
    return _register(SIZES)


def _mappers(names: Dict[str, str], fn=_tag) -> Dict[str, Any]:
    return {name: functools.partial(fn, task) for task, name in names.items()}


def _batches(cfg, mappers, n: int, rank: int = 0, world_size: int = 1) -> List[List[Dict[str, Any]]]:
    loader = _build_mixed_train_loader(cfg, mappers, rank=rank, world_size=world_size)
    return list(itertools.islice(iter(loader), n))


def _task(batch: List[Dict[str, Any]]) -> str:
    tasks = {d["task"] for d in batch}
    assert len(tasks) == 1, f"batch mixes tasks {tasks}"
    assert len({d["src"] for d in batch}) == 1
    return tasks.pop()


def _assert_frequencies(tasks: List[str], probs: Dict[str, float]) -> None:
    n = len(tasks)
    counts = Counter(tasks)
    for task, p in probs.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[task] - n * p) <= 4 * sigma, (task, counts[task], n * p, sigma)


def test_single_task_batches_and_ratio_frequencies(datasets):
    order = ["ref", "pan", "conv"]
    cfg = _cfg([datasets[t] for t in order], ratios=[5, 3, 2])  # normalised to 0.5/0.3/0.2
    batches = _batches(cfg, _mappers(datasets), 600)
    assert all(len(b) == 4 for b in batches)
    tasks = [_task(b) for b in batches]
    _assert_frequencies(tasks, {"ref": 0.5, "pan": 0.3, "conv": 0.2})
    # each dataset's stream walks whole permutations (TrainingSampler): first epoch = every index once
    for task, n in SIZES.items():
        seen = [d["idx"] for b in batches if b[0]["task"] == task for d in b]
        assert sorted(seen[:n]) == list(range(n))
        assert all(b[0]["dataset_name"] == datasets[b[0]["task"]] for b in batches)


def test_empty_ratios_follow_dataset_sizes(datasets):
    cfg = _cfg([datasets[t] for t in SIZES], ratios=[])
    tasks = [_task(b) for b in _batches(cfg, _mappers(datasets), 600)]
    total = sum(SIZES.values())
    _assert_frequencies(tasks, {t: n / total for t, n in SIZES.items()})
    assert resolve_task_ratios([], [30, 50, 20]) == pytest.approx([0.3, 0.5, 0.2])


def test_zero_ratio_is_never_drawn(datasets):
    cfg = _cfg([datasets[t] for t in SIZES], ratios=[1, 0, 1])
    assert "pan" not in {_task(b) for b in _batches(cfg, _mappers(datasets), 100)}


def test_same_seed_same_sequence_other_seed_differs(datasets):
    names = [datasets[t] for t in SIZES]
    mappers = _mappers(datasets)
    a = _batches(_cfg(names, seed=7), mappers, 80)
    b = _batches(_cfg(names, seed=7), mappers, 80)
    c = _batches(_cfg(names, seed=8), mappers, 80)
    assert a == b  # same tasks and same samples
    assert [_task(x) for x in a] != [_task(x) for x in c]


def test_ranks_share_tasks_but_not_samples(datasets):
    names = [datasets[t] for t in SIZES]
    cfg = _cfg(names, ratios=[0.5, 0.3, 0.2], ims_per_batch=4)
    mappers = _mappers(datasets)
    r0 = _batches(cfg, mappers, 200, rank=0, world_size=2)
    r1 = _batches(cfg, mappers, 200, rank=1, world_size=2)
    assert all(len(b) == 2 for b in r0 + r1)  # IMS_PER_BATCH // world_size
    assert [_task(b) for b in r0] == [_task(b) for b in r1]
    assert any([d["idx"] for d in x] != [d["idx"] for d in y] for x, y in zip(r0, r1))
    # within the first epoch of each dataset the two ranks read disjoint halves of it
    for task, n in SIZES.items():
        s0 = [d["idx"] for b in r0 if b[0]["task"] == task for d in b][: n // 2]
        s1 = [d["idx"] for b in r1 if b[0]["task"] == task for d in b][: n // 2]
        assert len(s0) == len(s1) == n // 2
        assert not set(s0) & set(s1) and sorted(s0 + s1) == list(range(n))


def test_workers_give_the_same_stream(datasets):
    names = [datasets[t] for t in SIZES]
    mappers = _mappers(datasets)
    single = _batches(_cfg(names, workers=0), mappers, 12)
    multi = _batches(_cfg(names, workers=2), mappers, 12)
    assert single == multi


def test_skipped_samples_are_replaced_reproducibly(datasets):
    cfg = _cfg([datasets[t] for t in SIZES])
    a = _batches(cfg, _mappers(datasets, _skip_odd), 30)
    b = _batches(cfg, _mappers(datasets, _skip_odd), 30)
    assert a == b
    assert all(len(x) == 4 and all(d["idx"] % 2 == 0 for d in x) for x in a)


def test_config_errors(datasets):
    names = [datasets[t] for t in SIZES]
    mappers = _mappers(datasets)
    with pytest.raises(ValueError, match="TASK_RATIOS has 2 entries"):
        _batches(_cfg(names, ratios=[1, 1]), mappers, 1)
    with pytest.raises(ValueError, match=">= 0"):
        _batches(_cfg(names, ratios=[1, -1, 1]), mappers, 1)
    with pytest.raises(ValueError, match="sum to 0"):
        _batches(_cfg(names, ratios=[0, 0, 0]), mappers, 1)
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        _batches(_cfg(names, ims_per_batch=3), mappers, 1, rank=0, world_size=2)
    with pytest.raises(ValueError, match=names[0]):  # no evaluator_type, no mapper given
        _batches(_cfg(names), {}, 1)


def test_mappers_resolved_from_evaluator_type(tmp_path):
    """Conversation data through the registered "conversation" mapper; panoptic-typed data through a
    mapper given by mapper name, with the task filled in from the evaluator type."""
    img = tmp_path / "images" / "x.jpg"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(img)
    samples = [
        {
            "id": i,
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\nQ{i}"},
                {"from": "gpt", "value": f"A{i}"},
            ],
        }
        for i in range(6)
    ]
    (tmp_path / "llava.json").write_text(json.dumps(samples))
    conv_name = f"test_mixed_llava_{uuid.uuid4().hex[:8]}"
    register_llava_dataset(conv_name, str(tmp_path / "llava.json"), str(tmp_path / "images"))
    pan = _register({"pan": 10}, {"pan": "coco_panoptic_seg"})["pan"]

    cfg = _cfg([conv_name, pan], ratios=[1, 1], ims_per_batch=2)
    cfg.INPUT.IMAGE_SIZE = 32
    no_task = functools.partial(dict)  # a mapper that, like the panoptic one, sets no "task"
    loader = build_mixed_train_loader(cfg, mappers={"coco_panoptic_lsj": no_task})
    batches = list(itertools.islice(iter(loader), 20))
    kinds = {b[0]["task"] for b in batches}
    assert kinds == {"conversation", "generic"}
    for b in batches:
        assert len({d["task"] for d in b}) == 1
        if b[0]["task"] == "conversation":
            for d in b:
                assert tuple(d["image"].shape) == (3, 16, 32)
                assert d["expression"] == f"Q{d['image_id']}" and d["answer"] == f"A{d['image_id']}"
        else:
            assert all(d["src"] == pan and d["dataset_name"] == pan for d in b)


def test_expressions_per_image_groups_referring_data():
    """INPUT.EXPRESSIONS_PER_IMAGE = 2: referring data are read per image and each image's
    expressions come out consecutively (so the model can share the image encoding); panoptic
    batches are untouched."""
    names = _register({"ref": 12, "pan": 10}, {"ref": "refer", "pan": "coco_panoptic_seg"})
    base = DatasetCatalog.get(names["ref"])
    DatasetCatalog.remove(names["ref"])  # 12 expressions on 4 images
    DatasetCatalog.register(names["ref"], lambda: [{**d, "image_id": d["idx"] // 3} for d in base])

    def draw_two(d):  # stands in for ReferringDatasetMapper on a per-image item
        return [{**e, "task": "referring"} for e in d["expressions"][:2]]

    cfg = _cfg([names["ref"], names["pan"]], ratios=[1, 1], ims_per_batch=2)
    cfg.INPUT.EXPRESSIONS_PER_IMAGE = 2
    batches = _batches(cfg, {names["ref"]: draw_two, names["pan"]: functools.partial(_tag, "generic")}, 30)
    ref = [b for b in batches if _task(b) == "referring"]
    assert ref and all(len(b) == 2 for b in batches if _task(b) == "generic")
    for b in ref:
        assert len(b) == 4  # 2 images x 2 expressions
        assert b[0]["image_id"] == b[1]["image_id"] != b[2]["image_id"] == b[3]["image_id"]
        assert b[0]["idx"] != b[1]["idx"]
    assert {d["image_id"] for b in ref for d in b} == {0, 1, 2, 3}
