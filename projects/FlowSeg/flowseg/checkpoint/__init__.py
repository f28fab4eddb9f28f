# Checkpoint converters (SAM, Mask2Former, Hugging Face) and FlowSeg's checkpointer.
from .sam import convert_sam_checkpoint, load_sam_checkpoint  # noqa: F401
