"""What ``demo/demo.py`` (command line) and ``demo/app.py`` (Gradio page) share: the config and
model loading, the inference of several expressions of one image, the drawing and the files.

* :func:`setup_cfg` / :class:`ReferringDemo`: a referring-mode model loaded once;
  :meth:`ReferringDemo.predict` answers every expression of an image with one image encoding and
  one LLM prefix (:class:`~flowseg.engine.shared_features.SharedImageFeatureInference`); each
  ``<p>…</p>`` span of an expression is an answer of its own.
* :func:`parse_expressions`: the user's expressions, checked (empty, unbalanced ``<p>``, empty span).
* :func:`output_stem` / :func:`save_outputs`: the overlay PNG, one mask PNG per answer and a COCO
  RLE JSON, named after the image and a hash of the expressions, so that runs do not collide.

Every user-facing problem raises :class:`DemoError` with a message that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from pycocotools import mask as mask_utils

from ..checkpoint.checkpointer import CheckpointShapeError, NotACheckpointError
from ..checkpoint.trainable import FrozenBaseMismatchError
from ..data.dataset_mappers.referring import resize_long_side
from ..data.image_io import read_image as read_image_file
from ..engine.shared_features import SharedImageFeatureInference
from ..modeling.language.prompts import P_END, P_START, count_phrase_spans
from ..modeling.language.tokens import check_user_text
from .bad_samples import BadSampleError
from .fonts import warn_uncovered
from .inference import build_cfg, check_cfg_args, check_device, load_model
from .visualize import ExpressionResult, draw_expressions_overlay, expression_color

__all__ = [
    "TASKS",
    "DemoError",
    "ReferringDemo",
    "setup_cfg",
    "load_demo",
    "parse_expressions",
    "read_image",
    "check_image_array",
    "output_stem",
    "save_outputs",
]

logger = logging.getLogger("flowseg.demo")

#: prompt templates: referring expression, reasoning question, multi/no-target (GRES) answers, or
#: generic segmentation (every class name one condition: the user's, else the model's metadata)
TASKS = ("referring", "reasoning", "gres", "generic")
GENERIC_MIN_SCORE = 0.5  # generic answers below this selection score are not shown
_SPAN_RE = re.compile(re.escape(P_START) + r"(.*?)" + re.escape(P_END), re.S)


class DemoError(RuntimeError):
    """A user-facing problem (bad input, config or checkpoint): shown as ``error: ...``."""


def setup_cfg(config_file: str, weights: Optional[str], opts: Sequence[Any] = ()) -> CfgNode:
    """The frozen config of a referring-mode model, ``weights`` as ``MODEL.WEIGHTS``."""
    try:
        check_cfg_args(config_file, opts)
        cfg = build_cfg(config_file, weights, opts)
        check_device(cfg)
    except (FileNotFoundError, ValueError, KeyError, AttributeError) as e:  # yacs: unknown keys
        raise DemoError(f"config {config_file}: {e}") from e
    except yaml.YAMLError as e:
        raise DemoError(f"config {config_file} is not a YAML config: {str(e).splitlines()[0]}") from e
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


def parse_expressions(expressions: Sequence[str]) -> List[str]:
    """The non-empty expressions, each checked: balanced ``<p>`` markers, no empty span."""
    out = [e.strip() for e in expressions if e and e.strip()]
    if not out:
        raise DemoError('the expression is empty: give what to segment, e.g. "the red cup"')
    for e in out:
        try:
            count_phrase_spans(check_user_text(e, "expression"))
        except ValueError as err:
            raise DemoError(str(err)) from err  # the message names the expression
        if any(not s.strip() for s in _SPAN_RE.findall(e)):
            raise DemoError(f"expression {e!r} has an empty {P_START}{P_END} span")
    return out


def read_image(path: str, image_format: str) -> np.ndarray:
    """HxWx3 uint8 in ``image_format`` (EXIF orientation applied; grey, RGBA, CMYK and palette
    images converted, a 16-bit one scaled to 8 bits with a warning: :mod:`flowseg.data.image_io`)."""
    try:
        return read_image_file(path, format=image_format)
    except Exception as e:  # PIL raises several types for truncated / non-image files
        raise DemoError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def check_image_array(image: Any, max_pixels: int = 50_000_000) -> None:
    """Raise :class:`DemoError` unless ``image`` is an HxWx3 uint8 array with 1..``max_pixels`` pixels."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise DemoError(f"the image must be an HxWx3 uint8 array, got a {what}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise DemoError(f"the image is empty ({h}x{w} pixels)")
    if h * w > max_pixels:
        raise DemoError(f"the image is too large ({w}x{h} = {h * w} pixels; at most {max_pixels})")


def _answer_texts(expression: str, n: int) -> List[str]:
    spans = [s.strip() for s in _SPAN_RE.findall(expression)]
    return spans if len(spans) == n else [expression] * n


class ReferringDemo:
    """A loaded referring model and the evaluation-mapper preprocessing for single pictures."""

    def __init__(self, cfg: CfgNode) -> None:
        self.cfg = cfg
        self.model = load_model(cfg, logger)
        self.inference = SharedImageFeatureInference(self.model, max_expressions_per_pass=16)
        self.image_format = cfg.INPUT.FORMAT
        self.image_size = int(cfg.INPUT.IMAGE_SIZE)

    def model_input(self, image: np.ndarray, expression: str, task: str = "referring") -> Dict[str, Any]:
        check_image_array(image)
        if task not in TASKS:
            raise DemoError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
        height, width = image.shape[:2]
        # Same geometry as ReferringDatasetMapper at test time: long side -> INPUT.IMAGE_SIZE.
        resized = resize_long_side(image, self.image_size)
        return {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "expression": expression,
            "task": "reasoning" if task == "reasoning" else "referring",
            "is_sentence": task == "reasoning",
            "multi_target": task == "gres",
        }

    @torch.no_grad()
    def __call__(self, image: np.ndarray, expression: str, task: str = "referring") -> Dict[str, Any]:
        """``ref_seg`` of the model (selected ``mask`` at the image's resolution, ``score``, ``query``)."""
        return self.model([self.model_input(image, expression, task)])[0]["ref_seg"]

    def _generic(self, image: np.ndarray, class_names: Sequence[str]) -> List[ExpressionResult]:
        x = self.model_input(image, "", "referring")
        x["task"] = "generic"
        if class_names:
            x["class_names"] = list(class_names)
        try:
            (out,) = self.model([x])
            names = list(class_names) or self.model._class_names()
        except (BadSampleError, ValueError) as e:  # e.g. no category names in the metadata
            raise DemoError(f"generic task: {e}; type the class names, one per line") from e
        return [
            ExpressionResult(name, seg["mask"].cpu().numpy().astype(bool), float(seg["score"]))
            for name, seg in zip(names, out["ref_segs"])
            if seg["score"] >= GENERIC_MIN_SCORE and bool(seg["mask"].any())
        ]

    @torch.no_grad()
    def predict(
        self, image: np.ndarray, expressions: Sequence[str], task: str = "referring"
    ) -> List[ExpressionResult]:
        """One answer per expression, and per ``<p>`` span of an expression that has several, in order.
        ``task="generic"``: the expressions are class names (none: the model's own), and the classes
        found (score >= :data:`GENERIC_MIN_SCORE`, non-empty mask) are the answers."""
        if task == "generic":
            names = [e.strip() for e in expressions if e and e.strip()]
            if any(P_START in n or P_END in n for n in names):
                raise DemoError(f"generic class names take no {P_START}{P_END} markers: {names}")
            return self._generic(image, names)
        expressions = parse_expressions(expressions)
        inputs = [self.model_input(image, e, task) for e in expressions]
        try:
            outputs = self.inference(inputs)
        except BadSampleError as e:  # e.g. longer than MODEL.LLM.MAX_LENGTH
            raise DemoError(str(e)) from e
        results = []
        for expression, out in zip(expressions, outputs):
            segs = out.get("ref_segs") or [out["ref_seg"]]
            for text, seg in zip(_answer_texts(expression, len(segs)), segs):
                warn_uncovered(text, logger)
                results.append(
                    ExpressionResult(
                        text=text,
                        mask=seg["mask"].cpu().numpy().astype(bool),
                        score=float(seg["score"]) if seg.get("score") is not None else None,
                        no_target=bool(seg.get("no_target", False)),
                    )
                )
        return results

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        return utils.convert_image_to_rgb(image, self.image_format)

    def draw(
        self, image: np.ndarray, results: Sequence[ExpressionResult], scale: Optional[float] = None
    ) -> np.ndarray:
        """The overlay (RGB) of :func:`~flowseg.utils.visualize.draw_expressions_overlay`."""
        return draw_expressions_overlay(self.to_rgb(image), results, scale=scale)


def load_demo(config_file: str, weights: Optional[str], opts: Sequence[Any] = ()) -> ReferringDemo:
    """The config checked and the model loaded; every failure a :class:`DemoError` naming it."""
    cfg = setup_cfg(config_file, weights, opts)
    try:
        return ReferringDemo(cfg)
    except (NotACheckpointError, CheckpointShapeError, FrozenBaseMismatchError, FileNotFoundError) as e:
        raise DemoError(str(e)) from e
    except (OSError, ValueError, KeyError) as e:  # e.g. MODEL.LLM.PATH is not a model folder
        raise DemoError(f"cannot build the model of {config_file}: {type(e).__name__}: {e}") from e


def output_stem(image_path: str, expressions: Sequence[str], task: str) -> str:
    """``NAME-EXT-HASH``: the image's name and extension (``a.jpg`` and ``a.png`` differ) and 8 hex
    digits of the expressions and task (other expressions of one image do not overwrite)."""
    stem, ext = os.path.splitext(os.path.basename(image_path))
    digest = hashlib.sha1(json.dumps([task, list(expressions)]).encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{ext.lstrip('.').lower() or 'image'}-{digest}"


def results_json(results: Sequence[ExpressionResult], **info: Any) -> Dict[str, Any]:
    """The answers as JSON: text, colour, score, ``no_target``, area and the mask as COCO RLE."""
    answers = []
    for i, r in enumerate(results):
        rle = mask_utils.encode(np.asfortranarray(np.asarray(r.mask, np.uint8)))
        answers.append(
            {
                "expression": r.text,
                "color_rgb": list(expression_color(i)),
                "score": r.score,
                "no_target": r.no_target,
                "area": int(np.count_nonzero(r.mask)),
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return {**info, "answers": answers}


def save_outputs(
    out_dir: str, stem: str, overlay_rgb: np.ndarray, results: Sequence[ExpressionResult], **info: Any
) -> Dict[str, Any]:
    """Write ``STEM.png`` (overlay), ``STEM.json`` (:func:`results_json`) and ``STEM.mask<i>.png``
    (0/255, one per answer) into ``out_dir``; returns the paths (``overlay``, ``json``, ``masks``).
    Replacing an existing overlay (same image, same expressions) is logged."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"overlay": os.path.join(out_dir, stem + ".png"), "json": os.path.join(out_dir, stem + ".json")}
    if os.path.exists(paths["overlay"]):
        logger.warning("replacing %s (same image name and expressions as before)", paths["overlay"])
    if not cv2.imwrite(paths["overlay"], cv2.cvtColor(overlay_rgb, cv2.COLOR_RGB2BGR)):
        raise DemoError(f"cannot write {paths['overlay']}")
    masks = []
    for i, r in enumerate(results):
        masks.append(os.path.join(out_dir, f"{stem}.mask{i + 1}.png"))
        if not cv2.imwrite(masks[-1], np.asarray(r.mask, np.uint8) * 255):
            raise DemoError(f"cannot write {masks[-1]}")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results_json(results, **info), f, ensure_ascii=False, indent=1)
    return {**paths, "masks": masks}
