"""Tiny models for tests: re-exported from :mod:`flowseg.utils.tiny_models`."""

from flowseg.utils.tiny_models import (  # noqa: F401
    CHATML_TEMPLATE,
    TINY_IMAGE_SIZE,
    TINY_LLM_HIDDEN,
    TINY_VOCAB_SIZE,
    make_tiny_llm_dir,
    make_tokenizer,
    tiny_llm_cfg_overrides,
    tiny_qwen3_config,
    tiny_siglip2_vision_config,
    tiny_siglip_vision_config,
)
