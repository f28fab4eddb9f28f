"""COCO-panoptic mapper with large-scale jitter (Mask2Former's COCO "new baseline" recipe).

Training: ``RandomFlip`` -> ``ResizeScale(MIN_SCALE, MAX_SCALE, IMAGE_SIZE)`` ->
``FixedSizeCrop(IMAGE_SIZE)`` (pads with 128 / 255 when the scaled image is smaller). The panoptic
PNG gets the same transforms (nearest), ids are decoded with ``rgb2id`` and every non-crowd
segment still visible after the crop becomes one instance: ``gt_classes`` (contiguous ids),
``gt_masks`` (bool tensor NxHxW, Mask2Former's convention) and ``gt_boxes``.

Inference (decision): Detectron2's default :class:`DatasetMapper` with
``ResizeShortestEdge(IMAGE_SIZE, max_size=IMAGE_SIZE)``, i.e. the long side is resized to
``IMAGE_SIZE`` (SAM's protocol) and the model pads to its square input; ``height``/``width``
keep the original size, so the model's outputs are in original resolution, as Detectron2's
evaluators expect. Both are reached through ``MAPPER_REGISTRY.get("coco_panoptic_lsj")(cfg, is_train)``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from panopticapi.utils import rgb2id

from ..build import MAPPER_REGISTRY
from ..datasets.validation import check_panoptic_segments, check_panoptic_size
from ..image_io import read_image

__all__ = [
    "CheckedPanopticTestMapper",
    "COCOPanopticLSJDatasetMapper",
    "build_coco_panoptic_mapper",
    "build_coco_panoptic_test_mapper",
    "build_lsj_augmentations",
]


def build_lsj_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """Large-scale jitter: flip, random rescale of an ``IMAGE_SIZE`` box, fixed-size crop/pad."""
    size = cfg.INPUT.IMAGE_SIZE
    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augs += [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        ),
        T.FixedSizeCrop(crop_size=(size, size)),
    ]
    return augs


class COCOPanopticLSJDatasetMapper:
    """Training mapper for COCO-panoptic-format dataset dicts (see the module docstring).

    Input dicts come from :func:`flowseg.data.datasets.coco_panoptic.load_coco_panoptic_json` (or
    Detectron2's ``coco_2017_*_panoptic``): ``file_name``, ``pan_seg_file_name``, ``segments_info``.
    Output: ``image`` (uint8 CxHxW in ``INPUT.FORMAT``), ``instances``, plus the input's keys.
    """

    @configurable
    def __init__(
        self, is_train: bool = True, *, augmentations: List[T.Augmentation], image_format: str
    ) -> None:
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logging.getLogger(__name__).info(f"[COCOPanopticLSJDatasetMapper] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_lsj_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)  # it is modified below
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        image_shape = image.shape
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            return dataset_dict

        # The PNG is RGB-encoded ids: nearest-neighbour transforms keep the colours exact, and the
        # 255-padding of FixedSizeCrop decodes to an id that no segment uses.
        pan_file = dataset_dict.pop("pan_seg_file_name")
        pan = read_image(pan_file, "RGB")
        check_panoptic_size(pan.shape, image_shape, _where(pan_file, dataset_dict))
        check_panoptic_segments(rgb2id(pan), dataset_dict["segments_info"], _where(pan_file, dataset_dict))
        pan_ids = rgb2id(transforms.apply_segmentation(pan))
        classes, masks = [], []
        for seg in dataset_dict["segments_info"]:
            if seg.get("iscrowd", 0):
                continue  # crowd regions are neither matched nor penalised (Mask2Former)
            mask = pan_ids == seg["id"]
            if not mask.any():
                continue  # cropped away: an empty target would teach a query to predict nothing
            classes.append(seg["category_id"])
            masks.append(mask)

        instances = Instances((h, w))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            bit = BitMasks(torch.from_numpy(np.ascontiguousarray(np.stack(masks))))
            instances.gt_masks = bit.tensor
            instances.gt_boxes = bit.get_bounding_boxes()
        else:
            instances.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
            instances.gt_boxes = Boxes(torch.zeros((0, 4)))
        dataset_dict["instances"] = instances
        return dataset_dict


def _where(pan_file: str, d: Dict[str, Any]) -> str:
    return f"panoptic PNG {pan_file} (image_id={d.get('image_id')}, image {d.get('file_name')})"


class CheckedPanopticTestMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` that also checks the ground truth PQ will be computed on:
    the panoptic PNG must have the image's size (else the evaluator fails after the whole
    inference) and every ``segments_info`` id must occur in it (else PQ counts an unmatchable
    segment as a false negative without a word)."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        out = super().__call__(dataset_dict)  # fills in the original height / width
        pan_file = dataset_dict.get("pan_seg_file_name")
        if pan_file and "segments_info" in dataset_dict:
            pan_ids = rgb2id(read_image(pan_file, "RGB"))
            where = _where(pan_file, dataset_dict)
            check_panoptic_size(pan_ids.shape, (out["height"], out["width"]), where)
            check_panoptic_segments(pan_ids, dataset_dict["segments_info"], where)
        return out


def build_coco_panoptic_test_mapper(cfg: CfgNode) -> DatasetMapper:
    """Detectron2's ``DatasetMapper`` resizing the long side to ``INPUT.IMAGE_SIZE``
    (:class:`CheckedPanopticTestMapper`: with the ground-truth check)."""
    size = cfg.INPUT.IMAGE_SIZE
    return CheckedPanopticTestMapper(
        is_train=False,
        augmentations=[T.ResizeShortestEdge(short_edge_length=size, max_size=size)],
        image_format=cfg.INPUT.FORMAT,
    )


@MAPPER_REGISTRY.register("coco_panoptic_lsj")
def build_coco_panoptic_mapper(
    cfg: CfgNode, is_train: bool = True
) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """Registry entry: LSJ mapper for training, long-side-resize ``DatasetMapper`` for inference."""
    if is_train:
        return COCOPanopticLSJDatasetMapper(cfg, is_train=True)
    return build_coco_panoptic_test_mapper(cfg)
