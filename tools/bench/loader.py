"""Data-loader throughput: samples per second of one worker for each paper config's training
mapper, on data written in the real on-disk formats (RefCOCO's refer layout, COCO-panoptic PNGs,
ReasonSeg's image + LabelMe json, LLaVA-format conversations)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import numpy as np

#: what is measured: (paper config, training data set) per mapper
MAPPERS = {
    "RefCOCO, packed expressions": ("configs/flowseg_refcoco.yaml", "refcoco_unc_train_dedup"),
    "COCO-panoptic, LSJ 1024²": (
        "configs/flowseg_coco_panoptic.yaml",
        "coco_2017_train_panoptic_with_sem_seg",
    ),
    "ReasonSeg": ("configs/flowseg_reasonseg.yaml", "reasonseg_train_all"),
    "conversations (LLaVA format)": ("configs/stages/stage3_joint.yaml", "refcoco_unc_train_conversations"),
}


def write_data(root: str, num_images: int, image_size: int, seed: int = 0) -> None:
    """RefCOCO and COCO-panoptic (``tools/make_variant_data.py``'s scenes) and ReasonSeg samples of
    ``image_size``² JPEGs under ``root`` in the builtin layouts (``DETECTRON2_DATASETS=root``)."""
    from flowseg.data.writers import write_reasonseg_dataset
    from make_variant_data import write_variant_data

    write_variant_data(root, num_train=num_images, num_eval=1, seed=seed, image_size=image_size)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_images):
        image = rng.integers(0, 256, (image_size, image_size * 4 // 3, 3), dtype=np.uint8)
        x0, y0 = rng.integers(10, image_size // 2, 2)
        polygon = [[x0, y0], [x0 + image_size // 3, y0], [x0 + image_size // 4, y0 + image_size // 3]]
        texts = ["Which object would keep a person dry if it started to rain?", "the umbrella"]
        samples.append(
            dict(
                name=f"reason_{i:04d}", image=image, texts=texts, is_sentence=True, target_polygons=[polygon]
            )
        )
    write_reasonseg_dataset(os.path.join(root, "reason_seg", "ReasonSeg", "train"), samples)


def samples_per_second(config_file: str, dataset: str, seconds: float, root_dir: str) -> Dict[str, Any]:
    """Map the data set's dicts in turn for about ``seconds`` in this process (one worker)."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.data.mixed import _dataset_mapper, _load_dataset_dicts

    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(os.path.join(root_dir, config_file))
    dicts = _load_dataset_dicts(cfg, dataset)
    mapper, name = _dataset_mapper(cfg, dataset, {}, {})
    mapper(dict(dicts[0]))  # first call: lazy set-up (fonts, tokenizer-free caches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        out = mapper(dict(dicts[n % len(dicts)]))
        n += 1
    elapsed = time.perf_counter() - t0
    shape = list(out["image"].shape) if isinstance(out, dict) and "image" in out else None
    return {"config": config_file, "dataset": dataset, "mapper": name, "samples": n,
            "samples_per_s": n / elapsed, "image": shape}  # fmt: skip


def workers_needed(samples_per_s: float, gpus: int, batch_per_gpu: int, step_s: float) -> int:
    """Workers (in total) to keep ``gpus`` fed at ``batch_per_gpu`` samples per ``step_s``."""
    if samples_per_s <= 0 or step_s <= 0:
        raise ValueError(f"throughput ({samples_per_s}) and step time ({step_s}) must be positive")
    return int(np.ceil(gpus * batch_per_gpu / step_s / samples_per_s))


def measure_all(seconds: float, root_dir: str) -> List[Dict[str, Any]]:
    from flowseg.data.writers.scene_conversations import write_scene_conversations

    write_scene_conversations("refcoco_unc_train", os.environ["DETECTRON2_DATASETS"])
    out = []
    for kind, (config, dataset) in MAPPERS.items():
        out.append(dict(samples_per_second(config, dataset, seconds, root_dir), kind=kind))
    return out
