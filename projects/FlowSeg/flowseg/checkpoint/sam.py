"""Load SAM image-encoder weights into FlowSeg's SAM-ViT backbone.

Accepted source layouts:

* official ``segment_anything`` checkpoints (``image_encoder.patch_embed.proj``,
  ``image_encoder.blocks.N.mlp.lin1``, ``image_encoder.neck.{0,1,2,3}``, position embedding of
  shape (1, H, W, C)), also the bare ``image_encoder.state_dict()``;
* Hugging Face ``SamModel`` / ``SamVisionModel`` (``vision_encoder.*``) and bare ``SamVisionEncoder``
  (``patch_embed.projection``, ``layers.N.layer_norm1``, ``neck.conv1`` ...);
* this project's own names (``net.*``, ``simfp_*``, ``sam_neck.*``, ``connector.*``), passed through.

Target layout (``flowseg.modeling.backbone.sam_vit.build_sam_vit``): the ViT is ``net.*``
(Detectron2 ``ViT``; ``mlp.fc1/fc2``, position embedding (1, H*W, C)) and SAM's neck maps onto
``{neck}.0.weight`` (1x1 conv), ``{neck}.0.norm.*``, ``{neck}.1.weight`` (3x3 conv),
``{neck}.1.norm.*`` where ``{neck}`` is the stride-16 stage of ``SimpleFeaturePyramid``
(``simfp_4``) or the connector path's ``sam_neck`` (:func:`sam_neck_prefix`). Prompt-encoder /
mask-decoder weights are dropped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import get_missing_parameters_message, get_unexpected_parameters_message

from .position_tables import resample_position_table

__all__ = [
    "convert_sam_checkpoint",
    "load_sam_checkpoint",
    "model_sam_neck",
    "read_state_dict",
    "sam_neck_prefix",
]

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# Top-level scopes of a full SAM model that are not part of the image encoder.
_DROPPED_SCOPES = ("prompt_encoder", "mask_decoder", "shared_image_embedding", "pixel_mean", "pixel_std")
# "image_encoder." (official) or "vision_encoder." (Hugging Face), possibly under a wrapper prefix.
_ENCODER_SCOPE = re.compile(r"^(?:.*\.)?(?:image_encoder|vision_encoder)\.(.+)$")
_BLK = r"(?:blocks|layers)\.(\d+)"  # official / Detectron2: blocks.N; Hugging Face: layers.N

# (pattern on the encoder-relative name, target template); groups fill {0}, {1}...; {neck} is the
# pyramid stage that receives SAM's neck.
_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"patch_embed\.(?:proj|projection)\.(weight|bias)"), "net.patch_embed.proj.{0}"),
    (re.compile(r"pos_embed"), "net.pos_embed"),
    (re.compile(_BLK + r"\.(?:norm1|layer_norm1)\.(weight|bias)"), "net.blocks.{0}.norm1.{1}"),
    (re.compile(_BLK + r"\.(?:norm2|layer_norm2)\.(weight|bias)"), "net.blocks.{0}.norm2.{1}"),
    (re.compile(_BLK + r"\.attn\.(qkv|proj)\.(weight|bias)"), "net.blocks.{0}.attn.{1}.{2}"),
    (re.compile(_BLK + r"\.attn\.(rel_pos_h|rel_pos_w)"), "net.blocks.{0}.attn.{1}"),
    (re.compile(_BLK + r"\.mlp\.(?:lin1|fc1)\.(weight|bias)"), "net.blocks.{0}.mlp.fc1.{1}"),
    (re.compile(_BLK + r"\.mlp\.(?:lin2|fc2)\.(weight|bias)"), "net.blocks.{0}.mlp.fc2.{1}"),
    # SAM neck: Conv2d(C, 256, 1, bias=False), LayerNorm2d, Conv2d(256, 256, 3, bias=False), LayerNorm2d
    (re.compile(r"neck\.(?:0|conv1)\.weight"), "{neck}.0.weight"),
    (re.compile(r"neck\.(?:1|layer_norm1)\.(weight|bias)"), "{neck}.0.norm.{0}"),
    (re.compile(r"neck\.(?:2|conv2)\.weight"), "{neck}.1.weight"),
    (re.compile(r"neck\.(?:3|layer_norm2)\.(weight|bias)"), "{neck}.1.norm.{0}"),
]
_OWN_NAME = re.compile(r"^(?:net|simfp_\d+|sam_neck|connector)\.")


def _convert_key(key: str, neck_prefix: str) -> Optional[str]:
    """New name for ``key``; ``None`` = drop; unknown keys come back unchanged (reported later)."""
    if key.split(".", 1)[0] in _DROPPED_SCOPES:
        return None
    m = _ENCODER_SCOPE.match(key)
    rest = m.group(1) if m else key
    if _OWN_NAME.match(rest):
        return rest
    for pattern, template in _RULES:
        r = pattern.fullmatch(rest)
        if r is not None:
            return template.format(*r.groups(), neck=neck_prefix)
    return key


def convert_sam_checkpoint(
    state_dict: Mapping[str, torch.Tensor], prefix_out: str = "", neck_prefix: str = "simfp_4"
) -> StateDict:
    """Rename a SAM (official or Hugging Face) state dict to FlowSeg's SAM-ViT backbone names.

    Args:
        state_dict: source weights (see the module docstring for the accepted layouts).
        prefix_out: prepended to every output name, e.g. ``"backbone."`` to load into a whole
            FlowSeg model.
        neck_prefix: the ``SimpleFeaturePyramid`` stage that receives SAM's neck; ``simfp_4`` is
            the stride-16 stage of a patch-16 ViT.

    Returns:
        A new dict; tensors are shared with the input except the reshaped position embedding.
        Unrecognised keys are kept under their original name so that loading reports them.
    """
    out: StateDict = {}
    source_of: Dict[str, str] = {}
    for key, value in state_dict.items():
        new = _convert_key(key, neck_prefix)
        if new is None:
            continue
        if new == "net.pos_embed" and value.dim() == 4:
            # SAM / HF: (1, H, W, C); Detectron2's ViT: (1, H*W, C), row-major like get_abs_pos.
            value = value.reshape(value.shape[0], -1, value.shape[-1])
        new = prefix_out + new
        if new in out:
            raise ValueError(f"SAM checkpoint keys {source_of[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source_of[new] = key
    return out


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a ``.pth`` / ``.pt`` / ``.bin`` (torch pickle) or ``.safetensors`` file, or a Hugging
    Face model folder (``model.safetensors`` / ``pytorch_model.bin``), into a flat state dict."""
    path = os.fspath(path)
    local = PathManager.get_local_path(path) if "://" in path else path
    if os.path.isdir(local):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(local, name)):
                local = os.path.join(local, name)
                break
    if not os.path.isfile(local):
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if local.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(local, device="cpu")
    else:
        # Plain tensors only (official SAM and HF .bin files are); refuses arbitrary pickles.
        obj = torch.load(local, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights.
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    return dict(obj)


def _fit_shapes(state_dict: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    """Resample position tables to the model's input size; drop other shape mismatches."""
    out: StateDict = {}
    for key, value in state_dict.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
            continue
        resampled = resample_position_table(key, value, want.shape)
        if resampled is not None:
            out[key] = resampled
            logger.info(f"Resampled {key} from {tuple(value.shape)} to {tuple(want.shape)}")
        else:
            logger.warning(
                f"Skipping {key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(want.shape)}"
            )
    return out


def _neck_stage(backbone: SimpleFeaturePyramid) -> Optional[str]:
    """Name of the pyramid stage with scale 1.0 (the one shaped like SAM's neck)."""
    stride = backbone.net.output_shape()[backbone.in_feature].stride
    for scale in backbone.scale_factors:
        if float(scale) == 1.0:
            return f"simfp_{int(math.log2(stride))}"
    return None


def sam_neck_prefix(backbone: nn.Module) -> Optional[str]:
    """The backbone-relative module that receives SAM's neck: a pyramid's scale-1.0 stage, or the
    connector path's ``sam_neck`` (``None``: the backbone has no place for it)."""
    if isinstance(backbone, SimpleFeaturePyramid):
        return _neck_stage(backbone)
    return getattr(backbone, "sam_neck_prefix", None)


def model_sam_neck(model: nn.Module) -> str:
    """Where a whole FlowSeg model receives SAM's neck, relative to ``backbone.`` (``simfp_4`` when
    its backbone has no place for it)."""
    backbone = getattr(model, "backbone", None)
    return (sam_neck_prefix(backbone) if backbone is not None else None) or "simfp_4"


def load_sam_checkpoint(
    backbone: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]]
) -> Tuple[List[str], List[str]]:
    """Load SAM weights into a backbone from :func:`build_sam_vit` (or a bare Detectron2 ``ViT``).

    Position embeddings / relative-position tables of another input size are resampled; other
    shape mismatches are skipped with a warning. Pyramid stages SAM has no weights for (all but
    the stride-16 one) stay randomly initialised and are logged at INFO level.

    Returns:
        ``(missing_keys, unexpected_keys)`` in the backbone's naming.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state_dict = read_state_dict(path_or_state_dict)
        source = os.fspath(path_or_state_dict)
    else:
        state_dict, source = dict(path_or_state_dict), "state dict"

    if isinstance(backbone, ViT):
        converted = convert_sam_checkpoint(state_dict)
        converted = {(k[4:] if k.startswith("net.") else k): v for k, v in converted.items()}
        neck = None
    elif isinstance(getattr(backbone, "net", None), ViT):
        neck = sam_neck_prefix(backbone)
        converted = convert_sam_checkpoint(state_dict, neck_prefix=neck or "simfp_4")
    else:
        raise TypeError(f"Expected a SAM-ViT backbone (with .net) or a ViT, got {type(backbone).__name__}")

    converted = _fit_shapes(converted, backbone.state_dict())
    result = backbone.load_state_dict(converted, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)

    # Pyramid stages other than SAM's neck, and the connector, are new layers: expected to be missing.
    new_layers = [k for k in missing if not k.startswith("net.") and not (neck and k.startswith(neck + "."))]
    other_missing = [k for k in missing if k not in new_layers]
    logger.info(f"Loaded SAM weights from {source}: {len(converted) - len(unexpected)} tensors")
    if new_layers:
        msg = get_missing_parameters_message(new_layers)
        logger.info(f"Feature-path layers not in SAM (kept initialised):\n{msg}")
    if other_missing:
        logger.warning(get_missing_parameters_message(other_missing))
    if unexpected:
        logger.warning(get_unexpected_parameters_message(unexpected))
    return missing, unexpected
