"""Dataset mapper for referring (RefCOCO/+/g) and reasoning (ReasonSeg) segmentation.

One sample = one image + one expression + one target mask. The image's long side is resized
to ``INPUT.IMAGE_SIZE`` (SAM's protocol; the model pads), in training and in evaluation.
Training targets are at the resized size (``instances``); evaluation ground truth stays at the
original resolution (``gt_mask``, ``ignore_mask``) because metrics are computed there.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ..build import MAPPER_REGISTRY
from ..image_io import read_image
from .grouping import group_expressions_by_image, object_keys, objects_of, split_groups_by_objects

# The mask and resize helpers stay importable from here (this module's public API).
from .long_side import long_side_resize_transform, long_side_shape, resize_long_side
from .referring_masks import IGNORE_LABEL, gt_masks_from_dict, rasterize_segmentation, reasonseg_masks

__all__ = [
    "ReferringDatasetMapper",
    "group_expressions_by_image",
    "split_groups_by_objects",
    "rasterize_segmentation",
    "reasonseg_masks",
    "gt_masks_from_dict",
    "swap_left_right",
    "long_side_shape",
    "long_side_resize_transform",
    "resize_long_side",
]

logger = logging.getLogger(__name__)

# Keys whose content the mapper turns into masks; they are not passed on to the model.
_ANNOTATION_KEYS = ("segmentation", "segmentations", "target_polygons", "ignore_polygons")


_LR_PATTERN = re.compile(r"\b(left|right)(most|ward|wards|hand|side)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap 'left' and 'right' (also 'leftmost', 'right-hand' ...) keeping the letter case."""

    def repl(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LR_PATTERN.sub(repl, text)


def _sample_id(d: Dict[str, Any]) -> str:
    ids = [f"{k}={d[k]}" for k in ("image_id", "ref_id", "ann_id", "sent_id", "query_index") if k in d]
    return f"{d.get('file_name')} ({', '.join(ids)})"


class ReferringDatasetMapper:
    """Map a referring / reasoning dataset dict to the model input.

    Output keys: ``image`` (uint8 CHW tensor, long side = image_size), ``height``/``width``
    (original), ``expression``, ``task``, ``is_sentence``, the ids of the input dict, and
    * training: ``instances`` with ``gt_classes=[0]`` (the target is condition 0),
      ``gt_masks`` (bool [1, h, w] at the resized size) and ``gt_boxes``;
    * evaluation: ``gt_mask`` (HxW uint8 at the original resolution) and ``ignore_mask``
      (HxW bool: ReasonSeg "ignore" pixels, all False for RefCOCO).

    A per-image dict of :func:`group_expressions_by_image` (training with
    ``expressions_per_image`` > 1) gives a LIST of such outputs: ``expressions_per_image`` of the
    image's expressions drawn without replacement (all of them if it has fewer), one image tensor
    and one augmentation shared by all (the model encodes the image once for them).

    With ``pack_expressions`` (training) it gives ONE output instead: k ~ uniform{1, …,
    ``expressions_per_image``} expressions of k different objects in one prompt
    (``expressions``: one ``<p>`` span each), ``instances`` with ``gt_classes = 0..k-1`` (target
    j is condition j) — one decoder pass supervises k expressions, contrasted with each other.
    No object is referred by two packed expressions.

    gRefCOCO dicts (``segmentations``: one per target) give, in training, one instance per target
    object, all labelled with the expression's condition, and none for a no-target expression;
    in evaluation ``gt_mask`` is the union of the targets (empty for no target).

    With ``pack_mode="all_objects"`` (X-SAM) it packs every object of the group instead, in order,
    one randomly drawn expression each (groups are cut to at most K objects by
    :func:`split_groups_by_objects`).

    With ``random_prompts`` (training, ``MODEL.LLM.PROMPT_STYLE = "xsam"``) each output carries a
    ``prompt_seed`` from which the condition head picks X-SAM's question and answer.

    Training follows LISA for ignore regions: they count as background.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        image_format: str,
        image_size: int,
        random_flip: bool = False,
        flip_prob: float = 0.5,
        expressions_per_image: int = 1,
        pack_expressions: bool = False,
        pack_mode: str = "random",
        random_prompts: bool = False,
    ):
        self.is_train = is_train
        self.image_format = image_format
        self.image_size = int(image_size)
        # Flipping changes what "left"/"right" refer to; the expression is rewritten when it happens.
        self.random_flip = bool(random_flip) and is_train
        self.flip_prob = float(flip_prob)
        if int(expressions_per_image) < 1:
            raise ValueError(f"INPUT.EXPRESSIONS_PER_IMAGE must be >= 1, got {expressions_per_image}")
        self.expressions_per_image = int(expressions_per_image)
        self.pack_expressions = bool(pack_expressions) and is_train
        if self.pack_expressions and self.expressions_per_image < 2:
            raise ValueError(
                "INPUT.PACK_EXPRESSIONS packs up to INPUT.EXPRESSIONS_PER_IMAGE expressions per prompt: "
                f"set EXPRESSIONS_PER_IMAGE > 1 (it is {self.expressions_per_image})"
            )
        if pack_mode not in ("random", "all_objects"):
            raise ValueError(f"INPUT.PACK_MODE must be 'random' or 'all_objects', got {pack_mode!r}")
        self.pack_mode = pack_mode
        # training with X-SAM's prompts: each sample carries a "prompt_seed" drawn here (the
        # data-loader RNG is seeded) from which the condition head picks its question and answer
        self.random_prompts = bool(random_prompts) and is_train
        logger.info(
            "ReferringDatasetMapper(train=%s): long side -> %d, random flip: %s, expressions per image: %d",
            is_train,
            self.image_size,
            self.random_flip,
            self.expressions_per_image,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "random_flip": cfg.INPUT.REFER_RANDOM_FLIP,
            "expressions_per_image": cfg.INPUT.EXPRESSIONS_PER_IMAGE if is_train else 1,
            "pack_expressions": cfg.INPUT.PACK_EXPRESSIONS,
            "pack_mode": cfg.INPUT.PACK_MODE,
            "random_prompts": cfg.MODEL.LLM.PROMPT_STYLE == "xsam",
        }

    def _augmentations(self, height: int, width: int) -> List[Union[T.Augmentation, T.Transform]]:
        augs: List[Union[T.Augmentation, T.Transform]] = [
            long_side_resize_transform(height, width, self.image_size)
        ]
        if self.random_flip:
            augs.append(T.RandomFlip(prob=self.flip_prob, horizontal=True, vertical=False))
        return augs

    def __call__(self, dataset_dict: Dict[str, Any]) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        grouped = "expressions" in dataset_dict
        if grouped:
            candidates = dataset_dict["expressions"]
            if not candidates:
                raise ValueError(f"{dataset_dict.get('file_name')}: image without expressions")
            if self.pack_expressions and self.pack_mode == "all_objects":
                # every object of the group (a chunk of split_groups_by_objects), in order, with
                # one of its expressions
                chosen = [exprs[np.random.randint(len(exprs))] for exprs in objects_of(candidates)]
            else:
                chosen = self._draw(candidates)
        else:
            chosen = [dataset_dict]
        original = read_image(chosen[0]["file_name"], format=self.image_format)
        height, width = original.shape[:2]
        aug_input = T.AugInput(original)
        transforms = T.AugmentationList(self._augmentations(height, width))(aug_input)
        image_tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        flipped = any(isinstance(t, T.HFlipTransform) for t in transforms)
        outs = [self._map_expression(d, original, image_tensor, transforms, flipped) for d in chosen]
        if self.random_prompts:
            for out in outs:
                out["prompt_seed"] = int(np.random.randint(2**31 - 1))
        if grouped and self.pack_expressions:
            return _pack(outs)
        return outs if grouped else outs[0]

    def _draw(self, candidates: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
        order = np.random.permutation(len(candidates))
        if not self.pack_expressions:
            return [candidates[i] for i in order[: self.expressions_per_image]]
        chosen, objects = [], set()
        for i in order:  # no object referred twice: the k target sets must be disjoint
            keys = object_keys(candidates[i])
            if not keys & objects:
                objects |= keys
                chosen.append(candidates[i])
        return chosen[: np.random.randint(1, self.expressions_per_image + 1)]

    def _map_expression(
        self,
        dataset_dict: Dict[str, Any],
        original: np.ndarray,
        image: torch.Tensor,
        transforms: T.TransformList,
        flipped: bool,
    ) -> Dict[str, Any]:
        dataset_dict = dict(dataset_dict)  # check_image_size fills in a missing height/width
        utils.check_image_size(dataset_dict, original)
        height, width = original.shape[:2]
        gt_mask, ignore_mask = gt_masks_from_dict(dataset_dict)
        out: Dict[str, Any] = {
            k: copy.deepcopy(v) for k, v in dataset_dict.items() if k not in _ANNOTATION_KEYS
        }  # the dataset owns its dicts; don't share their objects
        out["image"] = image
        out["height"], out["width"] = height, width
        expression = dataset_dict["expression"]
        out["expression"] = swap_left_right(expression) if flipped else expression
        out["task"] = dataset_dict.get("task", "referring")
        out["is_sentence"] = bool(dataset_dict.get("is_sentence", False))
        out["flipped"] = flipped

        if self.is_train and "segmentations" in dataset_dict:
            out["instances"] = self._gres_instances(dataset_dict, image, transforms)
        elif self.is_train:
            out["instances"] = self._target_instances(dataset_dict, gt_mask, ignore_mask, image, transforms)
        else:
            # Only a gRefCOCO no-target expression may have an empty ground truth: anywhere else the
            # evaluator's empty-GT rule would score a broken annotation as right for an empty answer.
            no_target = "segmentations" in dataset_dict and not dataset_dict["segmentations"]
            if not no_target and not gt_mask.any():
                raise ValueError(f"empty target mask after rasterisation: {_sample_id(dataset_dict)}")
            out["gt_mask"] = gt_mask
            out["ignore_mask"] = ignore_mask
        return out

    def _check_target(self, full: np.ndarray, resized: np.ndarray, dataset_dict: Dict[str, Any]) -> None:
        # A target the model cannot see (empty, or gone at the input size) would train "no object".
        if not full.any():
            raise ValueError(f"empty target mask after rasterisation: {_sample_id(dataset_dict)}")
        if not resized.any():
            raise ValueError(
                f"target mask vanishes when resized to long side {self.image_size}: "
                f"{_sample_id(dataset_dict)}"
            )

    def _target_instances(
        self,
        dataset_dict: Dict[str, Any],
        gt_mask: np.ndarray,
        ignore_mask: np.ndarray,
        image: torch.Tensor,
        transforms: T.TransformList,
    ) -> Instances:
        """RefCOCO / ReasonSeg training target: one mask of condition 0 at the resized size."""
        # Label map: 0 background, 1 target, 255 ignore; warped with nearest interpolation.
        label = gt_mask.copy()
        label[ignore_mask] = IGNORE_LABEL
        label = transforms.apply_segmentation(label)
        target = np.ascontiguousarray(label == 1)
        self._check_target(gt_mask, target, dataset_dict)
        instances = Instances(tuple(image.shape[1:]))
        instances.gt_classes = torch.zeros(1, dtype=torch.int64)
        instances.gt_masks = torch.from_numpy(target)[None]  # [1, h, w] bool
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        return instances

    def _gres_instances(
        self, dataset_dict: Dict[str, Any], image: torch.Tensor, transforms: T.TransformList
    ) -> Instances:
        """gRefCOCO training target: one mask per target object, all of condition 0 (Hungarian
        matching gives each its own query); none for a no-target expression, whose queries are
        then all supervised as "no object"."""
        h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
        masks = []
        for segm in dataset_dict["segmentations"]:
            full = rasterize_segmentation(segm, h, w)
            resized = transforms.apply_segmentation(full)
            self._check_target(full, resized, dataset_dict)
            masks.append(torch.from_numpy(np.ascontiguousarray(resized > 0)))
        size = tuple(image.shape[1:])
        instances = Instances(size)
        instances.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
        instances.gt_masks = torch.stack(masks) if masks else torch.zeros((0, *size), dtype=torch.bool)
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        return instances


def _pack(outs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mapped training samples of one image -> one sample whose prompt has a span per expression."""
    packed = dict(outs[0])
    packed["expressions"] = [o["expression"] for o in outs]
    packed["expression"] = "; ".join(packed["expressions"])  # for logs; the prompt uses the list
    for k in ("ref_id", "ann_id", "ann_ids", "sent_id"):
        if k in packed:
            packed[k] = [o[k] for o in outs]
    instances = Instances.cat([o["instances"] for o in outs])  # masks and boxes, in order
    # every target of expression j is condition j (gRefCOCO: several targets, or none)
    counts = torch.tensor([len(o["instances"]) for o in outs])
    instances.gt_classes = torch.repeat_interleave(torch.arange(len(outs), dtype=torch.int64), counts)
    packed["instances"] = instances
    return packed


# Factories are called as factory(cfg, is_train); a @configurable class is one. Both tasks share
# the mapper: the dataset dict says which ground truth (RefCOCO RLE/polygons or ReasonSeg shapes).
MAPPER_REGISTRY.register("referring")(ReferringDatasetMapper)
MAPPER_REGISTRY.register("reasoning")(ReferringDatasetMapper)
