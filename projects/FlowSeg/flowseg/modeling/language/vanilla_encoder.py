"""Vanilla (semantic) image encoder: a ``transformers`` vision tower, SigLIP2-so400m in the paper.

The image pre-processing lives here (not in the data path) so that the dataset dict's uint8
``"image"`` — at whatever size the segmentation mapper produced — is all the head needs: it is
resized to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` and normalised with ``PIXEL_MEAN`` / ``PIXEL_STD``
(SigLIP's ``(x - 127.5) / 127.5`` by default).

Two input conventions are handled:

* fixed-resolution towers (``SiglipVisionModel``, also the fixed-res SigLIP2 checkpoints such as
  ``siglip2-so400m-patch14-384``, and CLIP-like towers): ``pixel_values [B, 3, S, S]``, position
  embeddings interpolated when ``S`` differs from the tower's ``image_size``;
* SigLIP2 NaFlex towers (``Siglip2VisionModel``): the image is cut into ``S/p x S/p`` patches
  flattened as ``(p, p, C)`` — the order of ``Siglip2ImageProcessor`` — with ``spatial_shapes``
  ``(S/p, S/p)`` and an all-ones ``pixel_attention_mask`` (no padding patches).
"""

from __future__ import annotations

import inspect
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def build_vision_tower(path: str = "", config: str = "", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a vision tower from a local folder (``path``) or build it randomly from a config json.

    A full image-text model (SigLIP / SigLIP2 / CLIP with a ``vision_config``) is reduced to its
    ``.vision_model``.
    """
    from transformers import AutoConfig, AutoModel

    if path:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    elif config:
        cfg = AutoConfig.from_pretrained(config)
        if getattr(cfg, "vision_config", None) is not None:
            cfg = cfg.vision_config
        model = AutoModel.from_config(cfg, dtype=dtype)
    else:
        raise ValueError("MODEL.VANILLA_ENCODER needs PATH (pretrained folder) or CONFIG (config json)")
    if getattr(model.config, "vision_config", None) is not None:
        model = model.vision_model
    return model


class VanillaEncoder(nn.Module):
    """Vision tower + pre-processing: list of uint8 ``[3, H, W]`` images → ``[B, N, D_vis]`` tokens."""

    def __init__(
        self,
        tower: nn.Module,
        image_size: int = 384,
        pixel_mean: Sequence[float] = (127.5, 127.5, 127.5),
        pixel_std: Sequence[float] = (127.5, 127.5, 127.5),
        freeze: bool = True,
        input_format: str = "RGB",
        feature_layer: int = 0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if feature_layer > 0:
            raise ValueError(
                f"MODEL.VANILLA_ENCODER.FEATURE_LAYER must be 0 or negative, got {feature_layer}"
            )
        # 0: last_hidden_state (after the tower's final LayerNorm); k < 0: hidden_states[k], the
        # output of a transformer layer without that norm (X-SAM: -2, SigLIP2's penultimate layer)
        self.feature_layer = int(feature_layer)
        self.tower = tower
        self.image_size = int(image_size)
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        # Detectron2 images are BGR unless INPUT.FORMAT says RGB; SigLIP was trained on RGB.
        self.flip_channels = input_format.upper() == "BGR"
        self.freeze = freeze
        if freeze:
            for p in self.tower.parameters():
                p.requires_grad_(False)
        # FlowSeg reads last_hidden_state only: SigLIP's attention-pooling head (pooler_output)
        # would run for nothing and, trainable, leave parameters without a gradient (DDP error).
        if getattr(self.tower, "use_head", False):
            self.tower.use_head = False
        if isinstance(getattr(self.tower, "head", None), nn.Module):
            self.tower.head.requires_grad_(False)
        self._freeze_layers_after(self.feature_layer)
        if gradient_checkpointing:
            # recompute each layer's activations in backward (non-reentrant: works with frozen inputs)
            self.tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = inspect.signature(self.tower.forward).parameters
        self.naflex = "spatial_shapes" in params
        self._interpolate_kw = "interpolate_pos_encoding" in params
        cfg = self.tower.config
        self.patch_size = int(cfg.patch_size)
        self.out_dim = int(cfg.hidden_size)
        # NaFlex patchifies exactly; fixed-resolution towers use a stride-p conv that drops the
        # remainder (so400m-patch14-384: 384 px -> 27 x 27 patches).
        if self.naflex and self.image_size % self.patch_size:
            raise ValueError(f"IMAGE_SIZE {self.image_size} is not a multiple of patch {self.patch_size}")

    def _freeze_layers_after(self, feature_layer: int) -> None:
        # hidden_states[k] (k < 0) is the output of layers[L + k]: the layers after it and the final
        # LayerNorm never reach the output. Trainable, they would get no gradient (a DDP error, and
        # optimizer state for nothing); frozen, they keep their weights as untouched ones would.
        if feature_layer == 0:
            return
        vision_model = getattr(self.tower, "vision_model", self.tower)
        layers = getattr(getattr(vision_model, "encoder", None), "layers", None)
        if layers is None:
            logger.warning(
                "vision tower %s: no encoder.layers found, its unused layers stay trainable",
                type(self.tower).__name__,
            )
            return
        unused = list(layers[len(layers) + feature_layer + 1 :])
        unused.append(getattr(vision_model, "post_layernorm", None))
        for module in unused:
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image (fixed: every image is resized to ``IMAGE_SIZE``²)."""
        return self.grid_size**2

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8/float ``[C, H, W]`` images of any sizes → normalised ``[B, 3, S, S]`` float32."""
        device = self.pixel_mean.device
        out = []
        for img in images:
            x = img.to(device=device, dtype=torch.float32)
            if x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(f"expected a [3, H, W] image, got shape {tuple(img.shape)}")
            if self.flip_channels:
                x = x.flip(0)
            # antialias: down-scaling 1024-px inputs to 384 without it aliases badly.
            x = F.interpolate(
                x[None],
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
            out.append((x - self.pixel_mean) / self.pixel_std)
        return torch.stack(out)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, gh*gw, p*p*C], patches row-major, pixels (p, p, C) like Siglip2ImageProcessor.
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.preprocess(images)
        hidden_kw = {"output_hidden_states": True} if self.feature_layer else {}
        dtype = next(self.tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            if self.naflex:
                b, g = x.shape[0], self.grid_size
                shapes = torch.tensor([[g, g]] * b, dtype=torch.long, device=x.device)
                mask = torch.ones(b, g * g, dtype=torch.long, device=x.device)
                out = self.tower(
                    pixel_values=self._patchify(x).to(dtype),
                    pixel_attention_mask=mask,
                    spatial_shapes=shapes,
                    **hidden_kw,
                )
            else:
                kwargs = {}
                if self._interpolate_kw:
                    kwargs["interpolate_pos_encoding"] = self.image_size != getattr(
                        self.tower.config, "image_size", self.image_size
                    )
                out = self.tower(pixel_values=x.to(dtype), **kwargs, **hidden_kw)
        if self.feature_layer:
            return out.hidden_states[self.feature_layer]
        return out.last_hidden_state
