"""Resample the SAM-ViT position tables (absolute ``pos_embed``, relative ``rel_pos_h/w``) of a
checkpoint saved at another input size, as Detectron2's ViT does at run time."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["resample_position_table", "resample_position_tables", "resize_pos_embed", "resize_rel_pos"]


def resize_pos_embed(pos: torch.Tensor, num_target: int) -> torch.Tensor:
    """(1, S*S, C) -> (1, T*T, C) with bicubic resampling, as Detectron2's ``get_abs_pos`` does."""
    src, dst = math.isqrt(pos.shape[1]), math.isqrt(num_target)
    grid = pos.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(pos.dtype)


def resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) -> (length, C) with linear resampling, as Detectron2's ``get_rel_pos`` does."""
    r = F.interpolate(rel.float().t().unsqueeze(0), size=length, mode="linear")
    return r.squeeze(0).t().to(rel.dtype)


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def resample_position_table(key: str, value: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """``value`` resampled to ``shape`` when ``key`` names a position table of another input size
    (same channels; a square grid of positions for ``pos_embed``), else None."""
    if value.dim() != len(shape) or value.shape[-1] != shape[-1]:
        return None
    if key.endswith("pos_embed") and value.dim() == 3:
        if not (_is_square(value.shape[1]) and _is_square(shape[1])):
            return None
        return resize_pos_embed(value, shape[1])
    if key.endswith(("rel_pos_h", "rel_pos_w")) and value.dim() == 2:
        return resize_rel_pos(value, shape[0])
    return None


def resample_position_tables(
    state_dict: Dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> List[str]:
    """Resample the SAM encoder's (``backbone.*``) position tables of ``state_dict`` to the model's
    shapes, in place; returns notes for the load report."""
    notes = []
    for key, value in list(state_dict.items()):
        want = model_state.get(key)
        if not key.startswith("backbone.") or want is None or want.shape == value.shape:
            continue
        resampled = resample_position_table(key, value, want.shape)
        if resampled is None:
            continue
        state_dict[key] = resampled
        notes.append(f"resampled {key} from {tuple(value.shape)} to {tuple(want.shape)}")
    return notes
