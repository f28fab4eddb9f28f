"""Reasoning segmentation evaluator (ReasonSeg, LISA's protocol; FlowSeg Table 2).

gIoU / cIoU in percent over all samples and split into short-phrase queries
(``is_sentence`` False) and long sentence queries (``is_sentence`` True), as LISA reports them.
Pixels of ReasonSeg's "ignore" polygons (``input["ignore_mask"]``) are left out of I and U.
Which query of an image is evaluated (LISA: the first; optionally all) is decided by the dataset;
every (input, output) pair given to :meth:`process` is one sample.
"""

from collections import OrderedDict
from typing import Any, Dict, List

from .referring_evaluation import MaskRecordEvaluator, SampleMasks, ciou_giou

__all__ = ["ReasoningEvaluator"]


class ReasoningEvaluator(MaskRecordEvaluator):
    """Returns ``{"reasoning": {"gIoU", "cIoU", "short_gIoU", "short_cIoU", "long_gIoU",
    "long_cIoU", "num_samples"}}`` on the main process (a split without samples reports NaN)."""

    task_key = "reasoning"

    def _extra_fields(self, inp: Dict[str, Any], ref: Dict[str, Any], masks: SampleMasks) -> Dict[str, Any]:
        is_sentence = inp.get("is_sentence")
        return {"is_sentence": None if is_sentence is None else bool(is_sentence)}

    def _summarize(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        def both(rs: List[Dict[str, Any]]) -> Dict[str, float]:
            c_iou, g_iou = ciou_giou(rs)
            return {"gIoU": g_iou, "cIoU": c_iou}

        res: Dict[str, float] = OrderedDict(both(records))
        for name, flag in (("short", False), ("long", True)):
            for k, v in both([r for r in records if r["is_sentence"] is flag]).items():
                res[f"{name}_{k}"] = v
        res["num_samples"] = len(records)
        return res
