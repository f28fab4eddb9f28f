#!/usr/bin/env python
"""FlowSeg demo: segment what one or several expressions refer to in a picture (or every picture
of a folder).

    python demo/demo.py --config-file output/main/config.yaml --weights output/main/model_final.pth \
        --input photo.jpg --expression "the purple star" --expression "the yellow square" \
        --output out/ [--task reasoning|gres|generic] [--scale S] [--opts MODEL.DEVICE cpu]

``--expression`` may be repeated; an expression with several ``<p>…</p>`` spans gives one answer
per span. All expressions of an image share one image encoding. ``--task generic``: the
expressions are class names (one condition each; none given: the model's metadata classes) and the
classes found with a score of at least 0.5 are drawn. Each input image ``NAME.EXT``
gives, in ``OUTPUT``, ``NAME-EXT-HASH.png`` (HASH: 8 hex digits of the expressions and task, so
other expressions or ``a.jpg`` beside ``a.png`` never overwrite each other): the picture with each
answer's mask filled and outlined in its own colour over a legend (number, colour, expression,
score, or "no target" where a ``--task gres`` model answers so); ``NAME-EXT-HASH.json``: the
answers with their masks as COCO RLE; ``NAME-EXT-HASH.mask<i>.png``: each mask (0/255). A small
picture is enlarged to a long side of 640 pixels (``--scale`` overrides). Text in any script or
emoji is drawn with the Noto fonts of the ``manimgx-fonts*`` packages (a warning names characters
no font covers). The image is prepared like the evaluation mapper does (long side resized to
``INPUT.IMAGE_SIZE``); the masks come back at the original resolution.

Errors (exit status 1, one line ``error: ...`` on stderr naming the problem): a missing /
unreadable image or an empty folder, a missing or broken config, a missing checkpoint file, a file
that is not a checkpoint, a checkpoint of another config, ``MODEL.DEVICE cuda`` without a GPU, an
empty expression or one with unbalanced ``<p>`` markers or longer than ``MODEL.LLM.MAX_LENGTH``, a
config not in referring mode. A 16-bit image is scaled to 8 bits with a warning. When an answer's
mask is empty the demo warns "no target found for <expression>" and still writes the picture.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "projects", "FlowSeg") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))  # run from a checkout without installing

from flowseg.utils.inference import add_opts_argument  # noqa: E402
from flowseg.utils.referring_demo import (  # noqa: E402
    TASKS,
    DemoError,
    ReferringDemo,
    load_demo,
    output_stem,
    parse_expressions,
    read_image,
    save_outputs,
    setup_cfg,
)
from PIL import Image  # noqa: E402

logger = logging.getLogger("flowseg.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["DemoError", "ReferringDemo", "list_images", "setup_cfg", "load_demo", "run", "main"]


def list_images(path: str) -> List[str]:
    """``path`` if it is a file, else the image files of the folder (sorted)."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DemoError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        return files
    if not os.path.exists(path):
        raise DemoError(f"input image not found: {path}")
    return [path]


def check_image(path: str) -> None:
    """Cheap header check (no decoding), so that a bad file fails before the slow model load."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        raise DemoError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def run(args: argparse.Namespace) -> List[str]:
    """Run the demo; returns the written overlay files. Raises :class:`DemoError` on user errors."""
    expressions = parse_expressions(args.expression or [])
    images = list_images(args.input)  # before the (slow) model build: fail fast on a bad path
    for path in images:
        check_image(path)
    demo = load_demo(args.config_file, args.weights, args.opts)
    written = []
    for path in images:
        image = read_image(path, demo.image_format)
        results = demo.predict(image, expressions, args.task)
        for r in results:
            if not r.mask.any():
                msg = f"no target found for {r.text!r} in {path}"
                logger.warning(msg)
                print(f"warning: {msg}", file=sys.stderr)
        stem = output_stem(path, expressions, args.task)
        files = save_outputs(
            args.output,
            stem,
            demo.draw(image, results, args.scale),
            results,
            image=path,
            task=args.task,
            expressions=expressions,
        )
        summary = "; ".join(
            f"{r.text!r}: " + ("no target" if r.no_target else f"score {r.score:.3f}, {int(r.mask.sum())} px")
            for r in results
        )
        print(f"{path}: {summary} -> {files['overlay']}")
        written.append(files["overlay"])
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="referring-mode FlowSeg config")
    p.add_argument("--weights", default=None, metavar="FILE", help="checkpoint (sets MODEL.WEIGHTS)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument(
        "--expression",
        required=True,
        action="append",
        help='what to segment, e.g. "the dog on the left"; repeat it for several (each its own colour)',
    )
    p.add_argument("--output", required=True, help="output folder for the pictures, masks and JSON")
    p.add_argument(
        "--task",
        choices=TASKS,
        default="referring",
        help="referring expression, reasoning question, gres (several targets or none), generic (class names)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="drawing scale (default: a small picture is enlarged to 640 px)",
    )
    add_opts_argument(p, "MODEL.DEVICE cpu")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        run(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
