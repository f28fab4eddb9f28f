#!/usr/bin/env python
"""Write the tiny, randomly initialised language model, tokenizer and vision tower that the tiny
referring configs (``configs/tiny/flowseg_refer_tiny.yaml``, ``stage2_tiny.yaml``,
``stage3_tiny.yaml``) need, and the config options that point at them.

    python tools/make_tiny_llm.py --out output/tiny_llm
    python projects/FlowSeg/train_net.py --config-file configs/tiny/flowseg_refer_tiny.yaml \\
        $(cat output/tiny_llm/options.txt)

Writes under ``--out``: ``tokenizer/`` (byte-level BPE trained on a RefCOCO-like word list, or on
``--corpus``), ``llm_config.json`` + ``llm/`` (tiny Qwen3), ``siglip_vision_config.json`` +
``siglip_vision/`` (tiny SigLIP), and ``options.txt``: the ``KEY VALUE`` options for ``train_net.py``
(models built from the config jsons; ``--from-weights``: loaded from the saved weights, as
stages 2 and 3 do). Nothing is downloaded.
"""

import argparse
import os
import shlex
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created; existing files are replaced)")
    p.add_argument("--corpus", default=None, help="text file, one sentence a line, to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the tests')")
    p.add_argument(
        "--from-weights", action="store_true", help="options load the saved weights (MODEL.LLM.PATH)"
    )
    p.add_argument("--lora", action="store_true", help="options switch LoRA on (stage 3)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from flowseg.utils.tiny_models import TINY_VOCAB_SIZE, make_tiny_llm_dir, tiny_llm_cfg_overrides

    corpus = None
    if args.corpus:
        if not os.path.isfile(args.corpus):
            print(f"error: --corpus {args.corpus}: no such file", file=sys.stderr)
            return 2
        with open(args.corpus, encoding="utf-8") as f:
            corpus = [line.strip() for line in f if line.strip()]
        if not corpus:
            print(f"error: --corpus {args.corpus} has no text", file=sys.stderr)
            return 2
    paths = make_tiny_llm_dir(
        os.path.abspath(args.out), corpus=corpus, vocab_size=args.vocab_size or TINY_VOCAB_SIZE
    )
    opts = tiny_llm_cfg_overrides(paths, from_weights=args.from_weights, lora=args.lora)
    text = " ".join(shlex.quote(str(o)) for o in opts)
    with open(os.path.join(args.out, "options.txt"), "w") as f:
        f.write(text + "\n")
    print(f"tiny LLM files in {args.out}; config options (also in {os.path.join(args.out, 'options.txt')}):")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
