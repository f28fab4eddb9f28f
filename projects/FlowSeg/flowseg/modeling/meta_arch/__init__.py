# Modules of this subpackage are imported here so that importing flowseg registers them.
from .flowseg import FlowSeg, llm_configured  # noqa: F401
from .head import FlowSegHead  # noqa: F401
