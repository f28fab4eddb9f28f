"""Dataset registration. Importing registers the builtin names under ``$DETECTRON2_DATASETS``."""

from .coco_panoptic import (  # noqa: F401
    coco_panoptic_metadata,
    contiguous_id_map,
    load_coco_panoptic_json,
    panoptic_to_semantic,
    read_annotation_json,
    register_all_coco_panoptic_with_sem_seg,
    register_coco_panoptic_dataset,
)
from .conversation import load_llava_conversations, register_llava_dataset  # noqa: F401
from .grefcoco import load_grefcoco_dataset, register_grefcoco_dataset  # noqa: F401
from .reasonseg import load_reasonseg_dataset, register_reasonseg_dataset  # noqa: F401
from .refcoco import load_refer_dataset, register_refer_dataset  # noqa: F401
