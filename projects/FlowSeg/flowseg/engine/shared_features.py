"""Referring evaluation with the image features shared across the expressions of one image.

RefCOCO-style evaluation is per expression (DESIGN §6): RefCOCO val has ~10k sentences on ~1.5k
images, so the plain loop encodes every image ~7 times. This module only GROUPS the work: the
model itself shares it (:meth:`FlowSeg.run_head` with ``image_index``: the segmentation encoder,
the pixel decoder and the vanilla vision tower run once per image; with ``share_llm_prefix`` the
condition head runs its LLM once over the prompt prefix all of an image's expressions share —
chat prefix + image tokens, ~95% of an expression's LLM tokens at paper sizes —
:meth:`LLMConditionHead.forward`), while every expression still gets its own condition and its
own decoder pass, as the paper's expression-level protocol requires. The outputs are those of
``FlowSeg.forward`` on each input alone (same padding: all inputs of a pass share the image, hence
the padded size; equal up to float reduction order of batch K vs 1).

Pieces:

* :class:`GroupedInferenceSampler` — a batch sampler: one batch = the consecutive samples of one
  image (RefCOCO dicts are ordered by ref, refs by image); shards across ranks at image boundaries,
  contiguously, so gathered records keep the dataset order (like Detectron2's ``InferenceSampler``).
* :func:`build_grouped_test_loader` — the test loader of ``FlowSegTrainer`` with that sampler.
* :class:`SharedImageFeatureInference` — wraps a ``FlowSeg`` (or its DDP wrapper); called with a
  batch of dicts it cuts it into runs of consecutive inputs showing the same image (at most
  ``max_expressions_per_pass`` each) and returns one output per input. Usable with Detectron2's
  ``inference_on_dataset`` and any ``DatasetEvaluator``.
* :func:`evaluate_with_shared_features` — loader + wrapper + evaluator in one call.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from ..modeling.meta_arch.image_groups import expand_image_list, group_consecutive_inputs, image_key

__all__ = [
    "GroupedInferenceSampler",
    "SharedImageFeatureInference",
    "build_grouped_test_loader",
    "evaluate_with_shared_features",
    "group_consecutive_inputs",
    "image_key",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- grouping
class GroupedInferenceSampler(Sampler[List[int]]):
    """Batch sampler for evaluation: each batch holds the consecutive samples of one image.

    Args:
        image_keys: per dataset index, what identifies its image (:func:`image_key`).
        max_group_size: split longer runs into batches of at most this many (0 = no limit; the
            image is then encoded once per batch, so prefer limiting the decoder pass with
            ``SharedImageFeatureInference(max_expressions_per_pass=...)``).
        rank, world_size: default Detectron2's ``comm`` values. The runs are dealt out to the
            ranks contiguously, balanced by number of samples, never splitting a run; every
            sample is produced exactly once over all ranks.
    """

    def __init__(
        self,
        image_keys: Sequence[Optional[Hashable]],
        max_group_size: int = 0,
        *,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self._size = len(image_keys)
        rank = comm.get_rank() if rank is None else rank
        world_size = comm.get_world_size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        groups: List[List[int]] = []
        for key, run in itertools.groupby(range(self._size), key=lambda i: image_keys[i]):
            idx = list(run)
            if key is None:  # unknown image: every sample on its own
                groups += [[i] for i in idx]
            elif max_group_size > 0:
                groups += [idx[j : j + max_group_size] for j in range(0, len(idx), max_group_size)]
            else:
                groups.append(idx)
        # Group g goes to the rank whose contiguous share [r*N/W, (r+1)*N/W) holds its first sample.
        self._local = [
            g for g in groups if min(g[0] * world_size // max(self._size, 1), world_size - 1) == rank
        ]
        self.num_groups = len(groups)

    def __iter__(self) -> Iterator[List[int]]:
        yield from (list(g) for g in self._local)

    def __len__(self) -> int:
        return len(self._local)


def build_grouped_test_loader(
    cfg: CfgNode,
    dataset_name: str,
    mapper: Any = None,
    *,
    max_group_size: int = 0,
    num_workers: Optional[int] = None,
) -> DataLoader:
    """``FlowSegTrainer.build_test_loader`` with one image's expressions per batch.

    The data set dicts, the mapper (the one of the data set's kind, :mod:`flowseg.data.build`)
    and the number of workers are those of the per-expression loader; only the batching differs.
    """
    from ..data.build import build_test_mapper  # local: the data package registers mappers on import

    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    if mapper is None:
        mapper = build_test_mapper(cfg, dataset_name)
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    sampler = GroupedInferenceSampler([image_key(d) for d in dicts], max_group_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers,
        collate_fn=trivial_batch_collator,
    )


# ----------------------------------------------------------------------------------- model side
class SharedImageFeatureInference(nn.Module):
    """Evaluate a referring ``FlowSeg`` with image features computed once per image.

    ``forward(batched_inputs)`` returns what ``model(batched_inputs)`` returns (one dict per input,
    ``ref_seg`` / ``ref_segs``): each run of consecutive inputs that show the same image, cut into
    passes of at most ``max_expressions_per_pass``, goes through the model's own
    :meth:`FlowSeg.run_head` with ``image_index`` (image encoders once per pass) and its
    :meth:`FlowSeg.referring_inference`. In training mode, or for a model that is not in referring
    mode, it simply calls the model.

    Args:
        model: a ``FlowSeg`` (a DDP wrapper is unwrapped: evaluation needs no gradient sync).
        max_expressions_per_pass: K of one pass (memory: the decoder keeps
            ``(L+1) x K x Q x H/4 x W/4`` mask logits); ``<= 0``: no limit.
        share_llm_prefix: the condition head runs the LLM once over the expressions' common prompt
            prefix (``FlowSeg.run_head(share_llm_prefix=True)``).

    Attributes ``images_encoded`` / ``expressions`` count the work done since construction.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_expressions_per_pass: int = 16,
        share_llm_prefix: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.training = model.training
        self.max_expressions_per_pass = int(max_expressions_per_pass)
        self.share_llm_prefix = share_llm_prefix
        self.images_encoded = 0
        self.expressions = 0

    @property
    def _applies(self) -> bool:
        # The wrapped model's mode decides (inference_on_dataset puts both in eval mode).
        return not self.model.training and getattr(self.model, "mode", None) == "referring"

    def _passes(self, batched_inputs: List[Dict[str, Any]]) -> List[List[int]]:
        """Input indices of each pass: runs of one image, at most ``max_expressions_per_pass`` long."""
        step = self.max_expressions_per_pass
        passes: List[List[int]] = []
        for group in group_consecutive_inputs(batched_inputs):
            passes += [group[j : j + step] for j in range(0, len(group), step)] if step > 0 else [group]
        return passes

    def forward(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if not self._applies:
            return self.model(batched_inputs)
        m = self.model
        results: List[Optional[Dict[str, Any]]] = [None] * len(batched_inputs)
        for chunk in self._passes(batched_inputs):
            inputs = [batched_inputs[i] for i in chunk]
            images = m.preprocess_image(inputs[:1])
            index = torch.zeros(len(inputs), dtype=torch.long, device=images.tensor.device)
            outputs, cond = m.run_head(
                inputs, images, image_index=index, share_llm_prefix=self.share_llm_prefix
            )
            for i, out in zip(
                chunk, m.referring_inference(outputs, cond, inputs, expand_image_list(images, index))
            ):
                results[i] = out
            self.images_encoded += 1
            self.expressions += len(inputs)
        return results  # type: ignore[return-value]


def evaluate_with_shared_features(
    cfg: CfgNode,
    model: nn.Module,
    dataset_name: str,
    evaluator: Optional[DatasetEvaluator] = None,
    *,
    max_expressions_per_pass: int = 16,
) -> Dict[str, Any]:
    """Evaluate ``model`` on ``dataset_name`` with :class:`SharedImageFeatureInference`.

    ``evaluator`` defaults to the data set's (:func:`flowseg.engine.build_evaluator`). Works
    under ``launch`` like ``DefaultTrainer.test`` (the sampler shards by image; evaluators gather).
    """
    from .evaluation import build_evaluator

    loader = build_grouped_test_loader(cfg, dataset_name)
    if evaluator is None:
        evaluator = build_evaluator(cfg, dataset_name)
    wrapper = SharedImageFeatureInference(model, max_expressions_per_pass=max_expressions_per_pass)
    results = inference_on_dataset(wrapper, loader, evaluator)
    logger.info(
        "%s: %d expressions on %d image encodings (rank %d)",
        dataset_name,
        wrapper.expressions,
        wrapper.images_encoded,
        comm.get_rank(),
    )
    return results
