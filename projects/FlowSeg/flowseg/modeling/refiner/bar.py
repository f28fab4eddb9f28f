"""Boundary-Aware Refinement (BAR), FlowSeg §3.4 (eq. 6-7), appendix A.1 and Fig. 5.

``B  = 1[(dilate(P) - erode(P)) > eps]``                     (eq. 6, 3x3 max / min pooling)
``dM = tanh(f_refine([M_raw || f_comp(F_pix)])) * alpha``    (eq. 7)
``M  = M_raw + dM * B``

``f_comp`` is a 1x1 conv (mask_dim -> 16), ``f_refine`` two 3x3 convs with a ReLU between them
("a lightweight CNN with two convolutional layers"), ``alpha`` a learnable scalar. Pixels with
``B = 0`` are returned bit-identical ("enhancement-not-replacement").

Implementation note: the first conv of ``f_refine`` is linear in its input, so
``conv([M || f_comp(F)]) = conv_M(M) + conv_F(f_comp(F)) + bias`` (zero padding of the
concatenation is the zero padding of each part). The pixel term is therefore computed once per
image and broadcast to all of its queries, instead of concatenating a copy of the compressed
features to every query's mask. The checkpoint layout is still that of a plain
``Conv2d(1 + compress_dim, hidden, 3)``.

Scale: the paper runs BAR on 1/4-scale mask logits. With ``upsample`` = 2 (mask features at 1/8, as
in X-SAM's scaffold) the logits and the compressed pixel features are bilinearly upsampled to 1/4
first; ``f_comp`` (1x1) commutes with bilinear interpolation, so compressing before upsampling
gives the same result at a quarter of the cost. The refined logits come out at the upsampled size.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from ..registry import REFINER_REGISTRY

__all__ = ["BoundaryAwareRefiner", "boundary_map"]


def boundary_map(prob: Tensor, epsilon: float) -> Tensor:
    """Eq. 6: morphological gradient of ``prob`` (3x3, stride 1, padding 1) thresholded at ``epsilon``.

    ``prob`` is ``[..., H, W]``; the result is a float 0/1 tensor of the same shape. Max pooling
    pads with -inf, so the image border neither dilates nor erodes the map: a mask touching the
    border gets no boundary along it (there is no evidence of an edge there).
    """
    shape = prob.shape
    x = prob.reshape(-1, 1, shape[-2], shape[-1])
    dilated = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, kernel_size=3, stride=1, padding=1)
    return ((dilated - eroded) > epsilon).to(prob.dtype).reshape(shape)


@REFINER_REGISTRY.register()
class BoundaryAwareRefiner(nn.Module):
    """Residual refinement of mask logits restricted to uncertain boundary pixels."""

    @configurable
    def __init__(
        self,
        *,
        mask_dim: int,
        epsilon: float = 0.1,
        compress_dim: int = 16,
        hidden_dim: int = 32,
        alpha_init: float = 0.1,
        upsample: int = 1,
    ) -> None:
        """
        Args:
            mask_dim: channels of the pixel features ``F_pix`` (256 in the paper).
            epsilon: boundary threshold of eq. 6 (1.0 switches the refinement off: a probability
                gradient never exceeds 1).
            compress_dim: output channels of ``f_comp`` (16 in A.1).
            hidden_dim: width between the two convs of ``f_refine``.
            alpha_init: initial value of the learnable scale ``alpha``.
            upsample: integer factor by which mask logits and pixel features are upsampled
                (bilinear) before refinement (1: refine at the mask features' scale).
        """
        super().__init__()
        if int(upsample) != upsample or upsample < 1:
            raise ValueError(f"BAR upsample factor must be an integer >= 1, got {upsample}")
        self.upsample = int(upsample)
        self.epsilon = float(epsilon)
        self.f_comp = nn.Conv2d(mask_dim, compress_dim, kernel_size=1)
        self.f_refine = nn.Sequential(
            nn.Conv2d(1 + compress_dim, hidden_dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, 1, kernel_size=3, padding=1),
        )
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        bar = cfg.MODEL.FLOWSEG.BAR
        mask_stride = cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE
        if bar.STRIDE and (bar.STRIDE > mask_stride or mask_stride % bar.STRIDE):
            raise ValueError(
                f"MODEL.FLOWSEG.BAR.STRIDE={bar.STRIDE} must divide the mask features' stride "
                f"(MODEL.SEM_SEG_HEAD.COMMON_STRIDE={mask_stride}); 0 = that stride"
            )
        return {
            "upsample": mask_stride // bar.STRIDE if bar.STRIDE else 1,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "epsilon": bar.EPSILON,
            "compress_dim": bar.COMPRESS_DIM,
            "hidden_dim": bar.HIDDEN_DIM,
            "alpha_init": bar.ALPHA_INIT,
        }

    # ------------------------------------------------------------------ pieces
    def boundary_map(self, prob: Tensor) -> Tensor:
        """Eq. 6 with this module's ``epsilon``; ``prob`` is ``[..., H, W]`` in [0, 1]."""
        return boundary_map(prob, self.epsilon)

    def _pixel_term(self, pixel_features: Tensor) -> Tensor:
        """``conv1`` applied to the ``f_comp`` channels of the concatenation (+ bias): [B, hidden, H, W]."""
        conv1 = self.f_refine[0]
        compressed = self._up(self.f_comp(pixel_features))  # once per image, shared by all its queries
        return F.conv2d(compressed, conv1.weight[:, 1:], conv1.bias, padding=conv1.padding)

    def _mask_term(self, masks: Tensor) -> Tensor:
        """``conv1`` applied to the mask-logit channel: [N, H, W] -> [N, hidden, H, W]."""
        conv1 = self.f_refine[0]
        return F.conv2d(masks.unsqueeze(1), conv1.weight[:, :1], None, padding=conv1.padding)

    def _residual(self, mask_logits: Tensor, hidden_pre: Tensor) -> Tensor:
        """Second half of ``f_refine``, tanh, alpha and the boundary-restricted residual (eq. 7).

        ``mask_logits``: [N, H, W]; ``hidden_pre``: [N, hidden, H, W] (first conv's output).
        """
        delta = self.f_refine[2](self.f_refine[1](hidden_pre)).squeeze(1)
        delta = torch.tanh(delta) * self.alpha
        with torch.no_grad():
            # B is a 0/1 selector, not a path for gradients (it is piecewise constant anyway).
            boundary = self.boundary_map(mask_logits.detach().sigmoid()) > 0
        # torch.where (not M + dM * B) keeps non-boundary pixels bit-identical even if dM is inf/nan.
        return torch.where(boundary, mask_logits + delta, mask_logits)

    def _up(self, x: Tensor) -> Tensor:
        """Bilinear upsampling of [N, C, H, W] or [N, H, W] by ``self.upsample``."""
        if self.upsample == 1:
            return x
        size = (x.shape[-2] * self.upsample, x.shape[-1] * self.upsample)
        if x.dim() == 3:
            return F.interpolate(x.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def _check_sizes(mask_logits: Tensor, pixel_features: Tensor) -> None:
        if mask_logits.shape[-2:] != pixel_features.shape[-2:]:
            raise ValueError(
                "BAR expects mask logits and pixel features at the same resolution, got "
                f"{tuple(mask_logits.shape)} and {tuple(pixel_features.shape)}"
            )

    # ------------------------------------------------------------------ entry points
    def forward(self, mask_logits: Tensor, pixel_features: Tensor) -> Tensor:
        """Refine every query's mask.

        Args:
            mask_logits: ``[B, Q, H, W]`` raw mask logits (any Q, e.g. a gathered subset).
            pixel_features: ``[B, C, H, W]`` pixel-decoder mask features.
        Returns:
            ``[B, Q, H*u, W*u]`` refined logits (``u`` = ``self.upsample``).
        """
        self._check_sizes(mask_logits, pixel_features)
        mask_logits = self._up(mask_logits)
        b, q, h, w = mask_logits.shape
        pixel_term = self._pixel_term(pixel_features)  # [B, hidden, H, W]
        mask_term = self._mask_term(mask_logits.reshape(b * q, h, w))  # [B*Q, hidden, H, W]
        # Broadcast the per-image term over the Q queries (a view, no per-query copy of it).
        hidden_pre = mask_term.view(b, q, pixel_term.shape[1], h, w) + pixel_term.unsqueeze(1)
        out = self._residual(mask_logits.reshape(b * q, h, w), hidden_pre.flatten(0, 1))
        return out.view(b, q, h, w)

    def refine_selected(
        self, mask_logits: Tensor, pixel_features: Tensor, batch_idx: Optional[Tensor] = None
    ) -> Tensor:
        """Refine only some queries' masks (e.g. the ones matched to targets in the criterion).

        Args:
            mask_logits: ``[N, H, W]`` selected masks.
            pixel_features: ``[B, C, H, W]`` features of the whole batch.
            batch_idx: ``[N]`` long, image index of each selected mask (``None``: all from image 0).
        Returns:
            ``[N, H*u, W*u]`` refined logits. With N = 0 the (empty) result is still computed through
            every parameter, so that DDP sees them used on batches without matched queries.
        """
        self._check_sizes(mask_logits, pixel_features)
        if batch_idx is None:
            batch_idx = torch.zeros(mask_logits.shape[0], dtype=torch.long, device=mask_logits.device)
        mask_logits = self._up(mask_logits)
        # f_comp once per referenced image (inference calls this per image with a B-image batch).
        images, inverse = torch.unique(batch_idx.to(pixel_features.device), return_inverse=True)
        pixel_term = self._pixel_term(pixel_features[images])
        hidden_pre = self._mask_term(mask_logits) + pixel_term[inverse]
        return self._residual(mask_logits, hidden_pre)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, upsample={self.upsample}"
