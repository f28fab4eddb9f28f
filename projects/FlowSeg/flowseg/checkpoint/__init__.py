# Checkpoint converters (SAM, Mask2Former, Hugging Face) and FlowSeg's checkpointer.
from .checkpointer import (  # noqa: F401
    COMPONENTS,
    FlowSegCheckpointer,
    LoadReport,
    canonical_key,
    component_of,
    detect_checkpoint_format,
    group_keys_by_component,
)
from .mask2former import (  # noqa: F401
    convert_d2_mask2former_checkpoint,
    convert_hf_mask2former,
    convert_mask2former_checkpoint,
)
from .sam import convert_sam_checkpoint, load_sam_checkpoint  # noqa: F401
