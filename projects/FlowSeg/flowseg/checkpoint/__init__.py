# Checkpoint converters (SAM, Mask2Former, X-SAM, Hugging Face) and FlowSeg's checkpointer.
from .checkpointer import FlowSegCheckpointer  # noqa: F401
from .components import COMPONENTS, component_of, group_keys_by_component  # noqa: F401
from .formats import detect_checkpoint_format  # noqa: F401
from .mask2former import (  # noqa: F401
    convert_d2_mask2former_checkpoint,
    convert_hf_mask2former,
    convert_mask2former_checkpoint,
)
from .peft_layout import canonical_key  # noqa: F401
from .report import LoadReport  # noqa: F401
from .sam import convert_sam_checkpoint, load_sam_checkpoint  # noqa: F401
from .untrained import UntrainedPartsError, check_evaluation_weights  # noqa: F401
