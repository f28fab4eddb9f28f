"""Writers of data sets in their real on-disk formats (tests, synthetic data)."""

from .coco_panoptic import (  # noqa: F401
    coco_panoptic_paths,
    register_coco_panoptic_folder,
    write_coco_panoptic_dataset,
    write_semantic_pngs,
)
from .reasonseg import write_reasonseg_dataset  # noqa: F401
from .refer import mask_to_polygons, mask_to_rle, write_refer_dataset  # noqa: F401
