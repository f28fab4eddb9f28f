"""Values that ``json.dump`` accepts."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(x: Any) -> Any:
    """Nested mappings / sequences with numpy or torch scalars and arrays -> Python types; keys
    become strings and non-finite floats ``None`` (evaluators return NaN, e.g. the PQ of an
    absent class, and JSON has neither)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist") and hasattr(x, "ndim"):  # numpy arrays / scalars, torch tensors
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
