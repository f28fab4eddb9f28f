"""The LLM's last hidden states ``H_LLM`` (paper §3.1), from its decoder stack: one full pass over
right-padded sequences, or one pass over a prompt prefix the sequences share plus one over their
rests (inference, :func:`.sequences.shared_prefix_len`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["decoder_stack", "last_hidden", "last_hidden_shared_prefix"]


def decoder_stack(llm: nn.Module) -> nn.Module | None:
    """The causal LM's decoder (transformer layers + final norm, no LM head), through a peft wrapper."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.get_decoder() if hasattr(base, "get_decoder") else None


def last_hidden(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, D] of ``llm`` on right-padded ``inputs_embeds``."""
    # The decoder stack alone gives the (final-norm) last hidden states without materialising
    # [B, L, vocab] logits or every layer's states; LoRA layers live inside it, so they apply.
    decoder = decoder_stack(llm)
    if decoder is not None:
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
    out = llm(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1]


def last_hidden_shared_prefix(
    llm: nn.Module, seqs: list[torch.Tensor], prefix: int, device: torch.device
) -> torch.Tensor | None:
    """Last hidden states [K, T, D] of K right-padded sequences that share their first ``prefix``
    embeddings: the prefix runs once with a key/value cache (transformers' ``DynamicCache``,
    repeated K times with its public ``batch_repeat_interleave``), the K rests on top of it.
    Causal attention makes this the full pass up to float reduction order. None without a
    decoder stack."""
    decoder = decoder_stack(llm)
    if decoder is None:
        return None
    out = decoder(inputs_embeds=seqs[0][None, :prefix], use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(seqs))
    rests = [s[prefix:] for s in seqs]
    rest_len = max(r.shape[0] for r in rests)
    rest_embeds = rests[0].new_zeros(len(seqs), rest_len, rests[0].shape[-1])
    attention_mask = torch.zeros(len(seqs), prefix + rest_len, dtype=torch.long, device=device)
    attention_mask[:, :prefix] = 1
    for b, r in enumerate(rests):
        rest_embeds[b, : r.shape[0]] = r
        attention_mask[b, prefix : prefix + r.shape[0]] = 1
    rest_hidden = decoder(
        inputs_embeds=rest_embeds, attention_mask=attention_mask, past_key_values=cache, use_cache=True
    ).last_hidden_state
    return torch.cat([out.last_hidden_state.expand(len(seqs), -1, -1), rest_hidden], dim=1)
