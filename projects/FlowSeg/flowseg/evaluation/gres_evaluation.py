"""Generalized referring segmentation evaluator (gRefCOCO: several targets or none).

Metrics, in percent (the GRES protocol of Liu et al. 2023):

* cIoU = ΣI / ΣU over all samples; a no-target sample adds I = 0 and U = its predicted area
  (0 when it is answered empty), a targeted sample answered "no target" adds I = 0, U = |GT|;
* gIoU = mean per-sample IoU, a no-target sample counting 1 when answered empty and 0 otherwise;
* N-acc = no-target samples answered empty / no-target samples;
* T-acc = targeted samples not answered empty / targeted samples;
* cIoU / gIoU of the single-target and the multi-target samples (``cIoU_single``, ``cIoU_multi``).

A sample is "answered empty" when the output's ``no_target`` flag is set, or, without a flag,
when its mask is empty; its ground truth is no-target when the input says ``no_target`` or, without
that key, when ``gt_mask`` is empty.

Threshold choice: when the output carries ``query_scores`` (p(condition | q) of every query) and
``candidates`` (every query's final mask), the evaluator also scores every pair of
``SCORE_GRID`` x ``NO_TARGET_GRID`` thresholds of :func:`flowseg.modeling.meta_arch.gres.select_targets`
and reports the pair with the best gIoU (``sweep_*``; the whole table goes to
``gres_threshold_sweep.json``). Run it on val and put the pair into ``MODEL.FLOWSEG.GRES``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.utils.file_io import PathManager

from .metrics import as_bool_array, candidates_intersection_union, cumulative_iou, mean_iou
from .referring_evaluation import MaskRecordEvaluator, SampleMasks

__all__ = ["GRESEvaluator", "gres_metrics", "SCORE_GRID", "NO_TARGET_GRID"]

logger = logging.getLogger(__name__)

SCORE_GRID: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NO_TARGET_GRID: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _counted_iu(records: Sequence[Dict[str, Any]]) -> Tuple[List[int], List[int]]:
    # an answer flagged "no target" is an empty mask: I = 0, U = |GT|
    inter = [0 if r["pred_no_target"] else r["intersection"] for r in records]
    union = [r["gt_area"] if r["pred_no_target"] else r["union"] for r in records]
    return inter, union


def gres_metrics(records: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """GRES metrics (percent) of records with ``intersection``, ``union``, ``gt_no_target``,
    ``pred_no_target``, ``gt_area`` and ``num_targets`` (see the module docstring for the rules)."""
    res: Dict[str, float] = OrderedDict()
    inter, union = _counted_iu(records)
    res["cIoU"] = 100.0 * cumulative_iou(inter, union)
    res["gIoU"] = 100.0 * mean_iou(inter, union)
    empty = [r for r in records if r["gt_no_target"]]
    targeted = [r for r in records if not r["gt_no_target"]]
    nan = float("nan")
    res["N-acc"] = 100.0 * np.mean([r["pred_no_target"] for r in empty]) if empty else nan
    res["T-acc"] = 100.0 * np.mean([not r["pred_no_target"] for r in targeted]) if targeted else nan
    for name, subset in (
        ("single", [r for r in targeted if r["num_targets"] == 1]),
        ("multi", [r for r in targeted if r["num_targets"] > 1]),
    ):
        i, u = _counted_iu(subset)
        res[f"cIoU_{name}"] = 100.0 * cumulative_iou(i, u) if subset else nan
        res[f"gIoU_{name}"] = 100.0 * mean_iou(i, u) if subset else nan
    res["num_samples"] = len(records)
    res["num_no_target"] = len(empty)
    res["num_multi_target"] = sum(1 for r in targeted if r["num_targets"] > 1)
    return res


def _sweep_fields(ref: Dict[str, Any], gt: np.ndarray) -> Optional[Dict[str, Any]]:
    """Per score threshold of SCORE_GRID: (I, U, answered-empty) of the union that
    ``select_targets`` would keep, plus the best score (the no-target test)."""
    scores, cand = ref.get("query_scores"), ref.get("candidates")
    if scores is None or cand is None or len(cand) == 0:
        return None
    scores = np.asarray([float(s) for s in scores])
    cand = as_bool_array(cand)
    best = int(np.argmax(scores))
    rows = []
    for t in SCORE_GRID:
        kept = np.flatnonzero(scores >= t)
        union = cand[kept if kept.size else [best]].any(axis=0)
        i, u = candidates_intersection_union(union[None], gt)
        rows.append([int(i[0]), int(u[0])])
    return {"sweep_best_score": float(scores[best]), "sweep_iu": rows}


def _swept_records(records: List[Dict[str, Any]], ti: int, nt: float) -> List[Dict[str, Any]]:
    out = []
    for r in records:
        empty = r["sweep_best_score"] < nt
        i, u = (0, r["gt_area"]) if empty else r["sweep_iu"][ti]
        out.append({**r, "intersection": i, "union": u, "pred_no_target": empty})
    return out


class GRESEvaluator(MaskRecordEvaluator):
    """cIoU / gIoU / N-acc / T-acc of gRefCOCO-style data, in percent (module docstring).

    Inputs need ``gt_mask`` (the union of the targets, empty for none) and may have
    ``no_target`` / ``ann_ids``; outputs need ``ref_seg = {"mask", "score", "no_target"?,
    "query_scores"?, "candidates"?}``. Returns ``{"gres": {...}}``; with ``output_dir`` also
    ``per_expression.json``, ``metrics.json`` and (with a sweep) ``gres_threshold_sweep.json``.
    """

    task_key = "gres"
    _sweep_table: List[Dict[str, float]] = []

    def reset(self) -> None:
        super().reset()
        self._sweep_table = []

    def _extra_fields(self, inp: Dict[str, Any], ref: Dict[str, Any], masks: SampleMasks) -> Dict[str, Any]:
        pred, gt, _ = masks
        gt_no_target = bool(inp["no_target"]) if "no_target" in inp else not gt.any()
        if gt_no_target and gt.any():
            raise ValueError(
                f"GRESEvaluator: sample image_id={inp.get('image_id')} sent_id={inp.get('sent_id')} "
                "is marked no_target but its gt_mask is not empty"
            )
        pred_no_target = bool(ref["no_target"]) if "no_target" in ref else not pred.any()
        n = len(inp["ann_ids"]) if "ann_ids" in inp else int(not gt_no_target)
        fields = {
            "gt_no_target": gt_no_target,
            "pred_no_target": pred_no_target,
            "num_targets": n,
            "gt_area": int(gt.sum()),
        }
        fields["queries"] = [int(q) for q in ref.get("queries", [])]
        sweep = _sweep_fields(ref, gt)
        if sweep is not None:
            fields.update(sweep)
        return fields

    def _summarize(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        res = gres_metrics(records)
        table = self.sweep(records)
        if table:
            best = max(table, key=lambda row: (row["gIoU"], row["cIoU"]))
            res["sweep_score_threshold"] = best["score_threshold"]
            res["sweep_no_target_threshold"] = best["no_target_threshold"]
            for k in ("gIoU", "cIoU", "N-acc", "T-acc"):
                res[f"sweep_{k}"] = best[k]
            self._sweep_table = table
        return res

    @staticmethod
    def sweep(records: List[Dict[str, Any]]) -> List[Dict[str, float]]:
        """Metrics of every (score, no-target) threshold pair; [] unless every record has a sweep."""
        if not records or any("sweep_iu" not in r for r in records):
            return []
        table = []
        for ti, t in enumerate(SCORE_GRID):
            for nt in NO_TARGET_GRID:
                m = gres_metrics(_swept_records(records, ti, nt))
                table.append({"score_threshold": t, "no_target_threshold": nt, **m})
        return table

    def _write(self, records: List[Dict[str, Any]], results: Dict[str, Dict[str, float]]) -> None:
        super()._write(records, results)
        table = self._sweep_table
        if table:
            with PathManager.open(os.path.join(self._output_dir, "gres_threshold_sweep.json"), "w") as f:
                json.dump(table, f)
