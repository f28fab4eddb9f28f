"""Which inputs of a batch show the same image (shared image encoding).

Referring data have several expressions per image. When consecutive inputs show the same image
(training with ``INPUT.EXPRESSIONS_PER_IMAGE > 1``, or evaluation grouped by image), everything
that depends on the image only — SAM-ViT, the pixel decoder — runs once per image and its output
is indexed out to the expressions (:meth:`FlowSeg.run_head`, ``image_index``).
"""

from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch
from detectron2.structures import ImageList

__all__ = [
    "expand_image_list",
    "group_consecutive_inputs",
    "image_index_of_groups",
    "image_key",
    "same_image",
]


def image_key(d: Dict[str, Any]) -> Optional[Hashable]:
    """What identifies a sample's image: ``image_id``, else ``file_name`` (None if neither)."""
    key = d.get("image_id")
    return d.get("file_name") if key is None else key


def same_image(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two model inputs carry the same image tensor (same content, not just the same file)."""
    ka, kb = image_key(a), image_key(b)
    if ka is not None and kb is not None and ka != kb:
        return False
    ia, ib = a["image"], b["image"]
    if ia is ib:
        return True
    # The key alone is not enough: a mapper could transform the image per sample (e.g. a flip);
    # comparing the uint8 tensors costs microseconds next to the encoders.
    return ia.shape == ib.shape and ia.dtype == ib.dtype and torch.equal(ia, ib)


def group_consecutive_inputs(batched_inputs: Sequence[Dict[str, Any]]) -> List[List[int]]:
    """Indices of ``batched_inputs`` in runs of consecutive inputs that show the same image."""
    groups: List[List[int]] = []
    for i, x in enumerate(batched_inputs):
        if groups and same_image(batched_inputs[groups[-1][0]], x):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def image_index_of_groups(groups: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """For each input (in order), the index of its group: the row of its image in the batch of
    unique images."""
    return torch.tensor([g for g, members in enumerate(groups) for _ in members], device=device)


def expand_image_list(images: ImageList, index: torch.Tensor) -> ImageList:
    """The ImageList of the unique images -> one entry per input (``index`` from
    :func:`image_index_of_groups`)."""
    sizes = [images.image_sizes[i] for i in index.tolist()]
    return ImageList(images.tensor.index_select(0, index), sizes)
