"""Loading the causal LM and its tokenizer, and making the right parts trainable (LoRA via peft)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` … → ``torch.dtype`` (``None``/"" → float32)."""
    if isinstance(name, torch.dtype):
        return name
    if not name:
        return torch.float32
    try:
        return _DTYPES[str(name).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown MODEL.LLM.TORCH_DTYPE {name!r}; use one of {sorted(_DTYPES)}") from None


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local folder."""
    from transformers import AutoTokenizer

    if not path:
        raise ValueError("no tokenizer: set MODEL.LLM.TOKENIZER_PATH (or MODEL.LLM.PATH)")
    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str = "", config: str = "", dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM`` from a local folder, or randomly initialised from a config json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if config:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=dtype)
    raise ValueError("MODEL.LLM needs PATH (pretrained folder) or CONFIG (config json)")


@dataclass
class LoraSettings:
    """``MODEL.LLM.LORA`` as a plain object."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def _trainable_token_targets(model: nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    # Rows of the input embedding, plus the output embedding's when it is a separate matrix (untied),
    # so that the model can also learn to emit <SEG>.
    targets = {_module_name(model, model.get_input_embeddings()): list(token_ids)}
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        targets[_module_name(model, out)] = list(token_ids)
    return targets


# Fused projections of some LLMs (Phi-3: one qkv_proj, one gate_up_proj) for the separate names
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def resolve_lora_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """``MODEL.LLM.LORA.TARGET_MODULES`` for ``model``: a separate projection name the model does not
    have is replaced by the fused module holding it (``q_proj`` -> ``qkv_proj`` on Phi-3), so that one
    target list serves Qwen3 and Phi-3; a name found nowhere is reported (WARNING)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    out: list[str] = []
    for target in targets:
        resolved = target if target in names else _FUSED.get(target, target)
        if resolved not in names:
            logger.warning("LoRA target %r matches no module of the LLM: no adapter there", target)
        elif resolved != target:
            logger.info("LoRA target %r: the LLM fuses it into %r", target, resolved)
        if resolved not in out:
            out.append(resolved)
    return out


def setup_trainable(
    model: nn.Module,
    *,
    freeze: bool,
    lora: LoraSettings | None,
    trainable_token_ids: Sequence[int] = (),
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Freeze / LoRA-wrap the LLM. Returns the (possibly ``peft``-wrapped) model.

    * ``lora.enabled``: ``get_peft_model`` with ``LoraConfig(rank, alpha, dropout, targets)``;
      ``trainable_token_ids`` become trainable rows of the embedding matrices through peft's
      ``trainable_token_indices`` (only those rows train, not the 150k-row matrix).
    * LoRA off and ``freeze``: only the ``trainable_token_ids`` rows train (peft ``TrainableTokens``).
    * ``freeze=False``: every base weight trains as well.
    """
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    if gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen base and inputs_embeds that need grads.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
    token_ids = list(trainable_token_ids)
    peft_config = None
    if lora is not None and lora.enabled:
        rows = _trainable_token_targets(model, token_ids) if (token_ids and freeze) else None
        peft_config = LoraConfig(
            r=int(lora.rank),
            lora_alpha=lora.alpha,
            lora_dropout=float(lora.dropout),
            target_modules=resolve_lora_targets(model, lora.target_modules),
            trainable_token_indices=rows,
            bias="none",
        )
    elif freeze and token_ids:
        targets = _trainable_token_targets(model, token_ids)
        peft_config = TrainableTokensConfig(target_modules=list(targets), token_indices=token_ids)
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(not freeze)
        return model
    with warnings.catch_warnings():
        # peft warns about tied embeddings even though TrainableTokens ties its adapters itself.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        model = get_peft_model(model, peft_config)
    if not freeze:
        for p in model.parameters():
            p.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LLM trainable parameters: %d / %d", n_train, n_all)
    return model
