"""The segmentation head: pixel decoder + query decoder, under Mask2Former's names.

``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*`` are the key prefixes of an
original Mask2Former Detectron2 checkpoint, so stage 1 can start from one
(``flowseg.checkpoint.mask2former``). ``sem_seg_head.aux_classifier`` (optional, not in the paper)
is the per-pixel classifier of ``MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT``.
"""

from typing import Dict, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...config import uses_class_head
from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder


@SEM_SEG_HEADS_REGISTRY.register()
class FlowSegHead(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        ignore_value: int = 255,
        aux_classifier_dim: int = 0,
    ):
        """``aux_classifier_dim`` > 0: add a 1x1 conv giving ``num_classes`` logits per pixel of the
        ``aux_classifier_dim``-channel mask features (training only; the criterion pools them
        over each ground-truth segment)."""
        super().__init__()
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda x: x[1].stride)]
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.aux_classifier = (
            nn.Conv2d(aux_classifier_dim, num_classes, 1) if aux_classifier_dim > 0 else None
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        input_shape = {k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
        aux = cfg.MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT > 0
        if aux and not uses_class_head(cfg):
            raise ValueError(
                "MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT > 0 needs a class head (MODEL.FLOWSEG.MODE "
                "'generic' without an LLM): conditions have no fixed classes to classify pixels into"
            )
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "aux_classifier_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM if aux else 0,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            # the multi-scale deformable pixel decoder emits CONVS_DIM-channel maps
            "transformer_predictor": build_transformer_decoder(
                cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
            ),
        }

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        conditions: Optional[torch.Tensor] = None,
        condition_mask: Optional[torch.Tensor] = None,
        seg_embed: Optional[torch.Tensor] = None,
        return_intermediates: bool = False,
        image_index: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """Returns the decoder's output dict plus ``mask_features`` (F_pix, the pixel features
        that BAR reads, at COMMON_STRIDE). With ``image_index`` ([B] long), ``features`` are those
        of the unique images and the decoder's input b reads image ``image_index[b]``."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        if image_index is not None:
            mask_features = mask_features.index_select(0, image_index)
            multi_scale_features = [f.index_select(0, image_index) for f in multi_scale_features]
        outputs = self.predictor(
            multi_scale_features,
            mask_features,
            None,
            conditions=conditions,
            condition_mask=condition_mask,
            seg_embed=seg_embed,
            return_intermediates=return_intermediates,
        )
        outputs["mask_features"] = mask_features
        if self.aux_classifier is not None and self.training:
            outputs["aux_class_logits"] = self.aux_classifier(mask_features)
        return outputs
