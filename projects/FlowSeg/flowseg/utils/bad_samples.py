"""Bad samples: errors that name the sample, and the ``DATALOADER.ON_BAD_SAMPLE`` policy.

A *bad sample* is one whose input cannot be used: an unreadable or truncated image, a missing
file, a ground truth or text that fails a check, a prompt longer than ``MODEL.LLM.MAX_LENGTH``.
The errors raised for it (``OSError`` / ``ValueError`` and their subclasses) are made to name the
sample (file, image id, ref id, sentence id). ``DATALOADER.ON_BAD_SAMPLE``:

* ``"error"`` (default): the run stops with that error;
* ``"skip"``: the sample is left out with a warning. In training another sample of the same data set
  takes its place (reproducibly, :mod:`flowseg.data.mixed`) and the sample is listed in
  ``OUTPUT_DIR/skipped_samples_train.jsonl``; in evaluation it is left out of the metrics, listed in
  ``OUTPUT_DIR/skipped_samples_<dataset>.json`` and counted as ``bad_samples/skipped`` in the results.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping, Optional

__all__ = [
    "BAD_INPUT_ERRORS",
    "ON_BAD_SAMPLE_POLICIES",
    "BadSampleError",
    "annotate_error",
    "check_policy",
    "describe_sample",
    "record_skip",
    "skip_record",
]

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE_POLICIES = ("error", "skip")
#: exception types that mean "this sample's input is bad" (not a bug or a resource problem)
BAD_INPUT_ERRORS = (OSError, ValueError)
_ID_KEYS = ("image_id", "ref_id", "ann_id", "sent_id", "sentence_id", "query_index", "sample_id")


class BadSampleError(ValueError):
    """A sample's input cannot be used; the message names the sample."""


def describe_sample(d: Mapping[str, Any]) -> str:
    """``file_name (image_id=…, ref_id=…, sent_id=…)`` of a dataset / model-input dict."""
    ids = [f"{k}={d[k]}" for k in _ID_KEYS if d.get(k) is not None]
    name = d.get("file_name")
    if name is None:
        return f"sample ({', '.join(ids)})" if ids else "sample (no file_name or ids)"
    return f"{name} ({', '.join(ids)})" if ids else str(name)


def annotate_error(e: BaseException, where: str) -> None:
    """Put ``where`` in front of ``e``'s message (kept type and traceback), or add it as a note."""
    if len(e.args) == 1 and isinstance(e.args[0], str):
        if where not in e.args[0]:
            e.args = (f"{where}: {e.args[0]}",)
    elif isinstance(e, OSError) and e.filename is not None:
        e.add_note(f"while reading the sample {where}")
    else:
        e.add_note(f"sample: {where}")


def check_policy(policy: str) -> str:
    if policy not in ON_BAD_SAMPLE_POLICIES:
        raise ValueError(f"DATALOADER.ON_BAD_SAMPLE must be one of {ON_BAD_SAMPLE_POLICIES}, got {policy!r}")
    return policy


def skip_record(d: Mapping[str, Any], e: BaseException) -> Dict[str, Any]:
    """What is written about a skipped sample: its ids and the cause."""
    rec: Dict[str, Any] = {k: d[k] for k in ("file_name",) + _ID_KEYS if d.get(k) is not None}
    rec["cause"] = f"{type(e).__name__}: {e}"
    return {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in rec.items()}


def record_skip(d: Mapping[str, Any], e: BaseException, log_file: Optional[str] = None) -> Dict[str, Any]:
    """Warn about a skipped sample and append it to ``log_file`` (json lines) when given."""
    rec = skip_record(d, e)
    logger.warning("ON_BAD_SAMPLE=skip: skipped %s: %s", describe_sample(d), rec["cause"])
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        with open(log_file, "a", encoding="utf-8") as f:  # one short line: appends do not interleave
            f.write(json.dumps(rec) + "\n")
    return rec
