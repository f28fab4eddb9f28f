"""LLaVA-style conversation data (FlowSeg stage 2: projector alignment with the LM loss; stage 3 mix).

On disk (``$DETECTRON2_DATASETS``, default ``./datasets``)::

    llava/llava_instruct_150k.json       # LLaVA-Instruct-150K
    coco/train2017/000000XXXXXX.jpg      # its images (COCO train2017)

The json is a list of samples::

    {"id": "000000033471", "image": "000000033471.jpg",          # "image" optional (text-only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
                       {"from": "gpt", "value": "The ..."}, ...]}

Turns alternate human/gpt, starting with human and ending with gpt. ``"user"``/``"assistant"``
(the OpenAI role names some re-exports use) are accepted and normalised to human/gpt.
Image sizes are not read here (a 150k-image header scan would make registration slow); the
mapper reads them with the image.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

logger = logging.getLogger(__name__)

__all__ = [
    "CONVERSATION_EVALUATOR_TYPE",
    "IMAGE_PLACEHOLDER",
    "SCENE_CONVERSATIONS_DIR",
    "load_llava_conversations",
    "register_llava_dataset",
    "register_all_llava",
    "validate_conversation",
]

#: ``evaluator_type`` of conversation datasets; the mixed loader maps it to the "conversation" mapper.
CONVERSATION_EVALUATOR_TYPE = "conversation"
IMAGE_PLACEHOLDER = "<image>"

# Role aliases -> LLaVA's names (the condition head's prompt builder expects "human"/"gpt").
_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

#: Folder (under the data root) of the conversations written about referring data sets' scenes.
SCENE_CONVERSATIONS_DIR = "scene_conversations"
# name -> (json relative to the root, image folder relative to the root)
_PREDEFINED_LLAVA = {
    "llava_instruct_150k": ("llava/llava_instruct_150k.json", "coco/train2017"),
}


def validate_conversation(conversations: Any, where: str) -> List[Dict[str, str]]:
    """Check a LLaVA ``conversations`` list and return it with normalised roles.

    ``where`` names the file and the sample in error messages. Raises ``ValueError`` unless the
    list is non-empty, alternates human/gpt starting with human and ending with gpt, every
    ``value`` is a non-empty string and no question holds ``<SEG>``.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(
            f"{where}: has no 'conversations' (expected a non-empty list of "
            "{'from': 'human'|'gpt', 'value': str} turns)"
        )
    turns: List[Dict[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(
                f"{where}: turn {i} is a {type(turn).__name__}, expected a dict with 'from' and 'value'"
            )
        role = _ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(
                f"{where}: turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                "(turns must alternate human/gpt, starting with human)"
            )
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: turn {i} ({role}) has an empty or missing 'value'")
        if role == "human":
            _check_question(value, i, where)
        turns.append({"from": role, "value": value})
    if len(turns) % 2:
        raise ValueError(
            f"{where}: the last turn is from 'human' with no 'gpt' answer "
            "(turns must alternate human/gpt and end with gpt)"
        )
    return turns


def _check_question(value: str, index: int, where: str) -> None:
    from ...modeling.language.tokens import check_user_text  # local: data must not load modeling

    try:  # LLaVA's <image> placeholders are the data format's (the mapper removes them)
        check_user_text(value.replace(IMAGE_PLACEHOLDER, ""), f"turn {index} (human)")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _read_json_list(json_file: str) -> List[Any]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"LLaVA conversations: json file not found: {json_file} "
            "(expected a list of {'id', 'image', 'conversations'} samples)"
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"LLaVA conversations: {json_file} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(
            f"LLaVA conversations: {json_file} must hold a list of samples, got {type(data).__name__}"
        )
    return data


def load_llava_conversations(
    json_file: str, image_root: str, *, check_images: bool = True
) -> List[Dict[str, Any]]:
    """Load a LLaVA conversation json as Detectron2 dataset dicts.

    Args:
        json_file: the LLaVA json (list of samples, see the module docstring).
        image_root: folder the samples' ``"image"`` paths are relative to.
        check_images: fail at load time (naming the file and sample id) if an image is missing;
            one ``stat`` per sample, cheap next to a training run.

    Returns:
        dicts ``{"file_name", "image_id", "task": "conversation", "has_image", "conversations"}``;
        ``file_name`` is ``None`` for text-only samples. ``image_id`` is the sample's ``id``
        (LLaVA-Instruct repeats ids: one COCO image has several conversations).
    """
    data = _read_json_list(json_file)
    if any(isinstance(s, dict) and s.get("image") for s in data) and not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"LLaVA conversations: image folder not found: {image_root} (images of {json_file})"
        )
    dataset_dicts: List[Dict[str, Any]] = []
    for index, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise ValueError(
                f"LLaVA conversations: {json_file}: entry {index} is a "
                f"{type(sample).__name__}, expected a dict"
            )
        sample_id = sample.get("id", index)
        where = f"LLaVA conversations: {json_file}: sample id={sample_id!r} (entry {index})"
        turns = validate_conversation(sample.get("conversations"), where)
        image = sample.get("image")
        file_name: Optional[str] = None
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: 'image' must be one relative path, got {image!r}")
            file_name = os.path.join(image_root, image)
            if check_images and not os.path.isfile(file_name):
                raise FileNotFoundError(f"{where}: image not found: {file_name}")
        dataset_dicts.append(
            {
                "file_name": file_name,
                "image_id": sample_id,
                "task": "conversation",
                "has_image": file_name is not None,
                "conversations": turns,
            }
        )
    if not dataset_dicts:
        raise ValueError(f"LLaVA conversations: {json_file} holds no samples")
    logger.info(
        "Loaded %d conversations (%d text-only) from %s",
        len(dataset_dicts),
        sum(not d["has_image"] for d in dataset_dicts),
        json_file,
    )
    return dataset_dicts


def register_llava_dataset(name: str, json_file: str, image_root: str, *, overwrite: bool = False) -> None:
    """Register a LLaVA conversation json as ``name``; files are read at ``DatasetCatalog.get``.

    The metadata's ``evaluator_type="conversation"`` tells the mixed-task loader to map it with
    the "conversation" mapper. ``overwrite`` replaces an existing registration of ``name``.
    """
    if overwrite and name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_llava_conversations(json_file, image_root))
    MetadataCatalog.get(name).set(
        evaluator_type=CONVERSATION_EVALUATOR_TYPE,
        json_file=json_file,
        image_root=image_root,
    )


def register_all_llava(root: str) -> List[str]:
    """Register the builtin conversation datasets under ``root`` (idempotent, nothing is read).

    Besides LLaVA-Instruct, every ``root/scene_conversations/NAME.json`` (written by
    :func:`flowseg.data.writers.scene_conversations.write_scene_conversations`, image paths
    relative to ``root``) is registered as ``NAME_conversations``.
    """
    found = dict(_PREDEFINED_LLAVA)
    scene_dir = os.path.join(root, SCENE_CONVERSATIONS_DIR)
    if os.path.isdir(scene_dir):
        for f in sorted(os.listdir(scene_dir)):
            if f.endswith(".json"):
                found[f"{f[: -len('.json')]}_conversations"] = (os.path.join(SCENE_CONVERSATIONS_DIR, f), "")
    names = []
    for name, (json_rel, image_rel) in found.items():
        if name not in DatasetCatalog.list():  # re-import (importlib.reload) must not fail
            image_root = os.path.join(root, image_rel) if image_rel else root
            register_llava_dataset(name, os.path.join(root, json_rel), image_root)
        names.append(name)
    return names


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_llava(_root)
