#!/usr/bin/env python
"""Attention of the segmentation embedding and of the language condition over the image
(FlowSeg paper Fig. 6, appendix A.5).

The decoder's attentions are over *queries*, not pixels; both maps are therefore projected to
the image through the queries' masks. For decoder layer l (default: the last) of a sample:

* ``M_q`` = sigmoid of query q's mask logits predicted right after layer l (the prediction
  made from the queries the attention was computed on; 1/4 scale, then up-sampled, padding
  cropped and resized to the original image like the model's masks);
* (b) **condition attention**: ``w_cond = cond_attn[l][k]``, the eq. 5 attention of condition k
  (default the first ``<p>`` span) over the queries (softmax over queries, averaged over heads;
  needs ``MODEL.FLOWSEG.CONDITION_REFINEMENT`` on);
* (a) **segmentation-embedding attention**: ``w_seg = softmax_q(LN(Q^(l))_q · S / sqrt(h))``,
  scaled dot-product attention of the projected ``<SEG>`` embedding S (the vector added to the
  initial queries, paper §3.1) over the layer-l query features after the decoder's output
  LayerNorm (for the last layer these are exactly the features the masks and logits are read
  from); there are no learned projections in it (S has no attention module of its own);
* each map = ``Σ_q w_q · M_q``: a weights-sum-to-one mix of mask probabilities, so in [0, 1].

Saved per sample: ``NNN_attention.png`` = [image | (a) | (b)] with each map min-max normalised
to [0, 1] and drawn as an OpenCV JET heat map (red = high) over the image, the expression as
title; ``attention_maps.json`` lists the files, the weights and the top queries.

    python tools/analysis/attention_maps.py --config-file configs/flowseg_refcoco.yaml \
        --weights model_final.pth --dataset refcoco_unc_val --max-samples 8 --output-dir output/attention
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    model_and_dataset_from_args,
    run_head_with_intermediates,
    setup_logging,
    write_json,
)
from detectron2.modeling.postprocessing import sem_seg_postprocess  # noqa: E402

logger = logging.getLogger("flowseg.analysis.attention")

__all__ = ["attention_maps", "normalize_map", "render_attention", "run", "main"]


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant map becomes all zeros)."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _to_image(weights: torch.Tensor, masks: torch.Tensor, images, height: int, width: int) -> np.ndarray:
    """Σ_q w_q M_q at 1/4 scale -> original resolution (same path as the model's masks)."""
    m = torch.einsum("q,qhw->hw", weights, masks)[None, None]
    m = F.interpolate(m, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(m, images.image_sizes[0], height, width)[0].cpu().numpy()


@torch.no_grad()
def attention_maps(
    model: torch.nn.Module, x: Dict[str, Any], layer: int = -1, condition_index: int = 0
) -> Dict[str, Any]:
    """The two attention maps of one model input ``x`` (see the module docstring).

    ``layer``: 1..L, or negative counting from the end (-1 = last). Returns the query weights
    (``seg_weights``, ``cond_weights`` [Q]), the maps at original resolution in [0, 1]
    (``seg_map``, ``cond_map``) and their min-max normalised heat maps (``seg_heatmap``,
    ``cond_heatmap``).
    """
    predictor = model.sem_seg_head.predictor
    num_layers = predictor.num_layers
    if not (-num_layers <= layer <= num_layers) or layer == 0:
        raise ValueError(f"layer must be in 1..{num_layers} or -{num_layers}..-1, got {layer}")
    li = layer - 1 if layer > 0 else num_layers + layer  # 0-based
    captured: Dict[str, torch.Tensor] = {}
    # Query features after layer li (the FFN is the layer's last step): [Q,B,h].
    handle = predictor.transformer_ffn_layers[li].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("queries", out)
    )
    try:
        outputs, cond, images = run_head_with_intermediates(model, [x])
    finally:
        handle.remove()
    if not outputs.get("cond_attn"):
        raise ValueError(
            "the decoder returned no condition attention: MODEL.FLOWSEG.CONDITION_REFINEMENT must be on"
        )
    n_valid = int(cond["condition_mask"][0].sum())
    if not 0 <= condition_index < n_valid:
        raise ValueError(
            f"condition_index {condition_index} out of range: the sample has {n_valid} condition(s)"
        )
    if "seg_embed" not in cond or not bool(cond["seg_mask"][0]):
        raise ValueError("the prompt has no <SEG> token: no segmentation embedding to visualise")

    # predictions: [before layer 1, after layer 1, ..., after layer L]
    all_masks = [a["pred_masks"] for a in outputs["aux_outputs"]] + [outputs["pred_masks"]]
    masks = all_masks[li + 1][0].float().sigmoid()  # [Q,h/4,w/4]

    cond_w = outputs["cond_attn"][li][0, condition_index].float()  # [Q], softmax over queries
    s = cond["seg_embed"][0].float()  # [h]
    q = predictor.decoder_norm(captured["queries"])[:, 0].float()  # [Q,h]
    seg_w = torch.softmax(q @ s / math.sqrt(q.shape[-1]), dim=0)

    height, width = (
        int(x.get("height", images.image_sizes[0][0])),
        int(x.get("width", images.image_sizes[0][1])),
    )
    seg_map = _to_image(seg_w, masks, images, height, width)
    cond_map = _to_image(cond_w, masks, images, height, width)
    prob = outputs["pred_logits"][0].softmax(-1)[:, condition_index]
    return {
        "layer": li + 1,
        "condition_index": condition_index,
        "seg_weights": seg_w.cpu().numpy(),
        "cond_weights": cond_w.cpu().numpy(),
        "seg_map": seg_map,
        "cond_map": cond_map,
        "seg_heatmap": normalize_map(seg_map),
        "cond_heatmap": normalize_map(cond_map),
        "selected_query": int(prob.argmax()),
    }


def _heat_overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    colored = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image_rgb, 1.0 - alpha, colored, alpha, 0.0)


def _wrap(text: str, max_width: int, font_scale: float) -> List[str]:
    lines: List[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0] <= max_width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines or [""]


def _label(panel: np.ndarray, text: str, font_scale: float) -> np.ndarray:
    panel = panel.copy()
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    cv2.rectangle(panel, (0, 0), (tw + 6, th + 8), (0, 0, 0), -1)
    cv2.putText(
        panel, text, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA
    )
    return panel


def render_attention(
    image_rgb: np.ndarray,
    seg_heatmap: np.ndarray,
    cond_heatmap: np.ndarray,
    expression: str,
    layer: int,
    min_side: int = 256,
) -> np.ndarray:
    """[image | SEG-embedding attention | condition attention] with the expression as title (RGB uint8)."""
    h, w = image_rgb.shape[:2]
    scale = max(1.0, min_side / max(1, min(h, w)))  # small images are enlarged for legibility
    size = (int(round(w * scale)), int(round(h * scale)))
    image = cv2.resize(image_rgb, size, interpolation=cv2.INTER_LINEAR)
    heats = [
        cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        for m in (seg_heatmap, cond_heatmap)
    ]
    fs = 0.45
    panels = [
        _label(image, "image", fs),
        _label(_heat_overlay(image, heats[0]), "SEG embedding attention", fs),
        _label(_heat_overlay(image, heats[1]), f"condition attention (layer {layer})", fs),
    ]
    body = np.concatenate(panels, axis=1)
    title_fs = 0.55
    lines = _wrap(expression, body.shape[1] - 12, title_fs)
    line_h = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, title_fs, 1)[0][1] + 10
    strip = np.full((line_h * len(lines) + 8, body.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(
            strip, line, (6, line_h * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, title_fs, (0, 0, 0), 1, cv2.LINE_AA
        )
    return np.concatenate([strip, body], axis=0)


def _top(weights: np.ndarray, k: int = 5) -> List[List[float]]:
    order = np.argsort(-weights)[:k]
    return [[int(i), float(weights[i])] for i in order]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg, model, dataset, samples = model_and_dataset_from_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    records = []
    for i, (d, x) in enumerate(samples):
        res = attention_maps(model, x, args.layer, args.condition_index)
        image = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read image {d['file_name']}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        pic = render_attention(image, res["seg_heatmap"], res["cond_heatmap"], x["expression"], res["layer"])
        path = os.path.join(args.output_dir, f"{i:03d}_attention.png")
        cv2.imwrite(path, cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))
        records.append(
            {
                "png": path,
                "file_name": d["file_name"],
                "expression": x["expression"],
                "layer": res["layer"],
                "selected_query": res["selected_query"],
                "seg_top_queries": _top(res["seg_weights"]),
                "cond_top_queries": _top(res["cond_weights"]),
                "seg_weights": res["seg_weights"].tolist(),
                "cond_weights": res["cond_weights"].tolist(),
            }
        )
        logger.info("wrote %s", path)
    out = {"dataset": dataset, "weights": cfg.MODEL.WEIGHTS, "samples": records}
    write_json(os.path.join(args.output_dir, "attention_maps.json"), out)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layer", type=int, default=-1, help="decoder layer 1..L (negative: from the end; default last)"
    )
    p.add_argument("--condition-index", type=int, default=0, help="which <p> span's condition (default 0)")
    p.add_argument("--output-dir", required=True, help="folder for the PNGs and attention_maps.json")
    add_model_args(p)
    args = p.parse_args(argv)
    if args.max_samples is None:
        args.max_samples = 8  # "a few samples": each one is a picture
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    out = run(parse_args(argv))
    print(
        f"{len(out['samples'])} attention pictures in {os.path.dirname(out['samples'][0]['png']) if out['samples'] else '-'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
