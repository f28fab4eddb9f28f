# Checkpoint converters (SAM, Mask2Former, Hugging Face) and FlowSeg's checkpointer.
