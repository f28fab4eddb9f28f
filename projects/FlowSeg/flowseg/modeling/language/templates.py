"""X-SAM's prompt protocol (``MODEL.LLM.PROMPT_STYLE = "xsam"``): questions, answers, ChatML.

X-SAM asks for a referring expression with one of ten questions and for a ReasonSeg query with
one of five "long" (the query is a sentence) or five "short" (a phrase) questions; the phrase is
marked ``<p>…</p>`` and the teacher-forced answer is one of five sentences ending in ``<SEG>``.
The wording below is X-SAM's (prompt text carries no weights, but a model fine-tuned on these
prompts is evaluated best on the same distribution; duplicates are kept because they weight the
distribution).

X-SAM draws the question and the answer at random, also in evaluation, without a seed. Here the
choice is a deterministic function of the text (:func:`choose`): the CRC-32 of the expression
picks the question, the CRC-32 of ``"answer|" + expression`` the answer. A training sample may
carry an integer ``"prompt_seed"`` (drawn by the dataset mapper from the seeded data-loader RNG),
which is mixed into both keys, so training still sees every template while evaluation, demos
and repeated runs always give the same prompt for the same expression.

The dialogue is ChatML without a system message, rendered here rather than by the tokenizer's
chat template (Qwen3's hybrid-thinking template would insert an empty ``<think>`` block)::

    <|im_start|>user\\n<image>{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}<|im_end|>

Several expressions of one image (``sample["expressions"]``, training with packing) become one
turn each, the ``<image>`` placeholder in the first; turn ``k`` holds span (condition) ``k``.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

from .tokens import IMAGE, P_END, P_START, SEG, check_user_text

__all__ = [
    "REASONING_LONG_QUESTIONS",
    "REASONING_SHORT_QUESTIONS",
    "REFERRING_QUESTIONS",
    "SEG_ANSWERS",
    "chatml_pieces",
    "choose",
    "xsam_turns",
]

REFERRING_QUESTIONS: tuple[str, ...] = (
    "Please identify and segment the {phrase} in this image.",
    "Please segment {phrase} in this image.",
    "What is {phrase} in this image? Please output the corresponding segmentation mask.",
    "Can you segment {phrase} in this image? Please generate the segmentation mask.",
    "Could you provide a segmentation mask for the {phrase} in this image? "
    "Please provide the segmentation mask.",
    "Where is the {phrase} in this picture? Please output the segmentation masks.",
    "Can you highlight the {phrase} in this image with a segmentation mask? "
    "Please output the segmentation mask.",
    "Could you provide a segmentation mask for the {phrase} in this image? "
    "Please respond with the segmentation mask.",
    "Where is the {phrase} in this picture? Please output the corresponding segmentation mask.",
    "Can you highlight the {phrase} in this image with a segmentation mask? "
    "Please output the segmentation mask.",
)

#: ReasonSeg queries that are phrases (``is_sentence`` false).
REASONING_SHORT_QUESTIONS: tuple[str, ...] = (
    "Can you segment {phrase} in this image? Please output the segmentation mask.",
    "Can you give the segmentation mask for {phrase} in this image? Please respond with the segmentation mask.",
    "Can you highlight {phrase} and output the corresponding segmentation mask? "
    "Please provide the segmentation mask.",
    "What is {phrase} in this image? Please output the corresponding segmentation mask.",
    "What is {phrase} in this image? Please generate a segmentation mask for this image.",
)

#: ReasonSeg queries that are sentences (``is_sentence`` true).
REASONING_LONG_QUESTIONS: tuple[str, ...] = (
    "{phrase} Please output the corresponding segmentation mask.",
    "{phrase} Please generate a segmentation mask for this image.",
    "{phrase} Please extract the segmentation mask.",
    "{phrase} Please return the segmentation predictions as masks.",
    "{phrase} Please segment the image.",
)

SEG_ANSWERS: tuple[str, ...] = (
    f"{SEG}.",
    f"It is {SEG}.",
    f"Sure, {SEG}.",
    f"Sure, it is {SEG}.",
    f"Sure, the segmentation mask is {SEG}.",
)

_USER = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
_END = "<|im_end|>"
_SEP = "\n"  # between turns, outside the supervised answer
#: X-SAM's chat formats (MODEL.LLM.CHAT_FORMAT): user-turn template, answer suffix, and whether the
#: tokenizer's BOS text opens the dialogue (X-SAM prepends it for Phi-3, not for Qwen's tokenizers)
CHAT_FORMATS = {
    "chatml": (_USER, _END, False),
    "phi3": ("<|user|>\n{user}<|end|>\n<|assistant|>\n", "<|end|>", True),
}


def choose(options: Sequence[str], key: str) -> str:
    """``options[crc32(key) mod len(options)]``: the same key gives the same option in every process."""
    return options[zlib.crc32(key.encode("utf-8")) % len(options)]


def _key(sample: dict[str, Any], text: str, turn: int) -> str:
    seed = sample.get("prompt_seed")
    return text if seed is None else f"{int(seed)}|{turn}|{text}"


def xsam_turns(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) per expression of a referring / reasoning ``sample`` (X-SAM's wording).

    Referring expressions are lower-cased as X-SAM does; reasoning queries pick the long or
    short questions by ``sample["is_sentence"]``. A sample's own ``"answer"`` replaces the drawn
    answer of every turn.
    """
    task = sample.get("task", "referring")
    if task not in ("referring", "reasoning"):
        raise ValueError(f"X-SAM prompts cover referring / reasoning samples, not {task!r}")
    texts = sample.get("expressions") or [sample.get("expression")]
    if any(t is None for t in texts):
        raise ValueError(f"a {task!r} sample needs an 'expression'")
    if task == "referring":
        questions = REFERRING_QUESTIONS
    else:
        questions = REASONING_LONG_QUESTIONS if sample.get("is_sentence") else REASONING_SHORT_QUESTIONS
    what = "packed expression" if sample.get("expressions") else "expression"
    turns = []
    for j, raw in enumerate(texts):
        text = check_user_text(str(raw).strip(), what, markers=False)
        if task == "referring":
            text = text.lower()
        key = _key(sample, text, j)
        # str.replace, not str.format: expressions may contain braces.
        question = choose(questions, key).replace("{phrase}", f"{P_START}{text}{P_END}")
        answer = sample.get("answer")
        turns.append((question, str(answer) if answer is not None else choose(SEG_ANSWERS, "answer|" + key)))
    return turns


def chatml_pieces(
    turns: Sequence[tuple[str, str]], with_image: bool, chat_format: str = "chatml", bos: str = ""
) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces of the ChatML dialogue (``<image>`` directly before the first
    question, no newline, as X-SAM's SigLIP configs put it); each answer ends with ``<|im_end|>``,
    which is supervised, and turns are separated by an unsupervised newline.

    ``chat_format`` ``"phi3"`` (:data:`CHAT_FORMATS`) uses Phi-3's ``<|user|>`` / ``<|assistant|>`` /
    ``<|end|>`` markers instead, with ``bos`` (the tokenizer's BOS text) opening the dialogue."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown MODEL.LLM.CHAT_FORMAT {chat_format!r}; use one of {sorted(CHAT_FORMATS)}")
    user_template, end, with_bos = CHAT_FORMATS[chat_format]
    pieces: list[tuple[str, bool]] = []
    for i, (user, answer) in enumerate(turns):
        if i == 0 and with_image:
            user = IMAGE + user
        opening = _SEP if i else (bos if with_bos else "")
        pieces.append((opening + user_template.format(user=user), False))
        pieces.append((answer + end, True))
    return pieces
