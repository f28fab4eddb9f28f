"""Dataset mapper for LLaVA-style conversation samples (stage 2 alignment, stage 3 mix).

Output (for the LLM condition head)::

    image         uint8 [3, h, w] tensor in INPUT.FORMAT, long side resized to INPUT.IMAGE_SIZE
                  (a blank 32x32 image for text-only samples, with has_image=False)
    height, width size of the image as read (32, 32 for text-only samples)
    task          "conversation"
    expression    the first human turn, "<image>" placeholder removed
    answer        the first gpt turn
    conversations the kept turns (human turns without the placeholder)
    has_image     False for text-only samples

Multi-turn samples: by default (``max_turns=1``, config ``INPUT.CONVERSATION_MAX_TURNS``) only
the first human/gpt pair is kept, in ``conversations`` too. The condition head trains on one
prompt/answer pair per sample (the same shape as the segmentation tasks), and the head's prompt
builder uses *every* turn in ``conversations`` when present, so trimming has to happen here.
``max_turns <= 0`` keeps every turn (multi-turn LM loss); ``expression``/``answer`` stay the
first pair either way.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import configurable

from ..build import MAPPER_REGISTRY
from ..datasets.conversation import IMAGE_PLACEHOLDER, validate_conversation
from ..image_io import read_image
from .long_side import resize_long_side

__all__ = ["ConversationDatasetMapper", "strip_image_placeholder", "TEXT_ONLY_IMAGE_SIZE"]

logger = logging.getLogger(__name__)

#: Side of the blank image given to text-only samples (the batch stays image + text for the head).
TEXT_ONLY_IMAGE_SIZE = 32


def strip_image_placeholder(text: str) -> str:
    """``text`` without LLaVA's ``<image>`` placeholder (the head inserts its own) and outer blanks."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


class ConversationDatasetMapper:
    """Map a LLaVA conversation dataset dict (see :mod:`flowseg.data.datasets.conversation`).

    See the module docstring for the output keys and the multi-turn policy. No random
    augmentation: answers describe the image (left/right, colours), so flips or colour jitter
    could make them wrong.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        image_format: str,
        image_size: int,
        max_turns: int = 1,
    ) -> None:
        self.is_train = is_train
        self.image_format = image_format
        self.image_size = int(image_size)
        self.max_turns = int(max_turns)
        logger.info(
            "ConversationDatasetMapper(train=%s): long side -> %d, max turns: %s",
            is_train,
            self.image_size,
            self.max_turns if self.max_turns > 0 else "all",
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            # Optional key (flowseg.config may not define it): 1 = first turn pair only.
            "max_turns": cfg.INPUT.get("CONVERSATION_MAX_TURNS", 1),
        }

    def _read_image(self, file_name: str, where: str) -> Tuple[np.ndarray, int, int]:
        """(resized image, original height, original width)."""
        try:
            image = read_image(file_name, format=self.image_format)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: image not found: {file_name}") from e
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{where}: cannot read image {file_name}: {e}") from e
        height, width = image.shape[:2]
        return resize_long_side(image, self.image_size), height, width

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        out = copy.deepcopy(dataset_dict)  # the dataset owns its dicts; don't modify them
        file_name = out.get("file_name")
        where = f"conversation sample image_id={out.get('image_id')!r} ({file_name})"
        turns = validate_conversation(out.get("conversations"), where)
        if self.max_turns > 0:
            turns = turns[: 2 * self.max_turns]
        kept: List[Dict[str, str]] = [
            {
                "from": t["from"],
                "value": strip_image_placeholder(t["value"]) if t["from"] == "human" else t["value"],
            }
            for t in turns
        ]

        if file_name:
            image, height, width = self._read_image(file_name, where)
            out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            out["has_image"] = True
        else:
            # Text-only sample: a blank image keeps every batch element image+text; the flag lets
            # the head leave the image tokens out.
            side = TEXT_ONLY_IMAGE_SIZE
            out["image"] = torch.zeros((3, side, side), dtype=torch.uint8)
            height = width = side
            out["has_image"] = False
        out["height"], out["width"] = height, width
        out["task"] = "conversation"
        out["expression"] = kept[0]["value"]
        out["answer"] = kept[1]["value"]
        out["conversations"] = kept
        return out


# A @configurable class is a factory(cfg, is_train) -> mapper, which is what the registry holds.
MAPPER_REGISTRY.register("conversation")(ConversationDatasetMapper)
