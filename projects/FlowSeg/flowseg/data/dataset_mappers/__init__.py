"""Dataset mappers; each registers itself in :data:`flowseg.data.build.MAPPER_REGISTRY`."""

from .coco_panoptic_lsj import (  # noqa: F401
    COCOPanopticLSJDatasetMapper,
    build_coco_panoptic_mapper,
    build_coco_panoptic_test_mapper,
    build_lsj_augmentations,
)
from .conversation import ConversationDatasetMapper  # noqa: F401
from .referring import ReferringDatasetMapper, gt_masks_from_dict, rasterize_segmentation  # noqa: F401
