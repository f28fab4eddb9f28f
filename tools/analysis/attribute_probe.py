#!/usr/bin/env python
"""Which attributes does the segmentor itself recognise? (synthetic benchmark diagnostic)

Selection by meaning can only work for attributes the queries carry. For a generic-mode model
with a class head (the stage-1 segmentor) on a panoptic data set whose category names are
attribute words ("red circle": colour, then shape), this tool takes, for every ground-truth
thing segment, the query whose mask overlaps it best and reports:

* ``mask_recall``: fraction of segments with a query mask of IoU >= 0.5 (proposals);
* per attribute (word position in the category name): accuracy of that word in the query's
  predicted class, next to chance (1 / number of values of the attribute).

Writes ``attribute_probe.json`` and ``attribute_probe.md``.

    python tools/analysis/attribute_probe.py --config-file configs/synthetic/stage1_synthpan_cpu.yaml \
        --weights output/main/stage1/model_final.pth --dataset synthpan_val --max-samples 100 \
        --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    default_dataset,
    iterate_dataset,
    load_model,
    markdown_table,
    setup_cfg,
    setup_logging,
    write_report,
)
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.modeling.postprocessing import sem_seg_postprocess  # noqa: E402
from PIL import Image  # noqa: E402

logger = logging.getLogger("flowseg.analysis.attribute_probe")

__all__ = ["ATTRIBUTES", "attribute_probe", "panoptic_segments", "parse_args", "run", "main"]

#: Attribute names by word position in a synthetic category name ("red circle").
ATTRIBUTES = ("colour", "shape")


def panoptic_segments(d: Dict[str, Any]) -> List[Tuple[np.ndarray, int]]:
    """``(mask HxW bool, contiguous category id)`` of every segment of a COCO-panoptic dataset dict."""
    png = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
    return [(ids == s["id"], int(s["category_id"])) for s in d["segments_info"]]


@torch.no_grad()
def attribute_probe(
    model: torch.nn.Module,
    samples: Iterable[Tuple[Dict[str, Any], Dict[str, Any]]],
    class_names: Sequence[str],
    thing_ids: Sequence[int],
    attributes: Sequence[str] = ATTRIBUTES,
) -> Dict[str, Any]:
    """Probe ``model`` (generic mode, class head) on ``(dataset dict, model input)`` pairs."""
    if getattr(model, "mode", None) != "generic" or getattr(model, "condition_head", None) is not None:
        raise ValueError(
            "attribute_probe needs a generic-mode model with a class head (no LLM): a stage-1 config"
        )
    words = [name.split() for name in class_names]
    values = {a: {w[i] for w in words if len(w) == len(attributes)} for i, a in enumerate(attributes)}
    things = set(thing_ids)
    n = recalled = 0
    correct = dict.fromkeys(attributes, 0)
    for d, x in samples:
        images = model.preprocess_image([x])
        outputs, _ = model.run_head([x], images)
        h, w = int(d["height"]), int(d["width"])
        masks = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear")
        masks = sem_seg_postprocess(masks[0], images.image_sizes[0], h, w) > 0  # [Q,H,W]
        labels = outputs["pred_logits"][0, :, :-1].argmax(-1).tolist()  # no-object left out
        for gt, cat in panoptic_segments(d):
            if cat not in things or not gt.any():
                continue
            g = torch.from_numpy(gt)
            inter = (masks & g).flatten(1).sum(1).double()
            iou = inter / (masks | g).flatten(1).sum(1).clamp(min=1).double()
            q = int(iou.argmax())
            n += 1
            recalled += bool(iou[q] >= 0.5)
            for i, a in enumerate(attributes):
                correct[a] += words[labels[q]][i : i + 1] == words[cat][i : i + 1]
    if n == 0:
        raise ValueError("no thing segments in the given samples")
    return {
        "num_segments": n,
        "mask_recall": recalled / n,
        "attributes": {
            a: {
                "accuracy": correct[a] / n,
                "chance": 1.0 / max(len(values[a]), 1),
                "values": sorted(values[a]),
            }
            for a in attributes
        },
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--output-dir", default=None, help="write attribute_probe.{json,md} here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = setup_cfg(args.config_file, args.weights, args.opts)
    model = load_model(cfg)
    dataset = default_dataset(cfg, args.dataset)
    meta = MetadataCatalog.get(dataset)
    thing_ids = list(meta.thing_dataset_id_to_contiguous_id.values())
    result = attribute_probe(
        model, iterate_dataset(cfg, dataset, args.max_samples), meta.stuff_classes, thing_ids
    )
    result["dataset"] = dataset
    rows = [["mask recall (IoU >= 0.5)", result["mask_recall"], "–"]]
    rows += [[a, r["accuracy"], r["chance"]] for a, r in result["attributes"].items()]
    result["markdown"] = markdown_table(["", "accuracy", "chance"], rows, digits=3)
    write_report(args.output_dir, "attribute_probe", result)
    print(f"{dataset}: {result['num_segments']} thing segments\n{result['markdown']}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    setup_logging()
    run(parse_args(argv))


if __name__ == "__main__":
    main()
