"""Generic segmentation inference of :class:`~flowseg.modeling.meta_arch.flowseg.FlowSeg`:
Mask2Former's semantic / panoptic / instance post-processing of the decoder's class logits and
mask logits, for ``MODEL.FLOWSEG.MODE`` ``"generic"`` (the stage-1 segmentor, with a class head or
with LLM category conditions).
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances

__all__ = ["PANOPTIC_MERGES", "GenericInference", "upsample_to_padded"]

#: MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE: Mask2Former's panoptic merge or X-SAM's variant of it
PANOPTIC_MERGES = ("mask2former", "xsam")


def upsample_to_padded(mask_logits: torch.Tensor, images: ImageList) -> torch.Tensor:
    """Mask logits [B,Q,h,w] (1/4 or 1/8 scale) -> padded input resolution."""
    return F.interpolate(mask_logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)


class GenericInference:
    """Methods of ``FlowSeg`` for generic segmentation results. They read the model's attributes
    ``refiner``, ``metadata``, ``semantic_on`` / ``panoptic_on`` / ``instance_on``,
    ``sem_seg_postprocess_before_inference``, ``panoptic_merge``, ``object_mask_threshold``,
    ``overlap_threshold`` and ``test_topk_per_image``."""

    def generic_inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = outputs["pred_masks"]
        if self.refiner is not None:
            mask_pred_results = self.refiner(mask_pred_results, outputs["mask_features"])
        mask_pred_results = upsample_to_padded(mask_pred_results, images)
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
