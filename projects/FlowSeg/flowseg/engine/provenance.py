"""Which model gave which numbers: weights checksum, config hash and the record of an evaluation.

Every metrics file names the weights it was computed from (path and sha256), the iteration and a
hash of the config, so that results in one output folder can be told apart and results in
several folders compared (``tools/compare_runs.py``). Checkpoints reach several GB at paper size:
a file's sha256 is cached next to it (``<file>.sha256``, keyed by size and modification time), so
it is computed once per file, not once per evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, Optional

from detectron2.config import CfgNode

__all__ = ["config_sha256", "evaluation_record", "file_sha256", "same_run"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22


def _stat_key(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def file_sha256(path: str) -> str:
    """sha256 (hex) of ``path``, read from ``<path>.sha256`` when that was written for the file's
    current size and modification time; otherwise computed and cached there (when writable)."""
    cache = path + ".sha256"
    key = _stat_key(path)
    try:
        with open(cache) as f:
            cached_key, digest = f.read().rsplit(" ", 1)
        if cached_key == key and len(digest.strip()) == 64:
            return digest.strip()
    except (OSError, ValueError):
        pass  # no cache yet, or another file's: compute
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        with open(cache, "w") as f:
            f.write(f"{key} {digest}")
    except OSError:
        logger.info("Cannot cache the checksum of %s next to it; it is recomputed next time", path)
    return digest


def config_sha256(cfg: CfgNode) -> str:
    """sha256 of the config without ``OUTPUT_DIR`` and ``MODEL.WEIGHTS``: the same recipe gets the
    same hash in any output folder; the weights are recorded on their own."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = ""
    c.MODEL.WEIGHTS = ""
    return hashlib.sha256(c.dump(sort_keys=True).encode()).hexdigest()


def _weights_at(cfg: CfgNode, iteration: Optional[int]) -> Optional[str]:
    """The checkpoint holding the evaluated weights: ``MODEL.WEIGHTS`` after loading
    (``--eval-only``), or the file the checkpointer wrote at ``iteration`` during training (it runs
    before Detectron2's EvalHook); None when the evaluated weights were not saved."""
    if iteration is None:
        return cfg.MODEL.WEIGHTS or None
    # Detectron2's storage holds MAX_ITER after the loop and the 0-based iteration within it
    final = iteration >= cfg.SOLVER.MAX_ITER
    name = "model_final.pth" if final else f"model_{iteration:07d}.pth"
    path = os.path.join(cfg.OUTPUT_DIR, name)
    return path if os.path.isfile(path) else None


def evaluation_record(
    cfg: CfgNode, iteration: Optional[int], seconds: Optional[Dict[str, float]] = None
) -> Dict[str, Any]:
    """What an evaluation was run on: weights (path, sha256), iteration, config hash, time and the
    wall-clock seconds of each data set. ``iteration`` is the training iteration (None for
    ``--eval-only``)."""
    weights = _weights_at(cfg, iteration)
    record: Dict[str, Any] = {
        "weights": os.path.abspath(weights) if weights else None,
        "weights_sha256": None,
        "iteration": iteration,
        "config_sha256": config_sha256(cfg),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": dict(seconds or {}),
    }
    if weights and os.path.isfile(weights):
        record["weights_sha256"] = file_sha256(weights)
    elif weights:
        record["weights_note"] = f"{weights} is not a local file (not hashed)"
    else:
        record["weights_note"] = (
            "random initialisation (MODEL.WEIGHTS empty)"
            if iteration is None
            else f"weights of iteration {iteration} were not saved (SOLVER.CHECKPOINT_PERIOD)"
        )
    return record


def same_run(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> bool:
    """Whether two evaluation records are of the same model: same weights checksum (or the same
    unsaved weights), config hash and iteration. Records without these keys (older files) never
    match."""
    if not a or not b:
        return False
    keys = ("weights", "weights_sha256", "config_sha256", "iteration")
    if any(k not in a or k not in b for k in keys):
        return False
    if a["weights_sha256"] or b["weights_sha256"]:
        keys = ("weights_sha256", "config_sha256", "iteration")
    return all(json.dumps(a[k]) == json.dumps(b[k]) for k in keys)
