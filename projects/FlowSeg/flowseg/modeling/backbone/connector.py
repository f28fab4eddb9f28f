"""X-SAM's feature path from SAM-ViT to the pixel decoder: block outputs -> conv connector.

The paper's scaffold (X-SAM) does not use SAM's neck nor a ViTDet pyramid. It takes the token
maps after three global-attention blocks (12, 18 and 24 of SAM-ViT-L, 1-indexed) and turns each
into one pyramid level with a *connector* branch:

    Conv1x1(C -> 512) + LN2d, Conv3x3(512 -> 512) + LN2d, Conv1x1(512 -> C*s) + LN2d  (no biases)
    then pixel_shuffle(., s)

with s = 2 / 1 / 0.5, which gives strides 8 / 16 / 32 with C/2, C and 2C channels (512, 1024,
2048 for C = 1024). :func:`pixel_shuffle` is X-SAM's (InternVL-style) space-to-depth, whose channel
order differs from ``torch.nn.PixelShuffle``; keeping it (and the branch layout
``connector.{level}.{0..5}``) lets X-SAM's ``seg_connector.model.{level}.model.{0..5}`` weights load
by renaming alone.

SAM's neck is kept (``sam_neck.*``; official checkpoints carry it) but not computed, and frozen: a
parameter outside the graph would stall DistributedDataParallel.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.modeling.backbone.vit import ViT
from torch import Tensor, nn

__all__ = [
    "ConnectorBranch",
    "SAMViTConnector",
    "SamTokensOutput",
    "default_connector_layers",
    "pixel_shuffle",
    "sam_neck",
    "sam_tokens_block",
    "vit_block_outputs",
]


def pixel_shuffle(x: Tensor, scale: float, channels_last: bool = False) -> Tensor:
    """X-SAM's pixel shuffle: (B, C, H, W) -> (B, C / s^2, H*s, W*s) for s = 2, 1 or 0.5.

    Upsampling (s = 2): ``out[k, 2h + b, 2w + a] = in[a*C/2 + b*C/4 + k, h, w]`` (``a`` the column
    offset is the outer channel block). Downsampling (s = 0.5):
    ``out[b*2C + a*C + k, h, w] = in[k, 2h + b, 2w + a]`` (``b`` the row offset is outer).
    ``channels_last``: ``x`` and the result are (B, H, W, C) instead.
    """
    if scale <= 0:
        raise ValueError(f"pixel_shuffle scale must be positive, got {scale}")
    if not channels_last:
        x = x.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    new_w, new_h, new_c = w * scale, h * scale, c / (scale * scale)
    if not (float(new_w).is_integer() and float(new_h).is_integer() and float(new_c).is_integer()):
        raise ValueError(f"pixel_shuffle by {scale} does not divide a (H={h}, W={w}, C={c}) map")
    # Width and channels trade first, then height (on the transposed map) and channels.
    x = x.reshape(b, h, int(new_w), int(c / scale)).transpose(1, 2)
    x = x.reshape(b, int(new_w), int(new_h), int(new_c)).transpose(1, 2)
    return x.contiguous() if channels_last else x.permute(0, 3, 1, 2).contiguous()


class ConnectorBranch(nn.Sequential):
    """One connector branch: three bias-free convs, each followed by a channel LayerNorm, then
    :func:`pixel_shuffle` by ``scale``. Input (B, C, H, W) -> (B, C / scale, H*scale, W*scale)."""

    def __init__(self, in_channels: int, scale: float, hidden_channels: int = 512) -> None:
        out_conv = in_channels * scale
        if not float(out_conv).is_integer() or not float(out_conv / (scale * scale)).is_integer():
            raise ValueError(f"scale {scale} does not fit {in_channels} input channels")
        out_conv = int(out_conv)
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1, bias=False),
            LayerNorm(hidden_channels),  # SAM's LayerNorm2d (eps 1e-6)
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm(hidden_channels),
            nn.Conv2d(hidden_channels, out_conv, kernel_size=1, bias=False),
            LayerNorm(out_conv),
        )
        self.scale = float(scale)
        self.out_channels = int(out_conv / (scale * scale))
        for m in self:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)  # X-SAM's initializer range

    def forward(self, x: Tensor) -> Tensor:
        # Odd token grids get one zero row / column (bottom / right) so that s = 0.5 divides them;
        # X-SAM pads every branch the same way, which keeps the three levels aligned.
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return pixel_shuffle(super().forward(x), self.scale)


def sam_neck(embed_dim: int, out_channels: int = 256) -> nn.Sequential:
    """SAM's neck (1x1 conv -> LN2d -> 3x3 conv -> LN2d, no biases) as ``{0,1}`` with
    ``.norm`` children, the layout of a ``SimpleFeaturePyramid`` stage (see checkpoint.sam)."""
    return nn.Sequential(
        Conv2d(embed_dim, out_channels, kernel_size=1, bias=False, norm=LayerNorm(out_channels)),
        Conv2d(
            out_channels, out_channels, kernel_size=3, padding=1, bias=False, norm=LayerNorm(out_channels)
        ),
    )


def vit_block_outputs(net: ViT, x: Tensor, layers: Sequence[int]) -> Dict[int, Tensor]:
    """Outputs (B, H, W, C) of the 1-indexed ``layers`` of Detectron2's ``ViT`` ``net``.

    Block ``i``'s output is Hugging Face's ``hidden_states[i]`` for SAM's vision encoder (index 0
    is the patch embedding). Blocks after the last requested one are not run.
    """
    depth = len(net.blocks)
    if not layers or any(i < 1 or i > depth for i in layers):
        raise ValueError(f"block indices must be in 1..{depth} (1-indexed), got {list(layers)}")
    x = net.patch_embed(x)
    if net.pos_embed is not None:
        x = x + get_abs_pos(net.pos_embed, net.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
    wanted = set(layers)
    out: Dict[int, Tensor] = {}
    for i, blk in enumerate(net.blocks[: max(wanted)], start=1):
        x = blk(x)
        if i in wanted:
            out[i] = x
    return out


def default_connector_layers(global_attn_indexes: Sequence[int], num_levels: int) -> list:
    """The last ``num_levels`` global-attention blocks, 1-indexed (SAM-ViT-L: 12, 18, 24)."""
    blocks = sorted(int(i) + 1 for i in global_attn_indexes)
    if len(blocks) < num_levels:
        raise ValueError(f"{num_levels} connector levels need as many global blocks, got {blocks}")
    return blocks[-num_levels:]


class SamTokensOutput:
    """Optional ``"sam_tokens"`` output of a SAM-ViT backbone (``self.net``, a Detectron2 ``ViT``):
    the (B, C, H/patch, W/patch) output of block ``sam_tokens_layer`` (1-indexed; 0: none).
    ``return_sam_tokens = True`` selects the penultimate block, X-SAM's ``hidden_states[-2]``."""

    sam_tokens_layer: int = 0

    def set_sam_tokens_layer(self, layer: int) -> None:
        depth = len(self.net.blocks)
        if layer and not 1 <= int(layer) <= depth:
            raise ValueError(f"the sam_tokens block must be in 1..{depth} (1-indexed), got {layer}")
        self.sam_tokens_layer = int(layer)
        if "sam_tokens" in self._out_features:
            self._out_features.remove("sam_tokens")
        if layer:
            shape = self.net.output_shape()[self.net._out_features[0]]  # (C, patch stride)
            self._out_features.append("sam_tokens")
            self._out_feature_channels["sam_tokens"] = shape.channels
            self._out_feature_strides["sam_tokens"] = shape.stride

    @property
    def return_sam_tokens(self) -> bool:
        return bool(self.sam_tokens_layer)

    @return_sam_tokens.setter
    def return_sam_tokens(self, on: bool) -> None:
        self.set_sam_tokens_layer(len(self.net.blocks) - 1 if on else 0)


class SAMViTConnector(SamTokensOutput, Backbone):
    """SAM-ViT trunk (``net``), SAM's neck (``sam_neck``, carried, unused) and X-SAM's connector.

    Outputs ``p{log2(stride)}`` for each connector level (``patch_size / scale`` strides), and,
    with ``sam_tokens_layer`` > 0, ``"sam_tokens"``: the (B, C, H/patch, W/patch) output of that
    block, which X-SAM's SAM-token projector reads (its ``hidden_states[-2]``).
    """

    def __init__(
        self,
        net: ViT,
        *,
        embed_dim: int,
        patch_size: int,
        layers: Sequence[int],
        scale_factors: Sequence[float],
        hidden_channels: int = 512,
        neck_channels: int = 256,
        square_pad: int = 0,
        sam_tokens_layer: int = 0,
    ) -> None:
        super().__init__()
        if len(layers) != len(scale_factors):
            raise ValueError(
                f"one connector scale per block: layers {list(layers)}, scales {list(scale_factors)}"
            )
        depth = len(net.blocks)
        if any(not 1 <= int(i) <= depth for i in layers):
            raise ValueError(f"connector layers must be blocks 1..{depth} (1-indexed), got {list(layers)}")
        self.net = net
        self.patch_size = int(patch_size)
        self.sam_neck = sam_neck(embed_dim, neck_channels)
        self.sam_neck.requires_grad_(False)
        self.connector = nn.ModuleList(ConnectorBranch(embed_dim, s, hidden_channels) for s in scale_factors)
        self.layers = [int(i) for i in layers]
        self._square_pad = int(square_pad)
        self._out_features, self._out_feature_channels, self._out_feature_strides = [], {}, {}
        for branch in self.connector:
            stride = int(round(self.patch_size / branch.scale))
            name = f"p{int(math.log2(stride))}"
            self._out_features.append(name)
            self._out_feature_channels[name] = branch.out_channels
            self._out_feature_strides[name] = stride
        self.set_sam_tokens_layer(sam_tokens_layer)

    @property
    def sam_neck_prefix(self) -> str:
        """Where SAM checkpoints' neck weights go (:mod:`flowseg.checkpoint.sam`)."""
        return "sam_neck"

    @property
    def size_divisibility(self) -> int:
        # the s = 0.5 branch halves the token grid
        return 2 * self.patch_size

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": self._square_pad}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        wanted = self.layers + ([self.sam_tokens_layer] if self.sam_tokens_layer else [])
        blocks = vit_block_outputs(self.net, x, wanted)
        names = [n for n in self._out_features if n != "sam_tokens"]
        out = {
            name: branch(blocks[i].permute(0, 3, 1, 2))
            for name, branch, i in zip(names, self.connector, self.layers)
        }
        if self.sam_tokens_layer:
            out["sam_tokens"] = blocks[self.sam_tokens_layer].permute(0, 3, 1, 2)
        return out


def sam_tokens_block(depth: int, layer: Optional[int]) -> int:
    """1-indexed block of ``"sam_tokens"``: ``layer``, or with 0 / ``None`` the penultimate block
    (X-SAM's ``hidden_states[-2]``: block 23 of SAM-ViT-L)."""
    block = int(layer) if layer else depth - 1
    if not 1 <= block <= depth:
        raise ValueError(f"MODEL.SAM_VIT.SAM_TOKENS_LAYER must be in 1..{depth}, got {layer}")
    return block
