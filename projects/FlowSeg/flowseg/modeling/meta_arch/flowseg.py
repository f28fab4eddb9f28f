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
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ...config import llm_configured
from ..criterion import build_criterion
from ..language import build_condition_head
from ..refiner import build_refiner
from .gres import check_thresholds, gres_answers, select_targets
from .image_groups import expand_image_list, group_consecutive_inputs, image_index_of_groups

logger = logging.getLogger(__name__)

__all__ = ["FlowSeg", "llm_configured"]


#: MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE: Mask2Former's panoptic merge or X-SAM's variant of it
PANOPTIC_MERGES = ("mask2former", "xsam")


@META_ARCH_REGISTRY.register()
class FlowSeg(nn.Module):
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

    def _upsample(self, mask_logits: torch.Tensor, images: ImageList) -> torch.Tensor:
        """Mask logits [B,Q,h,w] (1/4 or 1/8 scale) -> padded input resolution."""
        return F.interpolate(mask_logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ referring / reasoning
    @torch.no_grad()
    def select_queries(self, pred_logits: torch.Tensor, condition_mask: Optional[torch.Tensor]) -> Tuple:
        """Propose-then-select: for each condition k, the query maximising p(k | q).

        Returns (scores [B,K], query index [B,K]). Probabilities are the softmax over the
        K conditions + no-object, so a query confident in "no object" is not chosen.
        """
        prob = pred_logits.softmax(-1)[..., :-1]  # [B,Q,K]
        scores, idx = prob.max(dim=1)  # over queries
        if condition_mask is not None:
            scores = scores.masked_fill(~condition_mask, 0.0)
        return scores, idx

    def referring_inference(
        self, outputs: Dict, cond: Dict, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict]:
        """Per input: ``ref_seg`` = the selected mask of the first condition at input resolution,
        its score, and (``return_candidates``) every query's mask for oracle analysis;
        ``ref_segs`` = the same for each ``<p>`` span of a multi-span prompt. Samples marked
        ``multi_target`` (gRefCOCO; every sample with ``gres_all_samples``) are answered by
        :func:`~flowseg.modeling.meta_arch.gres.select_targets` instead: the union of every
        confident query's mask, or an empty mask with ``no_target`` True."""
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        mask_features = outputs["mask_features"]
        scores, idx = self.select_queries(pred_logits, cond.get("condition_mask"))
        results = []
        for b, x in enumerate(batched_inputs):
            if self.gres_all_samples or x.get("multi_target", False):
                results.append(self._gres_inference(b, x, outputs, cond, images))
                continue
            selected = pred_masks[b, idx[b]]  # [K,h,w]
            if self.refiner is not None:
                batch_idx = torch.full((selected.shape[0],), b, dtype=torch.long, device=selected.device)
                selected = self.refiner.refine_selected(selected, mask_features, batch_idx)
            image_size = images.image_sizes[b]
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            selected = self._upsample(selected[None], images)[0]
            selected = sem_seg_postprocess(selected, image_size, height, width)
            n_valid = int(cond["condition_mask"][b].sum())
            per_cond = [
                {"mask": selected[k] > 0, "score": float(scores[b, k]), "query": int(idx[b, k])}
                for k in range(n_valid)
            ]
            ref = dict(per_cond[0])
            if self.return_candidates:
                cand = self._upsample(pred_masks[b][None], images)[0]
                cand = sem_seg_postprocess(cand, image_size, height, width) > 0
                # the selected query's candidate is what was output (BAR-refined), so each
                # sample's oracle IoU (best candidate, Table 5) is at least its IoU: oracle gIoU
                # bounds gIoU (oracle cIoU, a ratio of sums, bounds nothing)
                cand[ref["query"]] = ref["mask"]
                ref["candidates"] = cand
            results.append({"ref_seg": ref, "ref_segs": per_cond})
        return results

    def _gres_inference(self, b: int, x: Dict, outputs: Dict, cond: Dict, images: ImageList) -> Dict:
        """Multi-target / no-target answers of input ``b`` (see :mod:`.gres`)."""
        image_size = images.image_sizes[b]
        height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
        prob = outputs["pred_logits"][b].float().softmax(-1)  # [Q, K+1], last = no object

        def final_masks(queries: torch.Tensor) -> torch.Tensor:
            masks = outputs["pred_masks"][b, queries.to(self.device)]
            if self.refiner is not None:
                batch_idx = torch.full((len(queries),), b, dtype=torch.long, device=masks.device)
                masks = self.refiner.refine_selected(masks, outputs["mask_features"], batch_idx)
            masks = sem_seg_postprocess(self._upsample(masks[None], images)[0], image_size, height, width)
            return masks > 0

        n_valid = int(cond["condition_mask"][b].sum())
        selections = select_targets(prob, n_valid, self.gres_score_threshold, self.gres_no_target_threshold)
        per_cond = gres_answers(selections, final_masks, height, width, device=self.device)
        ref = dict(per_cond[0])
        if self.return_candidates:  # what the evaluator needs to score other thresholds
            ref["query_scores"] = prob[:, 0].tolist()
            ref["candidates"] = final_masks(torch.arange(prob.shape[0]))
        return {"ref_seg": ref, "ref_segs": per_cond}

    # ------------------------------------------------------------------ generic segmentation
    def generic_inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = outputs["pred_masks"]
        if self.refiner is not None:
            mask_pred_results = self.refiner(mask_pred_results, outputs["mask_features"])
        mask_pred_results = self._upsample(mask_pred_results, images)
        processed_results = []
        for mask_cls, mask_pred, x, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            res: Dict[str, object] = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
            if self.semantic_on:
                r = self.semantic_inference(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    r = sem_seg_postprocess(r, image_size, height, width)
                res["sem_seg"] = r
            if self.panoptic_on:
                res["panoptic_seg"] = self.panoptic_inference(mask_cls, mask_pred)
            if self.instance_on:
                res["instances"] = self.instance_inference(mask_cls, mask_pred)
            processed_results.append(res)
        return processed_results

    def semantic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        # per-pixel class scores = sum over queries of p(class | q) * sigmoid(mask_q)
        return torch.einsum("qc,qhw->chw", mask_cls.softmax(-1)[..., :-1], mask_pred.sigmoid())

    def _is_thing(self, contiguous_id: int) -> bool:
        ids = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None)
        return ids is not None and contiguous_id in set(ids.values())

    def panoptic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor):
        """Mask2Former's panoptic merge: keep confident non-void queries, give every pixel to
        the query with the highest score x mask probability, drop segments that lost most
        of their own mask to others, merge stuff segments of the same class.

        ``panoptic_merge`` ``"xsam"`` is X-SAM's variant (Hugging Face's DETR-style merge): a
        query's own area is where score x probability >= 0.5 (not probability >= 0.5), its
        segment is every pixel it owns (not only those where its probability >= 0.5), and it is
        kept when owned / own area > OVERLAP_THRESHOLD (Mask2Former: >=)."""
        num_classes = mask_cls.shape[-1] - 1
        xsam = self.panoptic_merge == "xsam"
        # X-SAM labels each query with its best real class (no-object column dropped first)
        probs = mask_cls.softmax(-1)
        scores, labels = (probs[:, :-1] if xsam else probs).max(-1)
        keep = labels.ne(num_classes) & (scores > self.object_mask_threshold)
        cur_scores, cur_classes = scores[keep], labels[keep]
        cur_masks = mask_pred.sigmoid()[keep]
        h, w = mask_pred.shape[-2:]
        panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
        segments_info: List[Dict] = []
        if cur_masks.shape[0] == 0:
            return panoptic_seg, segments_info
        weighted = cur_scores.view(-1, 1, 1) * cur_masks
        owner = weighted.argmax(0)
        stuff_segment: Dict[int, int] = {}
        for k in range(cur_classes.shape[0]):
            pred_class = int(cur_classes[k])
            own = (weighted[k] if xsam else cur_masks[k]) >= 0.5
            mask = (owner == k) if xsam else (owner == k) & own
            owned_area, own_area = int((owner == k).sum()), int(own.sum())
            if owned_area == 0 or own_area == 0 or int(mask.sum()) == 0:
                continue
            ratio = owned_area / own_area
            if (ratio <= self.overlap_threshold) if xsam else (ratio < self.overlap_threshold):
                continue
            isthing = self._is_thing(pred_class)
            if not isthing and pred_class in stuff_segment:
                panoptic_seg[mask] = stuff_segment[pred_class]
                continue
            segment_id = len(segments_info) + 1
            panoptic_seg[mask] = segment_id
            if not isthing:
                stuff_segment[pred_class] = segment_id
            segments_info.append({"id": segment_id, "isthing": isthing, "category_id": pred_class})
        return panoptic_seg, segments_info

    def instance_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> Instances:
        image_size = mask_pred.shape[-2:]
        num_classes = mask_cls.shape[-1] - 1
        scores = mask_cls.softmax(-1)[:, :-1]
        labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(mask_cls.shape[0], 1)
        topk = min(self.test_topk_per_image, scores.numel())
        scores_per_image, topk_indices = scores.flatten(0, 1).topk(topk, sorted=False)
        labels_per_image = labels.flatten(0, 1)[topk_indices]
        mask_pred = mask_pred[topk_indices // num_classes]
        if self.panoptic_on:
            # COCO-panoptic instance results: things only
            keep = torch.tensor(
                [self._is_thing(int(lab)) for lab in labels_per_image],
                dtype=torch.bool,
                device=mask_pred.device,
            )
            scores_per_image, labels_per_image, mask_pred = (
                scores_per_image[keep],
                labels_per_image[keep],
                mask_pred[keep],
            )
        result = Instances(image_size)
        result.pred_masks = (mask_pred > 0).float()
        result.pred_boxes = BitMasks(result.pred_masks > 0).get_bounding_boxes()
        # mask score = mean foreground probability inside the predicted mask
        mask_scores = (mask_pred.sigmoid().flatten(1) * result.pred_masks.flatten(1)).sum(1) / (
            result.pred_masks.flatten(1).sum(1) + 1e-6
        )
        result.scores = scores_per_image * mask_scores
        result.pred_classes = labels_per_image
        return result
