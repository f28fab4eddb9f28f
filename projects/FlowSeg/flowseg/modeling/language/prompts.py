"""Prompts of the condition head: per-task templates, chat formatting, tokenisation, positions.

A sample (one dict of the batch) is turned into one token sequence::

    [chat prefix] <image> \\n INSTRUCTION [chat separator] ANSWER [end of turn]
                  \\_ replaced by the N image tokens in the LLM's input embeddings

* INSTRUCTION comes from :data:`PROMPT_TEMPLATES` (one template per task, extend the dict to add
  one) and marks the referred phrase(s) with ``<p>…</p>``.
* ANSWER is teacher-forced (:data:`DEFAULT_ANSWERS`, or the sample's ``"answer"``) and carries
  ``<SEG>`` for the segmentation tasks. The LM loss covers the answer tokens only.
* Phrase spans and the ``<SEG>`` position are found on the token ids after tokenisation
  (:func:`find_spans`, :func:`find_seg_position`), never on characters.

This is the ``"flowseg"`` prompt style; ``MODEL.LLM.PROMPT_STYLE = "xsam"`` replaces the
referring / reasoning questions and answers by X-SAM's and the dialogue format by ChatML without
system message (:mod:`.templates`).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from .templates import chatml_pieces, xsam_turns
from .tokens import IMAGE, P_END, P_START, SEG, SpecialTokenIds, check_user_text

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Instruction template per task. ``{expression}`` is the sample's expression / query,
#: ``{class_list}`` the generic task's category names, each as its own ``<p>name</p>`` span.
PROMPT_TEMPLATES: dict[str, str] = {
    "referring": "Please segment <p>{expression}</p> in this image.",
    # Reasoning queries have no natural noun phrase: the whole query is the condition span.
    "reasoning": "<p>{expression}</p> Please output the segmentation mask.",
    "generic": "Please segment the following categories in this image: {class_list}.",
    "conversation": "{expression}",
}

#: Teacher-forced answer per task (``None``: no default, the sample's ``"answer"`` is used).
DEFAULT_ANSWERS: dict[str, str | None] = {
    "referring": f"Sure, it is {SEG}.",
    "reasoning": f"Sure, it is {SEG}.",
    "generic": f"Sure, here are the segmentation masks {SEG}.",
    "conversation": None,
}

#: Tasks whose instruction must carry ``<p>…</p>`` spans (their conditions feed the decoder).
SEGMENTATION_TASKS = ("referring", "reasoning", "generic")

#: Fallback dialogue format for tokenizers without a chat template.
PLAIN_USER = "USER: {user} ASSISTANT:"
PLAIN_ANSWER = " {answer}"

#: ``MODEL.LLM.PROMPT_STYLE`` values: FlowSeg's fixed templates through the tokenizer's chat
#: template, or X-SAM's protocol (:mod:`.templates`).
PROMPT_STYLES = ("flowseg", "xsam")

_MARKER_RE = re.compile(re.escape(P_START) + "|" + re.escape(P_END))
_EMPTY_SPAN_RE = re.compile(re.escape(P_START) + r"\s*" + re.escape(P_END))


# ----------------------------------------------------------------------------- phrase markers
def count_phrase_spans(text: str) -> int:
    """Number of ``<p>…</p>`` spans in ``text``.

    Raises ``ValueError`` naming the text when the markers are unbalanced: a ``</p>`` before its
    ``<p>``, nested ``<p>``, or a ``<p>`` that is never closed.
    """
    depth, spans = 0, 0
    for m in _MARKER_RE.finditer(text):
        if m.group() == P_START:
            if depth:
                raise ValueError(f"unbalanced phrase markers: nested {P_START} in {text!r}")
            depth = 1
        else:
            if not depth:
                raise ValueError(f"unbalanced phrase markers: {P_END} without {P_START} in {text!r}")
            depth, spans = 0, spans + 1
    if depth:
        raise ValueError(f"unbalanced phrase markers: {P_START} without {P_END} in {text!r}")
    return spans


def ensure_phrase_markers(text: str) -> str:
    """Return ``text`` if it marks at least one phrase, else the whole text as one phrase.

    A complete instruction without ``<p>`` markers gives the condition head nothing to pool, so
    the whole text falls back to being the phrase (``"<p>" + text + "</p>"``) and a warning is
    issued. Unbalanced markers raise ``ValueError`` (see :func:`count_phrase_spans`).
    """
    if count_phrase_spans(text):
        return text
    msg = f"no {P_START}…{P_END} phrase markers in {text!r}: the whole text is used as the phrase"
    warnings.warn(msg, stacklevel=2)
    logger.warning(msg)
    return f"{P_START}{text}{P_END}"


# ----------------------------------------------------------------------------- instructions
def _strip_image_placeholder(text: str) -> str:
    # LLaVA data marks the image with "<image>" in a question (LLaVA's own preprocessing removes
    # it wherever it is); the head places the placeholder itself.
    return text.replace(IMAGE, "").strip()


def build_instruction(sample: dict[str, Any]) -> str:
    """The user instruction of ``sample`` (without the ``<image>`` placeholder).

    User text (prompt, expression(s), class names) holding ``<SEG>`` or ``<image>``, or ``<p>`` /
    ``</p>`` where no own phrase marks are allowed, raises ``ValueError`` (:func:`.tokens.check_user_text`).

    * ``sample["prompt"]`` (optional) is a complete instruction used verbatim; for the
      segmentation tasks it must mark its phrase(s) with ``<p>…</p>``; without markers the whole
      prompt becomes the phrase and a warning is issued (:func:`ensure_phrase_markers`).
    * ``"referring"`` / ``"reasoning"``: ``sample["expression"]`` is put into the task template,
      which makes the whole expression the phrase. An expression that already contains
      ``<p>…</p>`` is a complete marked instruction and is used as is (no template).
    * ``"referring"`` / ``"reasoning"`` with ``sample["expressions"]`` (a list; training with
      ``INPUT.PACK_EXPRESSIONS``): the template with one ``<p>…</p>`` span per expression, in order
      (condition ``k`` is expression ``k``).
    * ``"generic"``: ``sample["class_names"]``, each name its own ``<p>name</p>`` span, in order
      (condition ``k`` of the output is class ``k``).
    * ``"conversation"``: ``sample["expression"]`` as is (no spans required).
    """
    task = sample.get("task", "referring")
    if task not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(PROMPT_TEMPLATES)}")
    if sample.get("prompt"):
        prompt = check_user_text(str(sample["prompt"]).strip(), "prompt")
        if task in SEGMENTATION_TASKS:
            return ensure_phrase_markers(prompt)
        count_phrase_spans(prompt)
        return prompt
    template = PROMPT_TEMPLATES[task]
    if task == "generic":
        names = sample.get("class_names")
        if not names:
            raise ValueError("a 'generic' sample needs a non-empty 'class_names' list")
        for name in names:
            check_user_text(str(name), "class name", markers=False)
        class_list = ", ".join(f"{P_START}{name}{P_END}" for name in names)
        return template.replace("{class_list}", class_list)
    if task in ("referring", "reasoning") and sample.get("expressions"):
        # several expressions of one image packed into one prompt: one <p> span (condition) each,
        # in order, in the place of the template's single phrase
        phrases = []
        for e in sample["expressions"]:
            e = str(e).strip()
            if not e:
                raise ValueError(f"a packed expression of a {task!r} sample is empty")
            check_user_text(e, "packed expression", markers=False)
            phrases.append(f"{P_START}{e}{P_END}")
        return template.replace(f"{P_START}{{expression}}{P_END}", ", ".join(phrases))
    expression = sample.get("expression")
    if expression is None:
        raise ValueError(f"a {task!r} sample needs an 'expression'")
    expression = check_user_text(str(expression).strip(), "expression")
    if task in SEGMENTATION_TASKS and not _EMPTY_SPAN_RE.sub("", expression).strip():
        raise ValueError(f"the expression of a {task!r} sample is empty ({expression!r}): nothing to segment")
    if count_phrase_spans(expression) and task in SEGMENTATION_TASKS:
        if _EMPTY_SPAN_RE.search(expression):
            raise ValueError(f"empty {P_START}{P_END} phrase in {expression!r}")
        return expression
    # str.replace, not str.format: expressions may contain braces.
    return template.replace("{expression}", expression)


def build_turns(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(user, assistant) turns of ``sample``; the first user turn is :func:`build_instruction`.

    A conversation sample may instead give LLaVA-style ``"conversations"``
    (``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]``).
    """
    task = sample.get("task", "referring")
    if task == "conversation" and sample.get("conversations"):
        turns: list[tuple[str, str]] = []
        conv = sample["conversations"]
        for i in range(0, len(conv) - 1, 2):
            user, gpt = conv[i], conv[i + 1]
            if user.get("from") != "human" or gpt.get("from") != "gpt":
                raise ValueError(f"conversation turns must alternate human/gpt, got {conv[i : i + 2]!r}")
            question = check_user_text(_strip_image_placeholder(str(user["value"])), f"question {i // 2}")
            turns.append((question, str(gpt["value"])))
        if not turns:
            raise ValueError(f"empty conversation {conv!r}")
        return turns
    answer = sample.get("answer")
    if answer is None:
        answer = DEFAULT_ANSWERS.get(task) or ""
    return [(build_instruction(sample), str(answer))]


# ----------------------------------------------------------------------------- chat formatting
def _render_chat(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    # enable_thinking=False: Qwen3's template then puts its empty <think></think> block in the
    # generation prompt (not in the supervised answer); other templates ignore the extra variable.
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=False
    )


def render_segments(tokenizer, turns: Sequence[tuple[str, str]], with_image: bool) -> list[tuple[str, bool]]:
    """Dialogue text as ``(text, is_answer)`` pieces, ``<image>\\n`` leading the first user turn.

    Uses the tokenizer's chat template when it has one (the answer pieces are the differences
    between successive renderings, so they include the template's end-of-turn marker), else the
    plain ``USER: … ASSISTANT: …`` format with the EOS token closing each answer.
    """
    turns = [((f"{IMAGE}\n{u}" if (with_image and i == 0) else u), a) for i, (u, a) in enumerate(turns)]
    if getattr(tokenizer, "chat_template", None):
        pieces: list[tuple[str, bool]] = []
        messages: list[dict[str, str]] = []
        done = ""
        ok = True
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            prompt = _render_chat(tokenizer, messages, True)
            messages.append({"role": "assistant", "content": answer})
            full = _render_chat(tokenizer, messages, False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                ok = False  # template re-renders earlier turns differently: not splittable
                break
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if ok:
            return pieces
        logger.warning("chat template is not prefix-stable over turns; using the plain USER/ASSISTANT format")
    pieces = []
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None) or ""
    for i, (user, answer) in enumerate(turns):
        prefix = (bos or "") if i == 0 else ""
        pieces.append((prefix + PLAIN_USER.format(user=user), False))
        pieces.append((PLAIN_ANSWER.format(answer=answer) + eos, True))
    return pieces


def dialogue_pieces(
    tokenizer, sample: dict[str, Any], with_image: bool, style: str, chat_format: str = "chatml"
) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces of ``sample``'s dialogue in prompt ``style`` (``chat_format``:
    the ``"xsam"`` style's dialogue markers, :data:`.templates.CHAT_FORMATS`)."""
    if style == "flowseg":
        return render_segments(tokenizer, build_turns(sample), with_image)
    if style != "xsam":
        raise ValueError(f"unknown MODEL.LLM.PROMPT_STYLE {style!r}; use one of {PROMPT_STYLES}")
    # a complete instruction (a "prompt", or an expression that marks its own <p> spans) is used
    # as is, like in the "flowseg" style; only the dialogue format differs
    own = sample.get("prompt") or count_phrase_spans(str(sample.get("expression") or ""))
    if sample.get("task", "referring") in ("referring", "reasoning") and not own:
        turns = xsam_turns(sample)
    else:
        turns = build_turns(sample)
    bos = getattr(tokenizer, "bos_token", None) or ""
    return chatml_pieces(turns, with_image, chat_format, bos)


# ----------------------------------------------------------------------------- token positions
def find_spans(
    input_ids: Sequence[int], p_start_id: int, p_end_id: int, text: str = ""
) -> list[tuple[int, int]]:
    """``(start, end)`` token positions (inclusive, markers included) of each ``<p>…</p>`` span.

    Raises ``ValueError`` naming ``text`` when the marker ids are unbalanced (e.g. truncated).
    """
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for i, tok in enumerate(input_ids):
        if tok == p_start_id:
            if start is not None:
                raise ValueError(f"unbalanced phrase markers (nested {P_START}) in tokens of {text!r}")
            start = i
        elif tok == p_end_id:
            if start is None:
                raise ValueError(
                    f"unbalanced phrase markers ({P_END} without {P_START}) in tokens of {text!r}"
                )
            spans.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"unbalanced phrase markers ({P_START} without {P_END}) in tokens of {text!r}")
    return spans


def find_seg_position(input_ids: Sequence[int], labels: Sequence[int], seg_id: int) -> int | None:
    """Position of the last ``<SEG>`` token of the answers (the first one anywhere if no answer
    has one), or ``None``. A packed sample in X-SAM's format has one ``<SEG>`` per turn; X-SAM's
    segmentor takes the last one as the sample's ``S``."""
    first_any, last_answer = None, None
    for i, tok in enumerate(input_ids):
        if tok == seg_id:
            if labels[i] != IGNORE_INDEX:
                last_answer = i
            elif first_any is None:
                first_any = i
    return last_answer if last_answer is not None else first_any


def shift_position(pos: int, image_pos: int | None, num_image_tokens: int) -> int:
    """Position of text token ``pos`` once the ``<image>`` token at ``image_pos`` is replaced by
    ``num_image_tokens`` tokens (later tokens move by ``num_image_tokens - 1``)."""
    if image_pos is None or pos < image_pos:
        return pos
    if pos == image_pos:
        raise ValueError("the <image> placeholder itself has no position after image tokens are inserted")
    return pos + num_image_tokens - 1


def _tokenize(tokenizer, text: str, image_id: int) -> list[int]:
    if image_id >= 0 or IMAGE not in text:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # <image> is no vocabulary token (X-SAM): tokenise around it and put the sentinel id in its place
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE)):
        if i:
            ids.append(image_id)
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return ids


@dataclass
class EncodedPrompt:
    """One tokenised sample. Positions index ``input_ids`` (text tokens, before image insertion)."""

    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    seg_position: int | None = None
    image_position: int | None = None
    text: str = ""


def encode_sample(
    tokenizer,
    sample: dict[str, Any],
    token_ids: SpecialTokenIds,
    *,
    with_image: bool = True,
    max_length: int = 0,
    style: str = "flowseg",
    chat_format: str = "chatml",
) -> EncodedPrompt:
    """Tokenise ``sample`` (see :func:`build_turns`) into ids, labels and special positions.

    ``style`` (:data:`PROMPT_STYLES`): ``"xsam"`` asks referring / reasoning samples without a
    ``"prompt"`` with X-SAM's questions (:func:`.templates.xsam_turns`) and renders every sample
    as ChatML without system message (:func:`.templates.chatml_pieces`).

    Pieces are tokenised separately, so the prompt/answer boundary is exact: labels are the ids of
    the answer pieces and ``-100`` elsewhere. ``max_length`` (> 0) bounds the number of text tokens:
    a longer conversation sample is truncated; a longer segmentation sample raises ``ValueError``
    (cutting it would silently drop conditions or the ``<SEG>`` token).
    """
    pieces = dialogue_pieces(tokenizer, sample, with_image, style, chat_format)
    text = "".join(t for t, _ in pieces)
    ids: list[int] = []
    labels: list[int] = []
    for piece, is_answer in pieces:
        piece_ids = _tokenize(tokenizer, piece, token_ids.image)
        ids += piece_ids
        labels += piece_ids if is_answer else [IGNORE_INDEX] * len(piece_ids)
    if max_length > 0 and len(ids) > max_length:
        if sample.get("task") != "conversation":
            raise ValueError(
                f"prompt has {len(ids)} text tokens > MODEL.LLM.MAX_LENGTH={max_length}: {text[:200]!r}…"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    image_positions = [i for i, t in enumerate(ids) if t == token_ids.image]
    if len(image_positions) > (1 if with_image else 0):
        raise ValueError(
            f"expected {int(with_image)} {IMAGE} token(s), got {len(image_positions)} in {text!r}"
        )
    if with_image and not image_positions:
        raise ValueError(f"the {IMAGE} placeholder was lost (truncated?) in {text!r}")
    spans = find_spans(ids, token_ids.p_start, token_ids.p_end, text)
    return EncodedPrompt(
        input_ids=ids,
        labels=labels,
        spans=spans,
        seg_position=find_seg_position(ids, labels, token_ids.seg),
        image_position=image_positions[0] if image_positions else None,
        text=text,
    )
