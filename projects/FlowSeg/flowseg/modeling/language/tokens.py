"""Special tokens of FlowSeg's condition head (paper §3.1 "Language Model Processing").

``<p>`` / ``</p>`` mark the referred phrase(s) in the instruction, ``<SEG>`` marks the
segmentation output position in the answer, and ``<image>`` is the single placeholder whose
position receives the vanilla encoder's image tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

P_START = "<p>"
P_END = "</p>"
SEG = "<SEG>"
IMAGE = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (P_START, P_END, SEG, IMAGE)
#: X-SAM's vocabulary (``MODEL.LLM.PROMPT_STYLE = "xsam"``): these three, in this order, get the
#: ids after the base vocabulary; ``<image>`` is no token but the sentinel id below, inserted at
#: tokenisation and replaced by the image tokens, so the embedding matrix has no row for it.
XSAM_SPECIAL_TOKENS: tuple[str, ...] = (SEG, P_START, P_END)
IMAGE_TOKEN_INDEX = -200


def check_user_text(text: str, what: str, *, markers: bool = True) -> str:
    """Return ``text`` (an expression, query, class name or instruction a user or data set gave)
    if it holds no special token the prompt builder places itself; else raise ``ValueError``
    naming ``what``, the text and the tokens.

    ``<SEG>`` belongs to the answer and ``<image>`` is where the image tokens go: typed into user
    text, one would become a second ``<SEG>`` id inside the phrase, the other a second image slot.
    ``markers``: whether the text may mark its own phrases with ``<p>…</p>`` (a complete
    instruction may, a class name or one of several packed expressions may not).
    """
    placed = (SEG, IMAGE) if markers else (P_START, P_END, SEG, IMAGE)
    found = [t for t in placed if t in text]
    if found:
        why = f"the model places {SEG} in its answer and the image tokens at {IMAGE} itself"
        if not markers:
            why += f", and {P_START}…{P_END} mark the phrases of a complete instruction only"
        raise ValueError(
            f"{what} {text!r} contains the special token(s) {' '.join(found)} ({why}): remove them"
        )
    return text


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids of the four special tokens in one tokenizer."""

    p_start: int
    p_end: int
    seg: int
    image: int

    @classmethod
    def from_tokenizer(cls, tokenizer, image_id: int | None = None) -> SpecialTokenIds:
        """Ids of the tokens in ``tokenizer``; ``image_id`` (e.g. :data:`IMAGE_TOKEN_INDEX`) stands
        for ``<image>`` when the placeholder is not a token of the vocabulary."""
        ids = {} if image_id is None else {"image": int(image_id)}
        for name, tok in zip(("p_start", "p_end", "seg", "image"), SPECIAL_TOKENS):
            if name in ids:
                continue
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"token {tok!r} is not in the tokenizer; call add_special_tokens() first")
            ids[name] = int(tid)
        return cls(**ids)


def add_special_tokens(tokenizer, tokens: tuple[str, ...] = SPECIAL_TOKENS) -> list[str]:
    """Add ``tokens`` to ``tokenizer`` as additional special tokens (never split, one id each).

    Tokens the tokenizer already has (e.g. a tokenizer saved after FlowSeg training) are left
    alone. Returns the tokens that were newly added.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return []
    # transformers v5 renamed "additional_special_tokens" to "extra_special_tokens"; extend the
    # existing list instead of replacing it (Qwen's tokenizer has its own extra tokens).
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    else:  # transformers < 5
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )
    return missing


def _init_rows_to_mean(weight: torch.Tensor, rows: list[int], num_old_rows: int) -> None:
    if weight.is_meta:  # shapes only (parameter counts): no values to set
        return
    num_old_rows = min(num_old_rows, weight.shape[0])  # a matrix cut to the tokenizer (exact=True)
    # Mean of the pre-existing rows: a neutral starting point that keeps the new tokens' logits and
    # embeddings in the distribution the LLM was trained on (random rows can dominate the softmax).
    keep = torch.ones(num_old_rows, dtype=torch.bool, device=weight.device)
    keep[[r for r in rows if r < num_old_rows]] = False
    mean = weight[:num_old_rows][keep].float().mean(dim=0)
    weight[rows] = mean.to(weight.dtype)


@torch.no_grad()
def resize_token_embeddings(
    model: nn.Module, tokenizer, new_tokens: list[str], exact: bool = False
) -> list[int]:
    """Make ``model``'s embeddings fit ``tokenizer`` and initialise the rows of ``new_tokens``.

    The input embedding matrix (and the output one, when it is not tied to the input one) is
    resized to ``len(tokenizer)`` when it is too small; the rows of the newly added tokens are set
    to the mean of the other rows. Models whose matrix is already larger than the tokenizer (Qwen
    pads its vocabulary to a multiple of 128) are not resized, but the rows the new tokens land on
    are still re-initialised. ``exact`` (X-SAM) resizes to ``len(tokenizer)`` in every case, which
    cuts such a padded matrix (Qwen3-4B: 151,936 -> 151,672 rows). Returns the ids of ``new_tokens``.
    """
    inp = model.get_input_embeddings()
    num_old_rows = inp.weight.shape[0]
    if len(tokenizer) > num_old_rows or (exact and len(tokenizer) != num_old_rows):
        # mean_resizing=False: we set the new rows ourselves (exact mean, also for pre-sized matrices).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in new_tokens]
    if not ids:
        return ids
    inp = model.get_input_embeddings()
    _init_rows_to_mean(inp.weight, ids, num_old_rows)
    out = model.get_output_embeddings()
    if out is not None and out.weight is not inp.weight:
        _init_rows_to_mean(out.weight, ids, num_old_rows)
        if getattr(out, "bias", None) is not None:
            _init_rows_to_mean(out.bias.unsqueeze(-1), ids, num_old_rows)
    return ids
