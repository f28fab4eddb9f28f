"""The LLM's input sequences: text embeddings with the image tokens at ``<image>`` (paper §3.1,
"Language Model Processing"), right padding, and the prompt prefix that inputs share.

:class:`~flowseg.modeling.language.condition_head.LLMConditionHead` tokenises the prompts
(:mod:`.prompts`), embeds them, and builds the sequences here.
"""

from __future__ import annotations

import torch

from .prompts import IGNORE_INDEX, EncodedPrompt, shift_position

__all__ = ["insert_image_tokens", "pad_right", "shared_prefix_len"]


def insert_image_tokens(
    encoded: list[EncodedPrompt],
    text_embeds: list[torch.Tensor] | tuple[torch.Tensor, ...],
    image_tokens: torch.Tensor | None,
    device: torch.device,
) -> tuple[list, list, list, list]:
    """Per sample: input embeddings with the image tokens at ``<image>``, labels, span and
    ``<SEG>`` positions in that sequence."""
    seqs, seq_labels, span_positions, seg_positions = [], [], [], []
    for b, enc in enumerate(encoded):
        emb = text_embeds[b]
        lab = torch.tensor(enc.labels, dtype=torch.long, device=device)
        n_img = 0
        if enc.image_position is not None:
            q, n_img = enc.image_position, image_tokens.shape[1]
            emb = torch.cat([emb[:q], image_tokens[b], emb[q + 1 :]])
            lab = torch.cat([lab[:q], lab.new_full((n_img,), IGNORE_INDEX), lab[q + 1 :]])
        # Text positions after the placeholder move by n_img - 1 (see shift_position).
        img_pos = enc.image_position
        span_positions.append(
            [(shift_position(s, img_pos, n_img), shift_position(e, img_pos, n_img)) for s, e in enc.spans]
        )
        seg = enc.seg_position
        seg_positions.append(None if seg is None else shift_position(seg, img_pos, n_img))
        seqs.append(emb)
        seq_labels.append(lab)
    return seqs, seq_labels, span_positions, seg_positions


def pad_right(
    seqs: list[torch.Tensor], seq_labels: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``inputs_embeds`` [B, T, D], ``attention_mask`` [B, T] and ``labels`` [B, T] of the batch."""
    # Right padding: positions 0..len-1 stay what the model would see for an unpadded sequence.
    bsz, max_len = len(seqs), max(s.shape[0] for s in seqs)
    inputs_embeds = seqs[0].new_zeros(bsz, max_len, seqs[0].shape[-1])
    attention_mask = torch.zeros(bsz, max_len, dtype=torch.long, device=device)
    labels = torch.full((bsz, max_len), IGNORE_INDEX, dtype=torch.long, device=device)
    for b, (s, lab) in enumerate(zip(seqs, seq_labels)):
        inputs_embeds[b, : s.shape[0]] = s
        attention_mask[b, : s.shape[0]] = 1
        labels[b, : s.shape[0]] = lab
    return inputs_embeds, attention_mask, labels


def shared_prefix_len(encoded: list[EncodedPrompt], seqs: list[torch.Tensor], n_img: int) -> int:
    """Length of the embedded prefix all samples share (0: none worth sharing): their common
    text tokens, which must reach past ``<image>`` when there is one, with equal image tokens;
    every sample keeps at least one token of its own."""
    ids = [e.input_ids for e in encoded]
    shortest = min(len(x) for x in ids)
    n_text = next((i for i in range(shortest) if any(x[i] != ids[0][i] for x in ids[1:])), shortest)
    q = encoded[0].image_position
    if q is not None:
        same = all(e.image_position == q for e in encoded)
        if (
            not same
            or n_text <= q
            or not all(torch.equal(s[q : q + n_img], seqs[0][q : q + n_img]) for s in seqs)
        ):
            return 0
        n_text += n_img - 1
    return max(0, min(n_text, min(s.shape[0] for s in seqs) - 1))
