"""Synthetic referring benchmark, written in the real RefCOCO / gRefCOCO / ReasonSeg / COCO-panoptic layouts."""

from .generate import generate_synthetic_datasets, register_synthetic_datasets  # noqa: F401
from .gres import generate_synthgref_datasets, register_synthgref_datasets  # noqa: F401
from .scenes import Scene, SceneObject, generate_scene, render_expression, resolve  # noqa: F401
from .vocabulary import DEFAULT_VOCABULARY, VARIANT_VOCABULARY, SceneVocabulary, get_vocabulary  # noqa: F401
