"""Referring expression segmentation evaluator (RefCOCO / RefCOCO+ / RefCOCOg).

Reports, in percent: cIoU, gIoU (FlowSeg Table 1), cBIoU / gBIoU (Boundary IoU, Table 7, 8),
oracle cIoU and oracle gIoU (each sample's best-IoU candidate among all queries, Table 5; only
when the model returns candidates, ``TEST.RETURN_CANDIDATES``), Pr@0.5..0.9. Metric conventions
are documented in :mod:`flowseg.evaluation.metrics`.

The oracle picks, per sample, the candidate of highest IoU. Since the selected mask is one of the
candidates, each sample's oracle IoU is at least its IoU, so **oracle gIoU >= gIoU**. Oracle cIoU
is no such bound: cIoU is a ratio of sums, and a candidate of higher IoU can have a larger union
(two samples suffice: ``tests/test_evaluators.py``), so it can be below the selected cIoU.

Every sentence of every ref is its own sample. The model's outputs are reduced to a few counts
per sample in :meth:`process` (no masks are kept), gathered to the main process and aggregated
there. When every ground-truth mask is empty a warning is logged and the metrics get
``all_empty: True`` (empty-vs-empty counts IoU 1). With ``output_dir`` set, ``per_expression.json`` lists every sample's IoU / oracle IoU /
Boundary IoU / score (failure-case analysis of Table 6: pick the samples where one model fails
and re-score them with another's file) and ``metrics.json`` the results.
"""

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..utils.jsonable import to_jsonable
from .metrics import (
    PR_THRESHOLDS,
    as_bool_array,
    boundary_intersection_union,
    candidates_intersection_union,
    cumulative_iou,
    intersection_union,
    iou_from_iu,
    mean_iou,
    precision_at,
)

__all__ = ["ReferringEvaluator", "MaskRecordEvaluator", "SampleMasks", "ciou_giou"]

logger = logging.getLogger(__name__)


def _first(inp: Dict[str, Any], keys: Tuple[str, ...]) -> Any:
    """Value of the first of ``keys`` present in ``inp`` (None if none is)."""
    return next((inp[k] for k in keys if k in inp), None)


def _iu(records: List[Dict[str, Any]], prefix: str = "") -> Tuple[List[int], List[int]]:
    """The records' ``{prefix}intersection`` and ``{prefix}union`` fields."""
    return [r[f"{prefix}intersection"] for r in records], [r[f"{prefix}union"] for r in records]


def ciou_giou(records: List[Dict[str, Any]], prefix: str = "") -> Tuple[float, float]:
    """``(cIoU, gIoU)`` in percent of the records' ``{prefix}intersection`` / ``{prefix}union``."""
    inter, union = _iu(records, prefix)
    return 100.0 * cumulative_iou(inter, union), 100.0 * mean_iou(inter, union)


class SampleMasks(NamedTuple):
    """One sample's masks at the original resolution (HxW bool); ``ignore`` is None without one."""

    pred: np.ndarray
    gt: np.ndarray
    ignore: Optional[np.ndarray]


def _expression(inp: Dict[str, Any]) -> Optional[str]:
    """The referring text of a dataset dict: ``expression``, or ``sentence`` (str or refer-API dict)."""
    text = inp.get("expression", inp.get("sentence"))
    if isinstance(text, dict):  # refer API sentence {"sent": ..., "raw": ..., "sent_id": ...}
        text = text.get("sent", text.get("raw"))
    return text


class MaskRecordEvaluator(DatasetEvaluator):
    """Base of the referring / reasoning evaluators: one small record per (input, output) pair.

    Subclasses add fields in :meth:`_extra_fields` and aggregate in :meth:`_summarize`.
    """

    task_key: str = ""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True) -> None:
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._records: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._records = []

    # ------------------------------------------------------------------ per sample
    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            self._records.append(self._record(inp, out))

    def _record(self, inp: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
        if "gt_mask" not in inp:
            raise KeyError(f"{type(self).__name__} needs input['gt_mask'] (HxW, 1 = target)")
        if "ref_seg" not in out:
            raise KeyError(f"{type(self).__name__} needs output['ref_seg'] = {{'mask', 'score'}}")
        ref = out["ref_seg"]
        gt = as_bool_array(inp["gt_mask"])
        pred = as_bool_array(ref["mask"])
        ignore = inp.get("ignore_mask")
        ignore = None if ignore is None else as_bool_array(ignore)
        inter, union = intersection_union(pred, gt, ignore)
        score = ref.get("score")
        record: Dict[str, Any] = {
            "image_id": to_jsonable(inp.get("image_id")),
            "ref_id": to_jsonable(_first(inp, ("ref_id", "sample_id"))),
            # RefCOCO dicts say "sent_id", ReasonSeg dicts "query_index" (which query of the image)
            "sentence_id": to_jsonable(_first(inp, ("sentence_id", "sent_id", "query_index"))),
            "expression": _expression(inp),
            "task": inp.get("task"),
            "score": None if score is None else float(score),
            "intersection": inter,
            "union": union,
            "iou": float(iou_from_iu(inter, union)),
            "gt_empty": not bool((gt if ignore is None else gt & ~ignore).any()),
        }
        record.update(self._extra_fields(inp, ref, SampleMasks(pred, gt, ignore)))
        return record

    def _extra_fields(self, inp: Dict[str, Any], ref: Dict[str, Any], masks: SampleMasks) -> Dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ aggregate
    def _gather(self) -> Optional[List[Dict[str, Any]]]:
        """All processes' records on the main process (in rank order); None elsewhere."""
        if not self._distributed:
            return list(self._records)
        comm.synchronize()
        gathered = comm.gather(self._records, dst=0)
        if not comm.is_main_process():
            return None
        return list(itertools.chain(*gathered))

    def _summarize(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self._gather()
        if records is None:
            return {}
        if not records:
            logger.warning(f"{type(self).__name__} on {self._dataset_name}: no predictions received.")
            return {}
        metrics = self._summarize(records)
        if all(r.get("gt_empty") for r in records):
            # empty-vs-empty scores IoU 1 (LISA's rule): every metric would read 100 for any model
            logger.warning(
                f"{type(self).__name__} on {self._dataset_name}: the ground-truth masks of all "
                f"{len(records)} samples are empty, so the metrics do not measure the model "
                "(an empty prediction scores 100); check the annotations. Flagged as 'all_empty'."
            )
            metrics["all_empty"] = True
        logger.info(
            f"{type(self).__name__} on {self._dataset_name} ({len(records)} samples):\n"
            + create_small_table(metrics)
        )
        results = OrderedDict({self.task_key: metrics})
        if self._output_dir:
            self._write(records, results)
        return results

    def _write(self, records: List[Dict[str, Any]], results: Dict[str, Dict[str, float]]) -> None:
        PathManager.mkdirs(self._output_dir)
        with PathManager.open(os.path.join(self._output_dir, "per_expression.json"), "w") as f:
            json.dump(records, f)
        with PathManager.open(os.path.join(self._output_dir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)


class ReferringEvaluator(MaskRecordEvaluator):
    """cIoU / gIoU / cBIoU / gBIoU / oracle cIoU / oracle gIoU / Pr@k of referring segmentation, in
    percent.

    Inputs need ``gt_mask`` (HxW at the original resolution) and may have ``ignore_mask``;
    outputs need ``ref_seg = {"mask": [H,W] bool, "score": float, "candidates": [N,H,W] bool
    (optional)}``. Without candidates no oracle value is reported (the keys are absent and the log
    says why). Returns ``{"referring": {...}}`` on the main process.
    """

    task_key = "referring"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        boundary_dilation_ratio: float = 0.02,
    ) -> None:
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)
        self._boundary_dilation_ratio = boundary_dilation_ratio

    def _extra_fields(self, inp: Dict[str, Any], ref: Dict[str, Any], masks: SampleMasks) -> Dict[str, Any]:
        pred, gt, ignore = masks
        b_inter, b_union = boundary_intersection_union(pred, gt, self._boundary_dilation_ratio, ignore)
        fields: Dict[str, Any] = {
            "b_intersection": b_inter,
            "b_union": b_union,
            "biou": float(iou_from_iu(b_inter, b_union)),
            "oracle_iou": None,
        }
        candidates = ref.get("candidates")
        if candidates is not None and len(candidates) > 0:
            inters, unions = candidates_intersection_union(candidates, gt, ignore)
            best = int(np.argmax(iou_from_iu(inters, unions)))  # first of equal bests
            fields.update(
                oracle_iou=float(iou_from_iu(inters[best], unions[best])),
                oracle_query=best,
                oracle_intersection=int(inters[best]),
                oracle_union=int(unions[best]),
            )
        return fields

    def _summarize(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        res: Dict[str, float] = OrderedDict()
        res["cIoU"], res["gIoU"] = ciou_giou(records)
        res["cBIoU"], res["gBIoU"] = ciou_giou(records, "b_")
        with_cand = [r for r in records if r.get("oracle_iou") is not None]
        if with_cand:
            if len(with_cand) < len(records):
                logger.warning(
                    f"oracle cIoU / gIoU over the {len(with_cand)} of {len(records)} samples that have candidates"
                )
            res["oracle_cIoU"], res["oracle_gIoU"] = ciou_giou(with_cand, "oracle_")
        else:
            logger.info(
                "no oracle cIoU / gIoU: the outputs carry no candidates (TEST.RETURN_CANDIDATES is off)"
            )
        for t, p in precision_at([r["iou"] for r in records], PR_THRESHOLDS).items():
            res[f"Pr@{t}"] = 100.0 * p
        res["num_samples"] = len(records)
        return res
