#!/usr/bin/env python
"""FlowSeg demo: segment what a sentence refers to in a picture (or every picture of a folder).

    python demo/demo.py --config-file configs/flowseg_refcoco.yaml --weights model_final.pth \
        --input photo.jpg --expression "the man in the red shirt" --output out/ \
        [--task reasoning] [--opts MODEL.DEVICE cpu]

Each input image ``NAME.ext`` gives ``OUTPUT/NAME.png``: the image with the selected mask
(Detectron2 ``Visualizer``), the expression and the selection score as caption. The image is
prepared like the evaluation mapper does (long side resized to ``INPUT.IMAGE_SIZE``, the model
pads); the mask comes back at the original resolution.

Errors (exit status 1, message on stderr naming the problem): a missing / unreadable image or an
empty folder, a missing checkpoint file, a file that is not a checkpoint, a checkpoint of another
config, ``MODEL.DEVICE cuda`` without a GPU, an empty expression or one with unbalanced ``<p>``
markers, with the model's own ``<SEG>`` / ``<image>`` tokens or longer than ``MODEL.LLM.MAX_LENGTH``,
a config not in referring mode. A 16-bit image is scaled to 8 bits with a warning.
When the selected mask is empty the demo warns "no target found for <expression>" and still
writes the picture.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "projects", "FlowSeg") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from flowseg.checkpoint.checkpointer import CheckpointShapeError, NotACheckpointError  # noqa: E402
from flowseg.data.dataset_mappers.referring import resize_long_side  # noqa: E402
from flowseg.data.image_io import read_image as read_image_file  # noqa: E402
from flowseg.modeling.language.prompts import count_phrase_spans  # noqa: E402
from flowseg.modeling.language.tokens import check_user_text  # noqa: E402
from flowseg.utils.bad_samples import BadSampleError  # noqa: E402
from flowseg.utils.inference import (  # noqa: E402
    add_opts_argument,
    build_cfg,
    check_cfg_args,
    check_device,
    load_model,
)
from flowseg.utils.visualize import draw_referring_overlay  # noqa: E402
from PIL import Image  # noqa: E402

logger = logging.getLogger("flowseg.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["DemoError", "ReferringDemo", "list_images", "setup_cfg", "run", "main"]


class DemoError(RuntimeError):
    """A user-facing problem (bad input, config or checkpoint): printed as ``error: ...``."""


def setup_cfg(config_file: str, weights: Optional[str], opts: Sequence[Any] = ()) -> CfgNode:
    try:
        check_cfg_args(config_file, opts)
    except (FileNotFoundError, ValueError) as e:
        raise DemoError(str(e)) from e
    cfg = build_cfg(config_file, weights, opts)
    try:
        check_device(cfg)
    except ValueError as e:
        raise DemoError(str(e)) from e
    if cfg.MODEL.FLOWSEG.MODE != "referring":
        raise DemoError(
            f"the model config {config_file} is not in referring mode (MODEL.FLOWSEG.MODE is "
            f"{cfg.MODEL.FLOWSEG.MODE!r}): the demo needs a referring/reasoning model, "
            "e.g. configs/flowseg_refcoco.yaml"
        )
    w = cfg.MODEL.WEIGHTS
    if w and "://" not in w and not os.path.isfile(w):
        raise DemoError(f"checkpoint file not found: {w} (--weights / MODEL.WEIGHTS)")
    cfg.freeze()
    return cfg


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


def read_image(path: str, image_format: str) -> np.ndarray:
    """HxWx3 uint8 in ``image_format`` (EXIF orientation applied, like Detectron2's loaders; a 16-bit
    image is scaled to 8 bits with a warning, :mod:`flowseg.data.image_io`)."""
    try:
        return read_image_file(path, format=image_format)
    except Exception as e:  # PIL raises several types for truncated / non-image files
        raise DemoError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


class ReferringDemo:
    """A loaded referring model and the evaluation-mapper preprocessing for single pictures."""

    def __init__(self, cfg: CfgNode) -> None:
        self.cfg = cfg
        self.model = load_model(cfg, logger)
        self.image_format = cfg.INPUT.FORMAT
        self.image_size = int(cfg.INPUT.IMAGE_SIZE)

    def model_input(self, image: np.ndarray, expression: str, task: str = "referring") -> Dict[str, Any]:
        height, width = image.shape[:2]
        # Same geometry as ReferringDatasetMapper at test time: long side -> INPUT.IMAGE_SIZE.
        resized = resize_long_side(image, self.image_size)
        return {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "expression": expression,
            "task": task,
            "is_sentence": task == "reasoning",
        }

    @torch.no_grad()
    def __call__(self, image: np.ndarray, expression: str, task: str = "referring") -> Dict[str, Any]:
        """``ref_seg`` of the model (selected ``mask`` at the image's resolution, ``score``, ``query``)."""
        return self.model([self.model_input(image, expression, task)])[0]["ref_seg"]

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        return utils.convert_image_to_rgb(image, self.image_format)


def run(args: argparse.Namespace) -> List[str]:
    """Run the demo; returns the written files. Raises :class:`DemoError` on user errors."""
    expression = (args.expression or "").strip()
    if not expression:
        raise DemoError('the expression is empty: pass --expression "the object to segment"')
    try:
        count_phrase_spans(check_user_text(expression, "expression"))
    except ValueError as e:
        raise DemoError(f"--expression: {e}") from e
    images = list_images(args.input)  # before the (slow) model build: fail fast on a bad path
    for path in images:
        check_image(path)
    cfg = setup_cfg(args.config_file, args.weights, args.opts)
    try:
        demo = ReferringDemo(cfg)
    except (NotACheckpointError, CheckpointShapeError) as e:
        raise DemoError(str(e)) from e
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in images:
        image = read_image(path, demo.image_format)
        try:
            ref = demo(image, expression, args.task)
        except BadSampleError as e:  # e.g. longer than MODEL.LLM.MAX_LENGTH
            raise DemoError(str(e)) from e
        mask = ref["mask"].cpu().numpy().astype(bool)
        if not mask.any():
            msg = f"no target found for {expression!r} in {path}"
            logger.warning(msg)
            print(f"warning: {msg}", file=sys.stderr)
        pic = draw_referring_overlay(
            demo.to_rgb(image), expression, mask, score=ref.get("score"), scale=args.scale
        )
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        if not cv2.imwrite(out, cv2.cvtColor(pic, cv2.COLOR_RGB2BGR)):
            raise DemoError(f"cannot write {out}")
        print(f"{path}: score {ref.get('score', float('nan')):.3f}, {int(mask.sum())} px -> {out}")
        written.append(out)
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="referring-mode FlowSeg config")
    p.add_argument("--weights", default=None, metavar="FILE", help="checkpoint (sets MODEL.WEIGHTS)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--expression", required=True, help='what to segment, e.g. "the dog on the left"')
    p.add_argument("--output", required=True, help="output folder for the overlay PNGs")
    p.add_argument(
        "--task",
        choices=("referring", "reasoning"),
        default="referring",
        help="prompt template: referring expression or reasoning question",
    )
    p.add_argument("--scale", type=float, default=1.0, help="drawing scale of the overlay")
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
