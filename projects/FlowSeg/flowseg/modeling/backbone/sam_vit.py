"""SAM's image encoder as a Detectron2 backbone (FlowSeg's segmentation encoder).

Detectron2's ViTDet ``ViT`` already has SAM's encoder architecture (windowed / global attention
with decomposed relative positions, absolute position embedding, pre-norm blocks); only the
hyper-parameters and parameter names differ. Two feature paths turn it into multi-scale maps
(``MODEL.SAM_VIT.FEATURE_PATH``):

* ``"connector"`` (the paper's scaffold, X-SAM's): the outputs of three global-attention blocks
  through a conv connector with pixel shuffle -> ``p3``, ``p4``, ``p5`` (strides 8, 16, 32; 512,
  1024, 2048 channels for SAM-ViT-L); SAM's neck is carried but unused
  (:class:`~flowseg.modeling.backbone.connector.SAMViTConnector`).
* ``"pyramid"``: ViTDet's ``SimpleFeaturePyramid`` turns the last stride-16 map into ``p2``..``p5``
  (strides 4..32); its stride-16 stage (1x1 conv -> LN -> 3x3 conv -> LN, no biases) has exactly
  the shape of SAM's neck, so official SAM neck weights load there.

SAM checkpoints load into both (see :mod:`flowseg.checkpoint.sam`). Either path can also return
``"sam_tokens"``, one block's (B, C, H/16, W/16) token map, for the LLM's SAM-token projector.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.vit import Block, SimpleFeaturePyramid, ViT

from ..from_scratch import conv_stem
from .connector import (
    SamTokensOutput,
    SAMViTConnector,
    default_connector_layers,
    sam_tokens_block,
    vit_block_outputs,
)

__all__ = [
    "FEATURE_PATHS",
    "SAM_VIT_PRESETS",
    "SAM_VIT_OUT_FEATURES",
    "SAMViTConnector",
    "SAMViTFeaturePyramid",
    "build_sam_vit",
    "build_sam_vit_backbone",
    "freeze_sam_vit",
    "sam_vit_embed_dim",
]

logger = logging.getLogger(__name__)

# Official SAM sizes (segment_anything/build_sam.py). "tiny" is for tests and CPU smoke runs.
SAM_VIT_PRESETS: Dict[str, Dict[str, Any]] = {
    "B": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), window_size=14),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14),
    "tiny": dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=4),
}
# Accept the usual spellings ("vit_l", "ViT-L", "l") as well.
_PRESET_ALIASES = {"vit_b": "B", "vit_l": "L", "vit_h": "H", "vit-b": "B", "vit-l": "L", "vit-h": "H"}

SAM_VIT_OUT_FEATURES = ("p2", "p3", "p4", "p5")
_VIT_OUT_FEATURE = "last_feat"  # name of the ViT's single output inside the pyramid


def _resolve_preset(preset: str) -> Dict[str, Any]:
    key = preset.strip()
    key = _PRESET_ALIASES.get(key.lower(), key)
    if key not in SAM_VIT_PRESETS and key.upper() in SAM_VIT_PRESETS:
        key = key.upper()
    if key not in SAM_VIT_PRESETS:
        raise ValueError(f"Unknown SAM-ViT preset {preset!r}; choose one of {sorted(SAM_VIT_PRESETS)}")
    return dict(SAM_VIT_PRESETS[key])


class _CheckpointedBlock(Block):
    """``Block`` whose forward recomputes activations in backward (torch.utils.checkpoint).

    Detectron2's ViT implements ``use_act_checkpoint`` with fairscale, which is not a dependency
    here; swapping the class of the built blocks keeps parameter names (and checkpoints) unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


class SAMViTFeaturePyramid(SamTokensOutput, SimpleFeaturePyramid):
    """``SimpleFeaturePyramid`` that also reports its divisibility through ``size_divisibility``
    and can return ``"sam_tokens"`` (:class:`~flowseg.modeling.backbone.connector.SamTokensOutput`).

    Detectron2's pyramid only exposes it via ``padding_constraints`` (``Backbone.size_divisibility``
    stays 0), while Mask2Former-style meta-architectures read ``backbone.size_divisibility``.
    """

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.sam_tokens_layer:
            return super().forward(x)
        depth = len(self.net.blocks)
        blocks = vit_block_outputs(self.net, x, [self.sam_tokens_layer, depth])
        last = blocks[depth].permute(0, 3, 1, 2)
        # SimpleFeaturePyramid's stages on the last block (no top block in this project)
        out = {f: stage(last) for f, stage in zip(self._out_features, self.stages)}
        out["sam_tokens"] = blocks[self.sam_tokens_layer].permute(0, 3, 1, 2)
        return out


def freeze_sam_vit(backbone: nn.Module) -> None:
    """Stop gradients into the ViT (``backbone.net``); the pyramid / connector stays trainable."""
    for p in backbone.net.parameters():
        p.requires_grad_(False)


FEATURE_PATHS = ("connector", "pyramid")


def _overridden_preset(
    preset: str,
    embed_dim: Optional[int],
    depth: Optional[int],
    num_heads: Optional[int],
    global_attn_indexes: Optional[Sequence[int]],
    window_size: Optional[int],
    mlp_ratio: float,
) -> Dict[str, Any]:
    """The preset's hyper-parameters with the given overrides (``None`` / empty / 0 keep the preset's)."""
    p = _resolve_preset(preset)
    p["embed_dim"] = embed_dim or p["embed_dim"]
    p["depth"] = depth or p["depth"]
    p["num_heads"] = num_heads or p["num_heads"]
    if global_attn_indexes:
        p["global_attn_indexes"] = tuple(global_attn_indexes)
    if window_size is not None and window_size > 0:
        p["window_size"] = window_size
    p["mlp_ratio"] = mlp_ratio
    return p


def _build_vit(
    p: Dict[str, Any],
    img_size: int,
    in_chans: int,
    patch_size: int,
    drop_path_rate: float,
    use_conv_stem: bool,
    use_act_checkpoint: bool,
) -> ViT:
    """Detectron2's ``ViT`` with SAM's hyper-parameters ``p`` (a resolved preset), optionally with
    :func:`conv_stem` as its patch embedding and activation checkpointing in its blocks."""
    depth, global_idx = p["depth"], tuple(p["global_attn_indexes"])
    if any(i < 0 or i >= depth for i in global_idx):
        raise ValueError(f"global_attn_indexes {global_idx} out of range for depth {depth}")
    net = ViT(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=p["embed_dim"],
        depth=depth,
        num_heads=p["num_heads"],
        mlp_ratio=float(p.get("mlp_ratio", 4.0)),  # SAM: 4 (3072 / 768 ... 5120 / 1280)
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # SAM's eps (Detectron2's default is 1e-5)
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=p["window_size"],
        # Detectron2 lists the windowed blocks; SAM lists the global ones.
        window_block_indexes=tuple(i for i in range(depth) if i not in global_idx),
        residual_block_indexes=(),
        use_act_checkpoint=False,  # done in build_sam_vit without fairscale
        # SAM's position embedding is a (H/16)x(W/16) grid without a class token.
        pretrain_img_size=img_size,
        pretrain_use_cls_token=False,
        out_feature=_VIT_OUT_FEATURE,
    )
    if use_conv_stem:
        net.patch_embed.proj = conv_stem(in_chans, p["embed_dim"], patch_size)
    if use_act_checkpoint:
        for blk in net.blocks:
            blk.__class__ = _CheckpointedBlock
    return net


def _connector(
    net: ViT,
    p: Dict[str, Any],
    patch_size: int,
    out_channels: int,
    square_pad: int,
    sam_tokens_layer: int,
    layers: Optional[Sequence[int]],
    scale_factors: Sequence[float],
    hidden_dim: int,
) -> SAMViTConnector:
    """X-SAM's feature path: block outputs through :class:`SAMViTConnector`."""
    return SAMViTConnector(
        net,
        embed_dim=p["embed_dim"],
        patch_size=patch_size,
        layers=list(layers or default_connector_layers(p["global_attn_indexes"], len(scale_factors))),
        scale_factors=[float(s) for s in scale_factors],
        hidden_channels=hidden_dim,
        neck_channels=out_channels,
        square_pad=square_pad,
        sam_tokens_layer=sam_tokens_layer,
    )


def _pyramid(
    net: ViT, out_channels: int, square_pad: int, sam_tokens_layer: int, scale_factors: Sequence[float]
) -> SAMViTFeaturePyramid:
    """ViTDet's feature path: :class:`SAMViTFeaturePyramid` on the last block."""
    backbone = SAMViTFeaturePyramid(
        net=net,
        in_feature=_VIT_OUT_FEATURE,
        out_channels=out_channels,
        scale_factors=tuple(float(s) for s in scale_factors),
        top_block=None,
        norm="LN",  # Detectron2's channel LayerNorm, eps 1e-6 like SAM's LayerNorm2d
        square_pad=square_pad,
    )
    backbone.set_sam_tokens_layer(sam_tokens_layer)
    return backbone


def _load_sam_weights(backbone: nn.Module, checkpoint: str, use_conv_stem: bool) -> None:
    if use_conv_stem:
        raise ValueError("MODEL.SAM_VIT.CONV_STEM has no weights in SAM checkpoints; disable it to load one")
    # Imported here so that flowseg.checkpoint may import modeling without a cycle.
    from ...checkpoint.sam import load_sam_checkpoint

    load_sam_checkpoint(backbone, checkpoint)


def build_sam_vit(
    preset: str = "L",
    img_size: int = 1024,
    *,
    in_chans: int = 3,
    patch_size: int = 16,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    global_attn_indexes: Optional[Sequence[int]] = None,
    window_size: Optional[int] = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    feature_path: str = "pyramid",
    out_channels: int = 256,
    scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    connector_layers: Optional[Sequence[int]] = None,
    connector_scale_factors: Sequence[float] = (2.0, 1.0, 0.5),
    connector_hidden_dim: int = 512,
    sam_tokens_layer: int = 0,
    use_act_checkpoint: bool = False,
    freeze: bool = False,
    square_pad: int = 0,
    use_conv_stem: bool = False,
    checkpoint: Optional[str] = None,
) -> Union[SAMViTFeaturePyramid, SAMViTConnector]:
    """Build SAM's image encoder and a feature path without a Detectron2 config.

    Args:
        preset: "B", "L", "H" (official SAM sizes) or "tiny".
        img_size: pre-training input size (1024 for SAM): the position-embedding grid and the global
            blocks' relative-position tables (Detectron2 interpolates both for other sizes).
        embed_dim, depth, num_heads, global_attn_indexes, window_size: override the preset
            (``None`` = take the preset's value).
        mlp_ratio: MLP width / embed_dim (4 in every SAM; tiny test models use others).
        feature_path: ``"pyramid"`` (ViTDet's ``SimpleFeaturePyramid``) or ``"connector"``
            (X-SAM's: block outputs through :class:`SAMViTConnector`).
        out_channels: pyramid width; on the connector path the width of SAM's (unused) neck.
        scale_factors: pyramid scales; the default gives "p2".."p5" at strides 4, 8, 16, 32.
        connector_layers: 1-indexed blocks the connector reads (``None``: the last
            ``len(connector_scale_factors)`` global-attention blocks, 12/18/24 for SAM-ViT-L).
        connector_scale_factors: pixel-shuffle factor per connector level (2/1/0.5 ->
            strides 8/16/32 with C/2, C, 2C channels).
        connector_hidden_dim: width of the connector's bottleneck convs (512).
        sam_tokens_layer: > 0: also output ``"sam_tokens"``, that block's (B, C, H/p, W/p) output.
        use_act_checkpoint: recompute block activations in backward to save memory.
        freeze: freeze the ViT parameters (the pyramid / connector stays trainable).
        square_pad: padding constraint of the backbone; set it to ``img_size`` to make
            Detectron2 pad batches to SAM's square input.
        use_conv_stem: replace SAM's linear patch embedding by :func:`conv_stem` (training from
            scratch only; not loadable from SAM checkpoints).
        checkpoint: optional SAM checkpoint (official, Hugging Face or this module's own names),
            loaded through :func:`flowseg.checkpoint.sam.load_sam_checkpoint`.

    Returns the backbone; its ``net`` is the ViT.
    """
    if feature_path not in FEATURE_PATHS:
        raise ValueError(f"MODEL.SAM_VIT.FEATURE_PATH must be one of {FEATURE_PATHS}, got {feature_path!r}")
    p = _overridden_preset(preset, embed_dim, depth, num_heads, global_attn_indexes, window_size, mlp_ratio)
    net = _build_vit(p, img_size, in_chans, patch_size, drop_path_rate, use_conv_stem, use_act_checkpoint)
    if feature_path == "connector":
        backbone = _connector(
            net,
            p,
            patch_size,
            out_channels,
            square_pad,
            sam_tokens_layer,
            layers=connector_layers,
            scale_factors=connector_scale_factors,
            hidden_dim=connector_hidden_dim,
        )
    else:
        backbone = _pyramid(net, out_channels, square_pad, sam_tokens_layer, scale_factors)
    if checkpoint:
        _load_sam_weights(backbone, checkpoint, use_conv_stem)
    if freeze:
        freeze_sam_vit(backbone)
    return backbone


def sam_vit_embed_dim(cfg) -> int:
    """Width of the SAM-ViT that ``cfg.MODEL.SAM_VIT`` builds (EMBED_DIM, else the preset's)."""
    return int(cfg.MODEL.SAM_VIT.EMBED_DIM or _resolve_preset(cfg.MODEL.SAM_VIT.PRESET)["embed_dim"])


@BACKBONE_REGISTRY.register()
def build_sam_vit_backbone(cfg, input_shape: ShapeSpec) -> Union[SAMViTFeaturePyramid, SAMViTConnector]:
    """Detectron2 entry point: ``MODEL.BACKBONE.NAME = "build_sam_vit_backbone"``.

    Reads ``cfg.MODEL.SAM_VIT.*``; EMBED_DIM / DEPTH / NUM_HEADS = 0, GLOBAL_ATTN_INDEXES = []
    and WINDOW_SIZE <= 0 mean "take the preset's value"; CONNECTOR.LAYERS = [] means the last
    global-attention blocks; RETURN_SAM_TOKENS adds ``"sam_tokens"`` from block SAM_TOKENS_LAYER
    (0: the penultimate block, X-SAM's ``hidden_states[-2]``).
    """
    c = cfg.MODEL.SAM_VIT
    depth = c.DEPTH or _resolve_preset(c.PRESET)["depth"]
    return build_sam_vit(
        preset=c.PRESET,
        img_size=c.IMG_SIZE,
        in_chans=input_shape.channels if input_shape.channels else 3,
        patch_size=c.PATCH_SIZE,
        embed_dim=c.EMBED_DIM or None,
        depth=c.DEPTH or None,
        num_heads=c.NUM_HEADS or None,
        global_attn_indexes=list(c.GLOBAL_ATTN_INDEXES) or None,
        window_size=c.WINDOW_SIZE if c.WINDOW_SIZE > 0 else None,
        mlp_ratio=c.get("MLP_RATIO", 4.0),
        drop_path_rate=c.DROP_PATH_RATE,
        feature_path=c.FEATURE_PATH,
        out_channels=c.OUT_CHANNELS,
        scale_factors=list(c.SCALE_FACTORS),
        connector_layers=list(c.CONNECTOR.LAYERS) or None,
        connector_scale_factors=list(c.CONNECTOR.SCALE_FACTORS),
        connector_hidden_dim=c.CONNECTOR.HIDDEN_DIM,
        sam_tokens_layer=sam_tokens_block(depth, c.SAM_TOKENS_LAYER) if c.RETURN_SAM_TOKENS else 0,
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        freeze=c.FREEZE,
        square_pad=c.SQUARE_PAD,
        use_conv_stem=c.CONV_STEM,
        checkpoint=c.CHECKPOINT or None,
    )
