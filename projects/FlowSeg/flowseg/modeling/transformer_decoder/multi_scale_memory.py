"""The pixel-decoder maps as the memory of the BSF decoder's masked cross-attention.

Each of the 3 levels (1/32, 1/16, 1/8) is projected to the decoder width, tagged with a learned
level embedding and given a sine position embedding, as in Mask2Former. A mixin rather than a
sub-module so that ``input_proj`` / ``level_embed`` keep Mask2Former's top-level names.
"""

from __future__ import annotations

from typing import List, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d
from torch import Tensor, nn

__all__ = ["MultiScaleMemory"]


class MultiScaleMemory:
    """Mixin of :class:`~flowseg.modeling.transformer_decoder.BSFTransformerDecoder`; reads its
    ``pe_layer`` (:class:`~.position_encoding.PositionEmbeddingSine`)."""

    def _build_memory_inputs(self, in_channels: int, hidden_dim: int, enforce_input_project: bool) -> None:
        """A learned embedding per level and a 1x1 conv to ``hidden_dim`` (identity when the widths
        match), in Mask2Former's creation order."""
        self.num_feature_levels = 3  # 1/32, 1/16, 1/8, visited round-robin
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                weight_init.c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

    def _memory(self, x: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tuple[int, int]]]:
        """Per level: projected features + level embedding and positional encodings, both
        [HW,B,C] (sequence-first), and the level's (H, W)."""
        src: List[Tensor] = []
        pos: List[Tensor] = []
        size_list: List[Tuple[int, int]] = []
        for i in range(self.num_feature_levels):
            size_list.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            feat = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(feat.permute(2, 0, 1))
        return src, pos, size_list
