# Modules of this subpackage are imported here so that importing flowseg registers them.
from . import sam_vit  # noqa: F401  (registers build_sam_vit_backbone)
