"""Tiny, randomly initialised language/vision models (tests and CPU runs; nothing is downloaded).

``make_tiny_llm_dir(folder)`` writes, under ``folder``:

* a byte-level BPE tokenizer (~500 tokens) trained on the fly with ``tokenizers`` and saved as a
  ``PreTrainedTokenizerFast`` (``tokenizer/``), and the same with a ChatML chat template
  (``tokenizer_chat/``);
* a tiny Qwen3 config json (hidden 64, 2 layers, 4 heads, 2 KV heads) and the saved weights of a
  model built from it together with the tokenizer (``llm/``, loadable with ``from_pretrained``);
* tiny SigLIP (fixed-resolution, 32 px, patch 8 → 16 tokens) and SigLIP2 (NaFlex) vision configs
  and saved SigLIP vision weights (``siglip_vision/``).

``tiny_llm_cfg_overrides(paths)`` returns the ``cfg.merge_from_list`` options that point
``MODEL.LLM`` / ``MODEL.VANILLA_ENCODER`` at them (and keep everything tiny).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_VOCAB_SIZE = 500
TINY_IMAGE_SIZE = 32  # vanilla encoder input (patch 8 -> 4 x 4 = 16 image tokens)
TINY_LLM_HIDDEN = 64

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = """
a an the this that these those it is are was be on in at of to for with by from under over near behind
left right front back top bottom middle center side corner far close first second third last other
red blue green yellow white black brown gray orange pink purple dark light small big large tall short
long little old young new wooden metal plastic glass round square striped spotted open closed empty full
man woman person people boy girl child kid baby player guy lady men women skier surfer rider driver
dog cat horse sheep cow elephant bear zebra giraffe bird duck animal car truck bus train bicycle bike
motorcycle airplane boat chair couch table bed bench sofa desk lamp window door wall floor ground grass
tree sky cloud road street sidewalk building house tower bridge fence sign pole light umbrella bag
backpack suitcase bottle cup glass bowl plate fork knife spoon banana apple orange sandwich pizza cake
donut broccoli carrot laptop phone keyboard mouse remote television screen book clock vase scissors
teddy toothbrush kite frisbee ball racket skateboard snowboard surfboard hat shirt jacket coat dress
please segment output mask image picture photo sure here what which where who how can you find show
object thing something used people usually would could should when holding wearing sitting standing
walking running eating looking playing riding carrying lying next between above below inside outside
one two three four five many some all each both most part piece half whole and or but not no yes
following categories segmentation masks answer question describe detail looks like there here its
""".split()


def _training_corpus() -> list[str]:
    # A few hundred sentences built from the word list, so that BPE merges cover whole words.
    words = _WORDS
    lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    lines += [f"Please segment the {w} in this image." for w in words]
    lines += [f"Sure, it is the {w}." for w in words]
    lines += [f"USER: show the {w} ASSISTANT: here" for w in words[::4]]
    return lines * 3


def make_tokenizer(
    chat_template: str | None = None, vocab_size: int = TINY_VOCAB_SIZE, corpus: list[str] | None = None
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (EOS = PAD = ``<|endoftext|>``) trained on
    ``corpus`` (default: a built-in RefCOCO-like word list)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_qwen3_config(
    vocab_size: int,
    tie_word_embeddings: bool = False,
    hidden_size: int = TINY_LLM_HIDDEN,
    num_layers: int = 2,
):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_siglip_vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )


def tiny_siglip2_vision_config():
    from transformers import Siglip2VisionConfig

    return Siglip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_patches=16,
        patch_size=8,
    )


def _write_json(path: Path, config) -> str:
    path.write_text(json.dumps(config.to_dict(), indent=2))
    return str(path)


def make_tiny_llm_dir(
    folder: str | os.PathLike,
    *,
    tie_word_embeddings: bool = False,
    corpus: list[str] | None = None,
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = TINY_LLM_HIDDEN,
    num_layers: int = 2,
) -> dict[str, str]:
    """Write the tiny tokenizer / Qwen3 / SigLIP(2) files under ``folder``; return their paths.

    Keys: ``root``, ``tokenizer``, ``tokenizer_chat``, ``llm_config`` (json), ``llm`` (weights +
    tokenizer folder), ``vision_config`` (SigLIP json), ``siglip2_vision_config`` (json),
    ``vision`` (SigLIP vision weights folder).
    """
    import torch
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"root": str(root)}

    tok = make_tokenizer(vocab_size=vocab_size, corpus=corpus)
    paths["tokenizer"] = str(root / "tokenizer")
    tok.save_pretrained(paths["tokenizer"])
    paths["tokenizer_chat"] = str(root / "tokenizer_chat")
    make_tokenizer(CHATML_TEMPLATE, vocab_size=vocab_size, corpus=corpus).save_pretrained(
        paths["tokenizer_chat"]
    )

    llm_config = tiny_qwen3_config(
        len(tok), tie_word_embeddings, hidden_size=hidden_size, num_layers=num_layers
    )
    paths["llm_config"] = _write_json(root / "llm_config.json", llm_config)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_config)
    paths["llm"] = str(root / "llm")
    llm.save_pretrained(paths["llm"])
    tok.save_pretrained(paths["llm"])

    vis_config = tiny_siglip_vision_config()
    paths["vision_config"] = _write_json(root / "siglip_vision_config.json", vis_config)
    paths["siglip2_vision_config"] = _write_json(
        root / "siglip2_vision_config.json", tiny_siglip2_vision_config()
    )
    paths["vision"] = str(root / "siglip_vision")
    SiglipVisionModel(vis_config).save_pretrained(paths["vision"])
    return paths


def tiny_llm_cfg_overrides(
    paths: dict[str, str],
    *,
    from_weights: bool = False,
    vision: str = "siglip",
    lora: bool = True,
) -> list:
    """``cfg.merge_from_list`` options for the tiny models of :func:`make_tiny_llm_dir`.

    ``from_weights``: load the saved weights through ``PATH`` keys (else build from ``CONFIG``);
    ``vision``: ``"siglip"``, ``"siglip2"`` (config only) or ``"none"`` (vanilla encoder disabled).
    """
    opts: list = []
    if from_weights:
        opts += ["MODEL.LLM.PATH", paths["llm"], "MODEL.LLM.CONFIG", ""]
    else:
        opts += ["MODEL.LLM.CONFIG", paths["llm_config"], "MODEL.LLM.TOKENIZER_PATH", paths["tokenizer"]]
    opts += [
        "MODEL.LLM.TORCH_DTYPE",
        "float32",
        "MODEL.LLM.LORA.ENABLED",
        lora,
        "MODEL.LLM.LORA.RANK",
        4,
        "MODEL.LLM.LORA.ALPHA",
        8,
        "MODEL.LLM.LORA.DROPOUT",
        0.0,
        "MODEL.VANILLA_ENCODER.IMAGE_SIZE",
        TINY_IMAGE_SIZE,
        "MODEL.VANILLA_ENCODER.ENABLED",
        vision != "none",
    ]
    if vision == "siglip":
        if from_weights:
            opts += ["MODEL.VANILLA_ENCODER.PATH", paths["vision"]]
        else:
            opts += ["MODEL.VANILLA_ENCODER.CONFIG", paths["vision_config"]]
    elif vision == "siglip2":
        opts += ["MODEL.VANILLA_ENCODER.CONFIG", paths["siglip2_vision_config"]]
    elif vision != "none":
        raise ValueError(f"unknown vision {vision!r}")
    return opts
