"""Evaluation under ``DATALOADER.ON_BAD_SAMPLE`` (:mod:`flowseg.utils.bad_samples`).

:class:`BadSampleGuard` wraps the model for Detectron2's ``inference_on_dataset``. It drops the
placeholders that :class:`flowseg.data.build.GuardedMapper` returns for unreadable samples, and,
with ``"skip"``, samples the model rejects (a prompt longer than ``MODEL.LLM.MAX_LENGTH``, an empty
expression): a failing batch is re-run one sample at a time. Dropped samples are removed from the
*same* ``inputs`` list that ``inference_on_dataset`` then gives the evaluator, so the metrics are
those of the other samples.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.utils import comm
from torch import nn

from ..utils.bad_samples import BAD_INPUT_ERRORS, annotate_error, check_policy, describe_sample, record_skip

__all__ = ["BadSampleGuard", "write_skipped"]

logger = logging.getLogger(__name__)

_HINT = "DATALOADER.ON_BAD_SAMPLE skip leaves such samples out of the metrics (listed and counted)"


class BadSampleGuard(nn.Module):
    """See the module docstring. ``no_skip_reason``: why skipping is refused for this data set."""

    def __init__(self, model: nn.Module, policy: str, no_skip_reason: str = "") -> None:
        super().__init__()
        self.model = model
        self.policy = check_policy(policy)
        self.no_skip_reason = no_skip_reason
        self.skipped: List[Dict[str, Any]] = []

    def _skip(self, x: Dict[str, Any], e: BaseException) -> None:
        if self.no_skip_reason:
            raise ValueError(
                f"DATALOADER.ON_BAD_SAMPLE=skip cannot leave out {describe_sample(x)}: {self.no_skip_reason}"
            ) from e
        self.skipped.append(record_skip(x, e))

    def forward(self, inputs: List[Dict[str, Any]]) -> List[Any]:
        for x in [x for x in inputs if "bad_sample" in x]:  # unreadable: GuardedMapper's placeholders
            if self.no_skip_reason:
                raise ValueError(
                    f"DATALOADER.ON_BAD_SAMPLE=skip cannot leave out {x['bad_sample']}: {self.no_skip_reason}"
                )
            self.skipped.append(x["bad_sample"])
        inputs[:] = [x for x in inputs if "bad_sample" not in x]
        if not inputs:
            return []
        try:
            return self.model(inputs)
        except BAD_INPUT_ERRORS as e:
            if self.policy == "error":
                if len(inputs) == 1:
                    annotate_error(e, describe_sample(inputs[0]))
                e.add_note(_HINT)
                raise
            if len(inputs) == 1:
                self._skip(inputs[0], e)
                inputs.clear()
                return []
        outputs: List[Any] = []
        kept: List[Dict[str, Any]] = []
        for x in list(inputs):  # which sample of the batch failed: one at a time
            try:
                out = self.model([x])
            except BAD_INPUT_ERRORS as e:
                self._skip(x, e)
                continue
            kept.append(x)
            outputs.extend(out)
        inputs[:] = kept
        return outputs

    def pop_skipped(self) -> List[Dict[str, Any]]:
        """Every process's skipped samples since the last call (all processes must call it)."""
        mine, self.skipped = self.skipped, []
        if comm.get_world_size() == 1:
            return mine
        return list(itertools.chain(*comm.all_gather(mine)))


def write_skipped(output_dir: str, dataset_name: str, skipped: List[Dict[str, Any]]) -> Optional[str]:
    """``output_dir/skipped_samples_<dataset>.json`` with the skipped samples (None if none)."""
    if not skipped or not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"skipped_samples_{dataset_name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(skipped, f, indent=1)
    logger.warning(
        "%s: %d sample(s) skipped (DATALOADER.ON_BAD_SAMPLE=skip), listed in %s",
        dataset_name,
        len(skipped),
        path,
    )
    return path
