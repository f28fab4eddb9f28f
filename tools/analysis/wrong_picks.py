#!/usr/bin/env python
"""Which object does a failed selection pick? (referring diagnostic)

For every expression of a refer-format data set (RefCOCO/+/g, the synthetic ``synthref_*``), the
model's output mask is matched to the instance annotations of its image (the data set's
``instances.json``): the instance it overlaps best, if that IoU is >= ``--min-iou`` (0.5). The
expression is then

* ``correct``: that instance is the referred one;
* ``same category``: another instance of the referred one's category (RefCOCO's classic error:
  the wrong person);
* ``other category``: an instance of another category;
* ``no instance``: no instance reaches the IoU (a poor mask, several objects merged, background).

``--attribute-words colour shape``: category names are that many words (the synthetic data's
"red circle"); the wrong picks (same + other category) are also counted by which of those words
the picked instance's category shares with the referred one's ("colour= shape≠": the right
colour, another shape). ``--by-synthetic-kind``: one more row per expression kind.
Writes ``wrong_picks.json`` and ``wrong_picks.md``.

    python tools/analysis/wrong_picks.py --config-file output/main/config.yaml \\
        --weights output/main/model_final.pth --dataset synthref_test \\
        --attribute-words colour shape --by-synthetic-kind --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    group_by_synthetic_kind,
    markdown_table,
    model_and_dataset_from_args,
    setup_logging,
    write_report,
)
from detectron2.data import MetadataCatalog  # noqa: E402
from flowseg.data.dataset_mappers.referring_masks import rasterize_segmentation  # noqa: E402
from flowseg.data.datasets.refcoco import read_json  # noqa: E402

__all__ = ["OUTCOMES", "pick_outcome", "summarize_picks", "wrong_picks", "parse_args", "run", "main"]

OUTCOMES = ("correct", "same category", "other category", "no instance")
#: one instance of an image: (annotation id, category id, HxW bool mask)
Instance = Tuple[Any, Any, np.ndarray]


def pick_outcome(
    pred: np.ndarray, target_ann_id: Any, instances: Sequence[Instance], min_iou: float = 0.5
) -> Tuple[str, Optional[Any]]:
    """``(outcome, category id of the picked instance or None)`` of an output mask ``pred``
    (HxW bool) among its image's ``instances``; the outcome is one of :data:`OUTCOMES`."""
    target = [cat for ann, cat, _ in instances if ann == target_ann_id]
    if not target:
        raise ValueError(f"annotation {target_ann_id} is not among the image's instances")
    best, best_iou = None, -1.0
    for ann, cat, mask in instances:
        union = np.logical_or(pred, mask).sum()
        iou = np.logical_and(pred, mask).sum() / union if union else 0.0
        if iou > best_iou:
            best, best_iou = (ann, cat), iou
    if best_iou < min_iou:  # instances hold the target: best is set
        return "no instance", None
    if best[0] == target_ann_id:
        return "correct", best[1]
    return ("same category" if best[1] == target[0] else "other category"), best[1]


def _agreement(target_name: str, picked_name: str, attribute_words: Sequence[str]) -> str:
    t, p = target_name.split(), picked_name.split()
    if len(t) != len(attribute_words) or len(p) != len(attribute_words):
        raise ValueError(
            f"--attribute-words {' '.join(attribute_words)} needs category names of "
            f"{len(attribute_words)} words, got {target_name!r} / {picked_name!r}"
        )
    return " ".join(f"{a}{'=' if x == y else '≠'}" for a, x, y in zip(attribute_words, t, p))


def summarize_picks(records: Sequence[Dict[str, Any]], attribute_words: Sequence[str] = ()) -> Dict[str, Any]:
    """Counts and shares (% of all records) of each outcome; with ``attribute_words``, the
    wrong picks' counts by word agreement (records need ``target_name`` / ``picked_name``)."""
    n = len(records)
    counts = Counter(r["outcome"] for r in records)
    out: Dict[str, Any] = {
        "num_samples": n,
        "counts": {o: counts.get(o, 0) for o in OUTCOMES},
        "shares": {o: 100.0 * counts.get(o, 0) / n if n else None for o in OUTCOMES},
    }
    if attribute_words:
        wrong = [r for r in records if r["outcome"] in ("same category", "other category")]
        agree = Counter(_agreement(r["target_name"], r["picked_name"], attribute_words) for r in wrong)
        out["wrong_pick_agreement"] = dict(sorted(agree.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def _image_instances(dataset: str) -> Tuple[Dict[Any, List[Dict[str, Any]]], Dict[Any, str]]:
    """Annotations by image id and category names by id, from the data set's ``instances.json``."""
    meta = MetadataCatalog.get(dataset)
    if getattr(meta, "evaluator_type", None) != "refer":
        raise ValueError(
            f"{dataset} is not a single-target refer-format data set (RefCOCO/+/g layout): "
            "nothing to match the outputs against"
        )
    path = os.path.join(meta.refer_root, meta.refer_dataset, "instances.json")
    data = read_json(path, "wrong_picks", "instances file", "expected COCO-style json")
    by_image: Dict[Any, List[Dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image, {c["id"]: c["name"] for c in data.get("categories", [])}


@torch.no_grad()
def wrong_picks(
    model: torch.nn.Module,
    samples: Iterable[Tuple[Dict[str, Any], Dict[str, Any]]],
    dataset: str,
    min_iou: float = 0.5,
) -> List[Dict[str, Any]]:
    """One record per sample: ``expression, outcome, target_name, picked_name``."""
    by_image, names = _image_instances(dataset)
    records = []
    cached: Tuple[Any, List[Instance]] = (None, [])  # the expressions of an image come in a row
    for d, x in samples:
        pred = model([x])[0]["ref_seg"]["mask"]
        pred = (pred.cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)).astype(bool)
        if cached[0] != d["image_id"]:
            h, w = int(d["height"]), int(d["width"])
            cached = (
                d["image_id"],
                [
                    (a["id"], a["category_id"], rasterize_segmentation(a["segmentation"], h, w).astype(bool))
                    for a in by_image.get(d["image_id"], [])
                ],
            )
        instances = cached[1]
        outcome, picked = pick_outcome(pred, d["ann_id"], instances, min_iou)
        records.append(
            {
                "expression": d["expression"],
                "outcome": outcome,
                "target_name": names.get(d["category_id"], str(d["category_id"])),
                "picked_name": None if picked is None else names.get(picked, str(picked)),
            }
        )
    return records


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--min-iou", type=float, default=0.5, help="IoU an output needs to pick an instance")
    p.add_argument("--attribute-words", nargs="*", default=[], help="names of the words of a category name")
    p.add_argument("--by-synthetic-kind", action="store_true", help="one row per synthetic expression kind")
    p.add_argument("--output-dir", default=None, help="write wrong_picks.{json,md} here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    _, model, dataset, samples = model_and_dataset_from_args(args)
    records = wrong_picks(model, samples, dataset, args.min_iou)
    groups = {"all": records, **(group_by_synthetic_kind(records) if args.by_synthetic_kind else {})}
    rows = {g: summarize_picks(rs, args.attribute_words) for g, rs in groups.items() if rs}
    table = [[g, r["num_samples"], *(r["shares"][o] for o in OUTCOMES)] for g, r in rows.items()]
    markdown = markdown_table(["expressions", "N", *(f"{o} %" for o in OUTCOMES)], table, digits=1)
    if args.attribute_words:
        agree = [[g, k, v] for g, r in rows.items() for k, v in r["wrong_pick_agreement"].items()]
        markdown += "\n" + markdown_table(["expressions", "wrong pick's words", "count"], agree)
    result = {"dataset": dataset, "min_iou": args.min_iou, "groups": rows, "markdown": markdown}
    write_report(args.output_dir, "wrong_picks", result)
    print(f"{dataset}: {len(records)} expressions\n{markdown}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    setup_logging()
    run(parse_args(argv))


if __name__ == "__main__":
    main()
