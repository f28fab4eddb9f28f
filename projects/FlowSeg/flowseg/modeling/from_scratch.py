"""Training aids for models trained from scratch (the synthetic CPU configs). Not in the paper:
each is off by default and reached only through its config key.

* :func:`conv_stem` (``MODEL.SAM_VIT.CONV_STEM``): convolutional patch embedding for the SAM-ViT;
* :func:`segment_class_loss` (``MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT``): classify every
  ground-truth segment from its mean pixel feature;
* :func:`mask_position` / :func:`mask_position_features` (``MODEL.FLOWSEG.MASK_POSITION_LOGITS``):
  where each query's mask lies, for the condition logits.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASK_POSITION_FEATURE_DIM",
    "conv_stem",
    "mask_position",
    "mask_position_features",
    "segment_class_loss",
]


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> nn.Sequential:
    """Convolutional patch embedding ("Early Convolutions Help Transformers See Better",
    Xiao et al. 2021): log2(patch_size) 3x3 stride-2 convs (GroupNorm + GELU), then a 1x1
    projection to ``embed_dim``. Same input/output shapes as SAM's single ``patch_size`` conv.

    Only for models trained from scratch (the synthetic CPU configs): a randomly initialised ViT
    with a linear patch embedding learns shape late, convolutions give it local edge/corner
    features from the first step. Official SAM checkpoints have no weights for it.
    """
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
    layers = []
    c_in = in_chans
    for i in range(n):
        c_out = max(embed_dim >> (n - 1 - i), 8)
        groups = 8 if c_out % 8 == 0 else 1
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
            nn.GELU(),
        ]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, embed_dim, 1))
    return nn.Sequential(*layers)


def segment_class_loss(logits: Tensor, targets: Sequence[Dict[str, Tensor]]) -> Tensor:
    """Cross-entropy of every target segment classified from the mean of the per-pixel class
    ``logits`` [B, K, h, w] inside its mask (area-downsampled to h x w), averaged over segments.

    The mean of a 1x1-conv's logits over a mask is that linear classifier applied to the mask's
    mean feature: a bag of local features, which is what makes shape learnable by it (corners
    and concavities) where a per-pixel loss asks an interior pixel what it cannot see.
    Returns a zero that keeps the graph when there is no segment.
    """
    h, w = logits.shape[-2:]
    pooled, labels = [], []
    for b, t in enumerate(targets):
        if len(t["labels"]) == 0:
            continue
        weights = F.interpolate(t["masks"][None].to(logits), size=(h, w), mode="area")[0]  # [T, h, w]
        area = weights.flatten(1).sum(1)
        keep = area > 0  # a segment smaller than one cell at every position cannot be pooled
        pooled.append(torch.einsum("khw,thw->tk", logits[b], weights[keep]) / area[keep, None])
        labels.append(t["labels"][keep.to(t["labels"].device)].to(logits.device))
    if sum(len(x) for x in labels) == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(torch.cat(pooled), torch.cat(labels))


def mask_position(mask_logits: Tensor) -> Tensor:
    """Where each soft mask lies: ``[cx, cy, sx, sy]`` [..., 4] from mask logits [..., H, W] -
    the probability-weighted mean and standard deviation of the pixel coordinates, in units of
    the map's width / height, centred (a mask filling the map gives ``[0, 0, 0.29, 0.29]``)."""
    h, w = mask_logits.shape[-2:]
    p = mask_logits.sigmoid()
    mass = p.sum((-2, -1)).clamp(min=1e-6)
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w - 0.5
    px, py = p.sum(-2), p.sum(-1)  # marginals [..., W], [..., H]
    cx, cy = (px * xs).sum(-1) / mass, (py * ys).sum(-1) / mass
    sx = ((px * (xs - cx[..., None]) ** 2).sum(-1) / mass).clamp(min=0).sqrt()
    sy = ((py * (ys - cy[..., None]) ** 2).sum(-1) / mass).clamp(min=0).sqrt()
    return torch.stack([cx, cy, sx, sy], dim=-1)


_MASK_POSITION_FREQUENCIES = 4
#: width of :func:`mask_position_features` at its default frequencies: sin/cos of 2 centres + 2 sizes
MASK_POSITION_FEATURE_DIM = 2 * 2 * _MASK_POSITION_FREQUENCIES + 2


def mask_position_features(
    position: Tensor, num_frequencies: int = _MASK_POSITION_FREQUENCIES, gain: float = 4.0
) -> Tensor:
    """Features from :func:`mask_position`'s ``[cx, cy, sx, sy]`` [..., 4]: ``sin / cos(pi * k * c)``
    for k = 1..``num_frequencies`` of both centre coordinates (k = 1 is monotonic over the map, as
    "leftmost" needs) and ``10 * [sx, sy]`` (object size, ~0.3-0.8), all times ``gain``.

    Why the scale: Adam moves each weight of the zero-initialised projection by about the
    learning rate per step, so the features' scale sets how fast position can enter the logits
    (raw centres, |c| <= 0.5, barely moved it in 1,500 iterations; gain 1 learned to ~10% of the
    query's norm)."""
    k = torch.arange(1, num_frequencies + 1, device=position.device, dtype=position.dtype) * math.pi
    angles = position[..., :2, None] * k  # [..., 2, F]
    fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., 4F]
    return gain * torch.cat([fourier, 10.0 * position[..., 2:]], dim=-1)
