# Checkpoint converters (SAM, Mask2Former, Hugging Face) and FlowSeg's checkpointer.
from .mask2former import (  # noqa: F401
    convert_d2_mask2former_checkpoint,
    convert_hf_mask2former,
    convert_mask2former_checkpoint,
)
from .sam import convert_sam_checkpoint, load_sam_checkpoint  # noqa: F401
