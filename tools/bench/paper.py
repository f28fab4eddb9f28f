"""The dry run's set-up: the paper configs with the LLM / vision tower built from json configs (no
weights), a tokenizer trained on the prompts, the SAM-ViT depth cut, the longest sample per task."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import ROOT
from .models import QWEN3_4B, SO400M

IMAGE_SIZE = 1024
# Long ends of the data: RefCOCOg expressions run to ~50 words, ReasonSeg long queries to ~80,
# LLaVA-Instruct answers to several hundred (conversations are cut at MAX_LENGTH by design).
LONG_EXPRESSION = (
    "the woman in the dark blue jacket with a white scarf who is standing on the left side of the "
    "picture next to the man holding a red umbrella and looking down at the small brown dog sitting "
    "on the wet pavement in front of the old wooden bench near the lamp post"
)
LONG_QUERY = (
    "When people spend a whole afternoon in a park like this one and the weather suddenly turns, "
    "they usually look for something that keeps them dry without having to go back home; in this "
    "picture there are several objects that could serve that purpose, but only one of them is "
    "already open and being held above someone's head by the man who walks behind the bench. "
    "Which object in the image would protect a person from the rain right now, and why?"
)
LONG_ANSWER = " ".join([LONG_QUERY] * 12)


def _write_json(path: str, config: Any) -> str:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    return path


def model_files(workdir: str, llm_layers: int, vision_layers: int, texts: Sequence[str]) -> Dict[str, str]:
    """Qwen3-4B / SigLIP-so400m configs at their true widths (depth given) and a tokenizer."""
    from flowseg.utils.tiny_models import CHATML_TEMPLATE, make_tokenizer
    from transformers import Qwen3Config, SiglipVisionConfig

    corpus = [t for t in texts for _ in range(3)]
    tok = make_tokenizer(CHATML_TEMPLATE, vocab_size=6000, corpus=corpus)
    files = {"tokenizer": os.path.join(workdir, "tokenizer")}
    tok.save_pretrained(files["tokenizer"])
    llm = Qwen3Config(**dict(QWEN3_4B, num_hidden_layers=llm_layers or QWEN3_4B["num_hidden_layers"]))
    vision = SiglipVisionConfig(
        **dict(SO400M, num_hidden_layers=vision_layers or SO400M["num_hidden_layers"]),
        image_size=384,
        patch_size=14,
    )
    files["llm_config"] = _write_json(os.path.join(workdir, f"llm_{llm_layers}.json"), llm)
    files["vision_config"] = _write_json(os.path.join(workdir, f"vision_{vision_layers}.json"), vision)
    return files


def _cut_indexes(values: Sequence[int], depth: int, full: int) -> List[int]:
    # block i of `full` -> the block at the same relative depth of `depth` (order kept)
    return [max(0, min(depth - 1, (int(v) + 1) * depth // full - 1)) for v in values]


def cut_sam_depth(cfg: Any, depth: int) -> None:
    """Cut the SAM-ViT to ``depth`` blocks: ``MODEL.SAM_VIT.DEPTH``, the last block global, and every
    other list of block indexes under ``MODEL.SAM_VIT`` (the connector's 1-indexed blocks too)
    moved to the same relative depth."""
    from flowseg.modeling.backbone.sam_vit import SAM_VIT_PRESETS

    c = cfg.MODEL.SAM_VIT
    full = c.DEPTH or SAM_VIT_PRESETS[c.PRESET]["depth"]
    if depth <= 0 or depth >= full:
        return
    for key, value in c.items():
        if key != "GLOBAL_ATTN_INDEXES" and key.endswith(("INDEXES", "INDICES")) and value:
            c[key] = _cut_indexes(value, depth, full)
    if c.CONNECTOR.LAYERS:
        c.CONNECTOR.LAYERS = [i + 1 for i in _cut_indexes([v - 1 for v in c.CONNECTOR.LAYERS], depth, full)]
    c.DEPTH = depth
    c.GLOBAL_ATTN_INDEXES = [depth - 1]


def paper_cfg(config_file: str, files: Dict[str, str], device: str = "cpu", sam_depth: int = 0) -> Any:
    """The config of ``config_file`` with the LLM / vision tower built from ``files`` (no weight
    file is read: MODEL.WEIGHTS and the SAM checkpoint are emptied), on ``device``."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.config import llm_configured

    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, config_file))
    opts: List[Any] = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.SAM_VIT.CHECKPOINT", ""]
    if llm_configured(cfg):
        opts += ["MODEL.LLM.PATH", "", "MODEL.LLM.CONFIG", files["llm_config"]]
        opts += ["MODEL.LLM.TOKENIZER_PATH", files["tokenizer"]]
        opts += ["MODEL.VANILLA_ENCODER.PATH", "", "MODEL.VANILLA_ENCODER.CONFIG", files["vision_config"]]
        # so400m-patch14-384 reads 27x27 patches (the stride-14 conv drops 6 px): 378 gives its 729 tokens
        opts += ["MODEL.VANILLA_ENCODER.IMAGE_SIZE", 378]
    cfg.merge_from_list(opts)
    cut_sam_depth(cfg, sam_depth)
    return cfg


# ----------------------------------------------------------------------------------- inputs
def _tasks(cfg: Any) -> Dict[str, str]:
    """task -> one data set of the config that has it (training sets first, then test sets)."""
    from detectron2.data import MetadataCatalog
    from flowseg.data.mixed import EVALUATOR_TYPE_TO_TASK

    out: Dict[str, str] = {}
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        task = EVALUATOR_TYPE_TO_TASK.get(MetadataCatalog.get(name).get("evaluator_type", None))
        if task is not None:
            out.setdefault(task, name)
    if cfg.MODEL.FLOWSEG.MODE == "referring":
        out.setdefault("referring", "")  # a referring model is always asked referring questions
    return out


def class_names(dataset_name: str) -> List[str]:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    return list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])


def task_samples(cfg: Any, image: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, Any]]:
    """The longest sample of each task of ``cfg`` (model input dicts without ``instances``)."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8) if image is None else image
    base = {"image": image, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "image_id": 0}
    samples: Dict[str, Dict[str, Any]] = {}
    for task, dataset in _tasks(cfg).items():
        x: Dict[str, Any] = dict(base, task=task)
        if task == "generic":
            x.update(dataset_name=dataset, class_names=class_names(dataset))
        elif task == "referring":
            x.update(expression=LONG_EXPRESSION)
        elif task == "reasoning":
            x.update(expression=LONG_QUERY)
        elif task == "conversation":
            x["conversations"] = [
                {"from": "human", "value": LONG_QUERY},
                {"from": "gpt", "value": LONG_ANSWER},
            ]
        samples[task] = x
    return samples


def corpus_texts() -> List[str]:
    """What the dry-run tokenizer is trained on: every prompt text it will see."""
    from detectron2.data import MetadataCatalog

    names = sorted({n for d in MetadataCatalog.list() if "panoptic" in d for n in class_names(d)})
    # names as they appear in a class-list prompt: right after "<p>", no leading space
    return [LONG_EXPRESSION, LONG_QUERY, " ".join(names), *names, "Sure, it is the segmentation mask."]


# One config per distinct model and training set-up (RefCOCO+ / g train RefCOCO's model): the
# configs that the memory plan and the GPU acceptance run cover.
MODEL_CONFIGS = [
    "configs/flowseg_refcoco.yaml",
    "configs/flowseg_reasonseg.yaml",
    "configs/flowseg_coco_panoptic.yaml",
    "configs/stages/stage1_segmentor.yaml",
    "configs/stages/stage2_projectors.yaml",
    "configs/stages/stage3_joint.yaml",
    "configs/stages/stage3_joint_xsam.yaml",
]
