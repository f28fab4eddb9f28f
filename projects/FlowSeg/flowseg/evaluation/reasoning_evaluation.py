"""Reasoning segmentation evaluator (ReasonSeg, LISA's protocol; FlowSeg Table 2).

gIoU / cIoU in percent over all samples and split into short-phrase queries
(``is_sentence`` False) and long sentence queries (``is_sentence`` True), as LISA reports them.
Pixels of ReasonSeg's "ignore" polygons (``input["ignore_mask"]``) are left out of I and U.
Which query of an image is evaluated (LISA: the first; optionally all) is decided by the dataset;
every (input, output) pair given to :meth:`process` is one sample.
"""

from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np

from .metrics import cumulative_iou, mean_iou
from .referring_evaluation import MaskRecordEvaluator

__all__ = ["ReasoningEvaluator"]


class ReasoningEvaluator(MaskRecordEvaluator):
    """Returns ``{"reasoning": {"gIoU", "cIoU", "short_gIoU", "short_cIoU", "long_gIoU",
    "long_cIoU", "num_samples"}}`` on the main process (a split without samples reports NaN)."""

    task_key = "reasoning"

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True) -> None:
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)

    def _extra_fields(
        self,
        inp: Dict[str, Any],
        ref: Dict[str, Any],
        pred: np.ndarray,
        gt: np.ndarray,
        ignore: Optional[np.ndarray],
    ) -> Dict[str, Any]:
        is_sentence = inp.get("is_sentence")
        return {"is_sentence": None if is_sentence is None else bool(is_sentence)}

    def _summarize(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        def both(rs: List[Dict[str, Any]]) -> Dict[str, float]:
            i = [r["intersection"] for r in rs]
            u = [r["union"] for r in rs]
            return {"gIoU": 100.0 * mean_iou(i, u), "cIoU": 100.0 * cumulative_iou(i, u)}

        res: Dict[str, float] = OrderedDict(both(records))
        for name, flag in (("short", False), ("long", True)):
            for k, v in both([r for r in records if r["is_sentence"] is flag]).items():
                res[f"{name}_{k}"] = v
        res["num_samples"] = len(records)
        return res
