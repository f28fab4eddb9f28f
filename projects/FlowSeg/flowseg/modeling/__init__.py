from . import backbone, language, meta_arch, pixel_decoder, refiner, transformer_decoder  # noqa: F401
from .registry import (  # noqa: F401
    CONDITION_HEAD_REGISTRY,
    PIXEL_DECODER_REGISTRY,
    REFINER_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
)
