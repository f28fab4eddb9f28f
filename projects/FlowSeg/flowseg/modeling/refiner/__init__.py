# Modules of this subpackage are imported here so that importing flowseg registers them.
from typing import Optional

from torch import nn

from ..registry import REFINER_REGISTRY
from .bar import BoundaryAwareRefiner, boundary_map  # noqa: F401


def build_refiner(cfg) -> Optional[nn.Module]:
    """Build ``cfg.MODEL.FLOWSEG.BAR.NAME`` from ``REFINER_REGISTRY``; ``None`` when BAR is disabled."""
    if not cfg.MODEL.FLOWSEG.BAR.ENABLED:
        return None
    return REFINER_REGISTRY.get(cfg.MODEL.FLOWSEG.BAR.NAME)(cfg)
