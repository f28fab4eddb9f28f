"""Registries through which FlowSeg's components are found by config name.

The backbone, sem-seg head and meta-architecture use Detectron2's own registries
(``BACKBONE_REGISTRY``, ``SEM_SEG_HEADS_REGISTRY``, ``META_ARCH_REGISTRY``); the parts
Detectron2 has no registry for get one here.
"""

from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("FLOWSEG_PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders: backbone features -> mask features + multi-scale features."

TRANSFORMER_DECODER_REGISTRY = Registry("FLOWSEG_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = (
    "Query decoders (Mask2Former masked attention + Bidirectional Semantic Flow)."
)

REFINER_REGISTRY = Registry("FLOWSEG_REFINER")
REFINER_REGISTRY.__doc__ = "Mask refiners applied to mask logits (Boundary-Aware Refinement)."

CONDITION_HEAD_REGISTRY = Registry("FLOWSEG_CONDITION_HEAD")
CONDITION_HEAD_REGISTRY.__doc__ = (
    "Condition heads: image + instruction -> condition embeddings C and SEG embedding S."
)
