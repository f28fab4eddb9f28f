"""FlowSeg: Dynamic Semantic Guidance for LLM-Conditioned Segmentation (Detectron2 project).

``import flowseg`` registers every component in Detectron2's registries (and FlowSeg's own,
see ``flowseg.modeling.registry``) and the built-in datasets.
"""

from . import checkpoint, data, evaluation, modeling  # noqa: F401
from .config import add_flowseg_config  # noqa: F401

__all__ = ["add_flowseg_config"]
from . import engine  # noqa: F401,E402
