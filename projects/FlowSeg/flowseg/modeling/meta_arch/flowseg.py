"""The FlowSeg meta-architecture (paper Fig. 3).

Two modes (``MODEL.FLOWSEG.MODE``):

* ``"generic"``: the segmentor of paper stage 1 — SAM-ViT encoder, deformable pixel decoder,
  masked-attention decoder — with Mask2Former's semantic / instance / panoptic inference.
  Without an LLM the classes come from a learnable class head; with one
  (``MODEL.LLM.PATH`` or ``MODEL.LLM.CONFIG``) the category names become ``<p>name</p>``
  condition embeddings and the class logits are query–condition similarities.
* ``"referring"``: referring / reasoning segmentation. The condition head (LLM) turns
  image + instruction into condition embeddings ``C`` and the ``<SEG>`` embedding ``S``; the
  decoder runs Bidirectional Semantic Flow with them; the query whose similarity to the
  refined condition ``C^L`` is highest is selected (propose-then-select), and BAR refines its
  boundary. Loss: ``L = L_llm + L_seg`` (eq. 8).

``FlowSeg`` composes the parts and the training losses; the inference post-processing of each mode
lives in :mod:`.generic_inference` and :mod:`.referring_inference`, whose methods it inherits.
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ...config import llm_configured
from ..criterion import build_criterion
from ..language import build_condition_head
from ..refiner import build_refiner
from .generic_inference import PANOPTIC_MERGES, GenericInference
from .gres import check_thresholds
from .image_groups import expand_image_list, group_consecutive_inputs, image_index_of_groups
from .referring_inference import ReferringInference

logger = logging.getLogger(__name__)

__all__ = ["FlowSeg", "llm_configured"]


@META_ARCH_REGISTRY.register()
class FlowSeg(GenericInference, ReferringInference, nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        condition_head: Optional[nn.Module],
        refiner: Optional[nn.Module],
        mode: str,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        panoptic_merge: str = "mask2former",
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        llm_loss_weight: float = 1.0,
        seg_loss_weight: float = 1.0,
        return_candidates: bool = False,
        gres_score_threshold: float = 0.5,
        gres_no_target_threshold: float = 0.5,
        gres_all_samples: bool = False,
    ):
        super().__init__()
        if mode not in ("generic", "referring"):
            raise ValueError(f"MODEL.FLOWSEG.MODE must be 'generic' or 'referring', got {mode!r}")
        if mode == "referring" and condition_head is None:
            raise ValueError(
                "MODEL.FLOWSEG.MODE 'referring' needs a language model: set MODEL.LLM.PATH "
                "(a local Hugging Face checkpoint) or MODEL.LLM.CONFIG (a config json)."
            )
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.condition_head = condition_head
        self.refiner = refiner
        self.mode = mode
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        if panoptic_merge not in PANOPTIC_MERGES:
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE must be one of {PANOPTIC_MERGES}, got {panoptic_merge!r}"
            )
        self.panoptic_merge = panoptic_merge
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.llm_loss_weight = llm_loss_weight
        self.seg_loss_weight = seg_loss_weight
        self.return_candidates = return_candidates
        # multi-target / no-target answers (gRefCOCO): for samples marked "multi_target", or all
        check_thresholds(gres_score_threshold, gres_no_target_threshold)
        self.gres_score_threshold = float(gres_score_threshold)
        self.gres_no_target_threshold = float(gres_no_target_threshold)
        self.gres_all_samples = bool(gres_all_samples)

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.LLM.SAM_TOKENS.ENABLED and not cfg.MODEL.SAM_VIT.RETURN_SAM_TOKENS:
            raise ValueError(
                "MODEL.LLM.SAM_TOKENS.ENABLED reads the segmentation encoder's 'sam_tokens': "
                "set MODEL.SAM_VIT.RETURN_SAM_TOKENS True as well"
            )
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        has_llm = llm_configured(cfg)
        test = cfg.MODEL.MASK_FORMER.TEST
        meta_name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused__"
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg),
            "condition_head": build_condition_head(cfg) if has_llm else None,
            "refiner": build_refiner(cfg),
            "mode": cfg.MODEL.FLOWSEG.MODE,
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "panoptic_merge": test.get("PANOPTIC_MERGE", "mask2former"),
            "metadata": MetadataCatalog.get(meta_name),
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "llm_loss_weight": cfg.MODEL.FLOWSEG.LLM_LOSS_WEIGHT,
            "seg_loss_weight": cfg.MODEL.FLOWSEG.SEG_LOSS_WEIGHT,
            "gres_score_threshold": cfg.MODEL.FLOWSEG.GRES.SCORE_THRESHOLD,
            "gres_no_target_threshold": cfg.MODEL.FLOWSEG.GRES.NO_TARGET_THRESHOLD,
            "gres_all_samples": cfg.MODEL.FLOWSEG.GRES.ALL_SAMPLES,
            "return_candidates": cfg.TEST.RETURN_CANDIDATES,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ shared steps
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(
            images,
            self.size_divisibility,
            padding_constraints=getattr(self.backbone, "padding_constraints", None),
        )

    def _class_names(self, dataset_name: Optional[str] = None) -> List[str]:
        """Category names of a sample's data set (``dataset_name``, set by the mixed-task loader),
        else of the model's evaluation data set."""
        meta = MetadataCatalog.get(dataset_name) if dataset_name else self.metadata
        names = getattr(meta, "stuff_classes", None) or getattr(meta, "thing_classes", None)
        if not names:
            raise ValueError(
                "generic segmentation with an LLM needs the category names of the data set "
                f"(metadata '{meta.name}' has no stuff_classes/thing_classes)"
            )
        return list(names)

    def encode_conditions(
        self,
        batched_inputs: List[Dict],
        image_index: Optional[torch.Tensor] = None,
        share_llm_prefix: bool = False,
        sam_tokens: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Run the condition head. Generic samples (generic mode, or panoptic batches of mixed
        stage-3 training in referring mode) get every category name as one ``<p>`` span, so
        condition k is class k. ``image_index`` / ``share_llm_prefix``: see
        :meth:`LLMConditionHead.forward` (``image_index``, ``share_prefix``). ``sam_tokens``: the
        backbone's dual-encoder tokens, one per image of ``images``."""
        if self.condition_head is None:
            return {}
        inputs = []
        for x in batched_inputs:
            if self.mode == "generic" or x.get("task") == "generic":
                names = x.get("class_names") or self._class_names(x.get("dataset_name"))
                x = {**x, "task": "generic", "class_names": names}
            inputs.append(x)
        kwargs: Dict[str, object] = {}  # only when used: a custom head need not take them
        if image_index is not None:
            kwargs["image_index"] = image_index
        if share_llm_prefix:
            kwargs["share_prefix"] = True
        if sam_tokens is not None:
            kwargs["sam_tokens"] = sam_tokens
        cond = self.condition_head(inputs, **kwargs)
        if self.mode == "referring" and not bool(cond["condition_mask"].any(dim=1).all()):
            raise ValueError("a referring/reasoning sample produced no condition embedding (empty <p> span?)")
        return cond

    def preprocess_shared_images(
        self, batched_inputs: List[Dict]
    ) -> Tuple[ImageList, Optional[torch.Tensor]]:
        """Normalised, padded images, each image ONCE when consecutive inputs show the same image
        (an image's expressions): returns (unique images, ``image_index`` [B] = row of each input's
        image), or (one image per input, None) when no two consecutive inputs share one."""
        groups = group_consecutive_inputs(batched_inputs)
        if len(groups) == len(batched_inputs):
            return self.preprocess_image(batched_inputs), None
        images = self.preprocess_image([batched_inputs[g[0]] for g in groups])
        return images, image_index_of_groups(groups, self.device)

    def run_head(
        self,
        batched_inputs: List[Dict],
        images: ImageList,
        return_intermediates: bool = False,
        image_index: Optional[torch.Tensor] = None,
        share_llm_prefix: bool = False,
    ) -> Tuple[Dict, Dict]:
        """Encoder, condition head and decoder. ``images`` has one entry per input, or, with
        ``image_index`` ([B], from :meth:`preprocess_shared_images`), one per unique image: the
        encoder, pixel decoder and vision tower then run once per image and the decoder per input.
        ``share_llm_prefix`` (inference): the LLM runs once over the prompt prefix the inputs
        share (one image's expressions: chat prefix + image tokens)."""
        features = self.backbone(images.tensor)
        cond = self.encode_conditions(
            batched_inputs, image_index, share_llm_prefix, sam_tokens=features.get("sam_tokens")
        )
        seg_embed = None
        if "seg_embed" in cond:
            seg_embed = cond["seg_embed"] * cond["seg_mask"].unsqueeze(-1).to(cond["seg_embed"].dtype)
        outputs = self.sem_seg_head(
            features,
            conditions=cond.get("conditions"),
            condition_mask=cond.get("condition_mask"),
            seg_embed=seg_embed,
            return_intermediates=return_intermediates,
            image_index=image_index,
        )
        return outputs, cond

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]) -> object:
        if self.training and all(x.get("task") == "conversation" for x in batched_inputs):
            # stage 2 / conversation batches of stage 3: language modelling only (eq. 9)
            if self.condition_head is None:
                raise ValueError(
                    "conversation data needs a language model (MODEL.LLM.PATH or MODEL.LLM.CONFIG)"
                )
            sam_tokens = None
            if getattr(self.condition_head, "sam_projector", None) is not None:
                # dual-encoder image tokens: the segmentation encoder sees conversation images too
                sam_tokens = self.backbone(self.preprocess_image(batched_inputs).tensor)["sam_tokens"]
            loss = self.condition_head(batched_inputs, compute_loss=True, sam_tokens=sam_tokens)["loss_llm"]
            return {"loss_llm": loss * self.llm_loss_weight}
        images, image_index = self.preprocess_shared_images(batched_inputs)
        outputs, cond = self.run_head(batched_inputs, images, image_index=image_index)
        if image_index is not None:
            images = expand_image_list(images, image_index)
        if self.training:
            return self.losses(outputs, cond, batched_inputs, images)
        if self.mode == "referring":
            return self.referring_inference(outputs, cond, batched_inputs, images)
        return self.generic_inference(outputs, batched_inputs, images)

    def losses(
        self, outputs: Dict, cond: Dict, batched_inputs: List[Dict], images: ImageList
    ) -> Dict[str, torch.Tensor]:
        if "instances" not in batched_inputs[0]:
            raise ValueError(
                "training inputs need 'instances' (gt_masks, gt_classes) from the dataset mapper"
            )
        targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
        mask_features = outputs.pop("mask_features")
        if self.refiner is not None:
            pred_masks = outputs["pred_masks"]

            def refine_fn(batch_idx: torch.Tensor, query_idx: torch.Tensor) -> torch.Tensor:
                return self.refiner.refine_selected(
                    pred_masks[batch_idx, query_idx], mask_features, batch_idx
                )

            outputs["refine_fn"] = refine_fn
        losses = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        out = {k: v * weights[k] * self.seg_loss_weight for k, v in losses.items() if k in weights}
        if "loss_llm" in cond:
            out["loss_llm"] = cond["loss_llm"] * self.llm_loss_weight
        return out

    def prepare_targets(self, targets: List[Instances], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        h_pad, w_pad = images.tensor.shape[-2:]
        new_targets = []
        for t in targets:
            gt_masks = t.gt_masks.tensor if isinstance(t.gt_masks, BitMasks) else t.gt_masks
            padded = torch.zeros(
                (gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=gt_masks.device
            )
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            new_targets.append({"labels": t.gt_classes, "masks": padded})
        return new_targets
