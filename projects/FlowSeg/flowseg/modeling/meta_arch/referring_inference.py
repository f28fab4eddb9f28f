"""Referring / reasoning inference of :class:`~flowseg.modeling.meta_arch.flowseg.FlowSeg`:
propose-then-select (paper §3.1: per condition, the query that matches the refined condition
``C^L`` best), BAR (§3.4) on the selected masks, the candidate masks for oracle analysis
(Table 5), and the multi-target / no-target answers of gRefCOCO (:mod:`.gres`).
"""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from .generic_inference import upsample_to_padded
from .gres import gres_answers, select_targets

__all__ = ["ReferringInference"]


class ReferringInference:
    """Methods of ``FlowSeg`` for referring results. They read the model's attributes ``refiner``,
    ``device``, ``return_candidates``, ``gres_all_samples``, ``gres_score_threshold`` and
    ``gres_no_target_threshold``."""

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
            selected = upsample_to_padded(selected[None], images)[0]
            selected = sem_seg_postprocess(selected, image_size, height, width)
            n_valid = int(cond["condition_mask"][b].sum())
            per_cond = [
                {"mask": selected[k] > 0, "score": float(scores[b, k]), "query": int(idx[b, k])}
                for k in range(n_valid)
            ]
            ref = dict(per_cond[0])
            if self.return_candidates:
                cand = upsample_to_padded(pred_masks[b][None], images)[0]
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
            masks = sem_seg_postprocess(upsample_to_padded(masks[None], images)[0], image_size, height, width)
            return masks > 0

        n_valid = int(cond["condition_mask"][b].sum())
        selections = select_targets(prob, n_valid, self.gres_score_threshold, self.gres_no_target_threshold)
        per_cond = gres_answers(selections, final_masks, height, width, device=self.device)
        ref = dict(per_cond[0])
        if self.return_candidates:  # what the evaluator needs to score other thresholds
            ref["query_scores"] = prob[:, 0].tolist()
            ref["candidates"] = final_masks(torch.arange(prob.shape[0]))
        return {"ref_seg": ref, "ref_segs": per_cond}
