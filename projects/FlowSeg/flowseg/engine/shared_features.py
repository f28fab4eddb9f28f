"""Referring evaluation with the image features shared across the expressions of one image.

RefCOCO-style evaluation is per expression (DESIGN §6): RefCOCO val has ~10k sentences on ~1.5k
images, so the plain loop encodes every image ~7 times. Here everything that depends on the image
only runs ONCE per image:

* the segmentation encoder (SAM-ViT + feature pyramid, ``model.backbone``),
* the pixel decoder (deformable encoder + FPN, ``model.sem_seg_head.pixel_decoder``),
* the vanilla vision tower (``model.condition_head.vision_encoder``; its tokens are handed to the
  condition head instead of recomputing them),

while every expression still gets its own condition-head (LLM) pass and its own decoder pass, as
the paper's expression-level protocol requires. Optionally (``share_llm_prefix``, on by default)
the LLM's key/value cache of the common prompt prefix — chat prefix + the image tokens, identical
for all expressions of an image and ~95% of an expression's LLM tokens at paper sizes — is also
computed once: causal attention makes the later tokens' states exactly those of the full pass. The K expressions of an image go through the LLM
and the decoder as one batch of K; the image features are broadcast with ``Tensor.expand`` (views,
no copies). The outputs are those of ``FlowSeg.forward`` on each input alone (same padding: all K
inputs share the image, hence the padded size; equal up to float reduction order of batch K vs 1).

Pieces:

* :class:`GroupedInferenceSampler` — a batch sampler: one batch = the consecutive samples of one
  image (RefCOCO dicts are ordered by ref, refs by image); shards across ranks at image boundaries,
  contiguously, so gathered records keep the dataset order (like Detectron2's ``InferenceSampler``).
* :func:`build_grouped_test_loader` — the test loader of ``FlowSegTrainer`` with that sampler.
* :class:`SharedImageFeatureInference` — wraps a ``FlowSeg`` (or its DDP wrapper); called with a
  batch of dicts it groups consecutive inputs showing the same image and returns one output per
  input. Usable with Detectron2's ``inference_on_dataset`` and any ``DatasetEvaluator``.
* :func:`evaluate_with_shared_features` — loader + wrapper + evaluator in one call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.structures import ImageList
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from ..modeling.meta_arch.image_groups import group_consecutive_inputs, image_key

__all__ = [
    "GroupedInferenceSampler",
    "SharedImageFeatures",
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
class _PrecomputedImageTokens(nn.Module):
    """Stands in for the condition head's vision encoder: returns the image's tokens for every input."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens  # [1, N, D]: a plain attribute, not a buffer (never saved)

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.tokens.expand(len(images), -1, -1)


@contextlib.contextmanager
def _vision_tokens_shared(
    condition_head: Optional[nn.Module], tokens: Optional[torch.Tensor]
) -> Iterator[None]:
    # LLMConditionHead.forward calls self.vision_encoder(images) and has no argument for
    # precomputed tokens: swap the encoder for the duration of the call (see the report's diff
    # for an ``image_tokens=`` argument that would make this unnecessary).
    if tokens is None or condition_head is None:
        yield
        return
    original = condition_head.vision_encoder
    condition_head.vision_encoder = _PrecomputedImageTokens(tokens)
    try:
        yield
    finally:
        condition_head.vision_encoder = original


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs[1:]):
            return i
    return n


def _cache_layers(cache: Any) -> Optional[List[tuple]]:
    """(keys, values) per layer of a ``transformers`` DynamicCache ([B, kv_heads, T, head_dim])."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or not getattr(layer, "is_initialized", True):
            return None
        out.append((keys, values))
    return out


def conditions_with_shared_prefix(
    head: nn.Module,
    inputs: Sequence[Dict[str, Any]],
    vision_tokens: Optional[torch.Tensor],
    sam_tokens: Optional[torch.Tensor] = None,
) -> Optional[Dict[str, Any]]:
    """``head(inputs)`` for K inputs of one image, running the LLM over their common prefix once.

    The sequences are ``[chat prefix] <image tokens> [rest]``; the longest common prefix (at least
    up to the image tokens when there is an image) is run once with ``use_cache=True``, and the K
    suffixes are run as one right-padded batch on top of the (expanded) key/value cache. Returns
    the same dict as ``LLMConditionHead.forward`` in evaluation (``conditions``, ``condition_mask``,
    ``seg_embed``, ``seg_mask``, ``span_positions``, ``seg_positions``), or ``None`` when the head
    does not support it (no decoder stack exposed, no common prefix, cache API unknown): the
    caller then uses the head's own forward.
    """
    from ..modeling.language.prompts import shift_position

    decoder = head._decoder() if hasattr(head, "_decoder") else None
    if decoder is None:
        return None
    encoded = head.encode(inputs)
    image_pos = {e.image_position for e in encoded}
    if len(image_pos) != 1:
        return None
    q = image_pos.pop()
    device = head.device
    embed = head.llm.get_input_embeddings()
    n_img, image_embeds = 0, None
    if q is not None:
        if vision_tokens is not None:
            vision_tokens = vision_tokens[:1]
        # [1, N, D_llm]: φ_vis tokens (+ the dual encoder's SAM tokens)
        image_embeds = head.image_embeddings(
            inputs[:1], vision_tokens, None if sam_tokens is None else sam_tokens[:1]
        )
        n_img = image_embeds.shape[1]
    # Common prefix in the post-insertion sequence: text before <image>, the image, then any
    # further common text tokens (e.g. "\nPlease segment").
    ids = [e.input_ids for e in encoded]
    n_text = _common_prefix_len(ids)
    if q is not None:
        if n_text <= q:
            return None  # the chat prefix differs: nothing shared
        n_text = max(n_text, q + 1)
    if n_text >= min(len(x) for x in ids):
        n_text = min(len(x) for x in ids) - 1  # keep >= 1 token per suffix
    if n_text <= 0:
        return None
    prefix_ids = torch.tensor(ids[0][:n_text], dtype=torch.long, device=device)
    prefix = embed(prefix_ids.clamp(min=0))  # a negative <image> sentinel id (X-SAM) is replaced below
    if image_embeds is not None:
        prefix = torch.cat([prefix[:q], image_embeds[0].to(prefix.dtype), prefix[q + 1 :]])
    p_len = prefix.shape[0]

    out = decoder(inputs_embeds=prefix[None], use_cache=True)
    prefix_hidden = out.last_hidden_state  # [1, P, D]
    layers = _cache_layers(out.past_key_values)
    if layers is None:
        return None
    from transformers import DynamicCache

    k = len(inputs)
    suffixes = [embed(torch.tensor(x[n_text:], dtype=torch.long, device=device)) for x in ids]
    s_max = max(x.shape[0] for x in suffixes)
    suffix_embeds = suffixes[0].new_zeros(k, s_max, suffixes[0].shape[-1])
    attention_mask = torch.zeros(k, p_len + s_max, dtype=torch.long, device=device)
    attention_mask[:, :p_len] = 1
    for b, x in enumerate(suffixes):  # right padding, as the head does
        suffix_embeds[b, : x.shape[0]] = x
        attention_mask[b, p_len : p_len + x.shape[0]] = 1
    # DynamicCache copies the (expanded) prefix keys/values once per pass; the suffix appends to it.
    cache = DynamicCache(
        ddp_cache_data=[(kk.expand(k, -1, -1, -1), vv.expand(k, -1, -1, -1)) for kk, vv in layers]
    )
    suffix_hidden = decoder(
        inputs_embeds=suffix_embeds, attention_mask=attention_mask, past_key_values=cache, use_cache=True
    ).last_hidden_state
    hidden = torch.cat([prefix_hidden.expand(k, -1, -1), suffix_hidden], dim=1)  # [K, P + S, D]

    # Pooling: as LLMConditionHead.forward (X-SAM: mean of φ_llm over <p>..</p>; S at <SEG>).
    span_positions = [
        [(shift_position(s, q, n_img), shift_position(e, q, n_img)) for s, e in x.spans] for x in encoded
    ]
    seg_positions = [
        None if x.seg_position is None else shift_position(x.seg_position, q, n_img) for x in encoded
    ]
    return head.pool_outputs(hidden, span_positions, seg_positions)


@dataclass
class SharedImageFeatures:
    """What one image contributes to all its expressions (batch dimension 1)."""

    images: ImageList  # the normalised, padded image
    mask_features: torch.Tensor  # [1, C, H/4, W/4] (F_pix)
    multi_scale_features: List[torch.Tensor]  # 3 x [1, C, h, w], 1/32, 1/16, 1/8
    vision_tokens: Optional[torch.Tensor]  # [1, N, D_vis] raw vanilla-encoder tokens (before φ_vis)
    sam_tokens: Optional[torch.Tensor] = None  # [1, C, h, w] the backbone's dual-encoder tokens


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.expand(k, *t.shape[1:])


class SharedImageFeatureInference(nn.Module):
    """Evaluate a referring ``FlowSeg`` with image features computed once per image.

    ``forward(batched_inputs)`` returns exactly what ``model(batched_inputs)`` returns (one dict per
    input, ``ref_seg`` / ``ref_segs``), computing the image-only parts once for each run of
    consecutive inputs that show the same image. In training mode, or for a model that is not in
    referring mode, it simply calls the model.

    Args:
        model: a ``FlowSeg`` (a DDP wrapper is unwrapped: evaluation needs no gradient sync).
        max_expressions_per_pass: K of one LLM + decoder pass (memory: the decoder keeps
            ``(L+1) x K x Q x H/4 x W/4`` mask logits); longer runs are cut into several passes
            that reuse the same image features. ``<= 0``: no limit.
        share_vision_tokens: also compute the vanilla encoder's tokens once per image.
        share_llm_prefix: run the LLM over the expressions' common prompt prefix (chat prefix +
            image tokens) once per pass (:func:`conditions_with_shared_prefix`); falls back to
            the condition head's own forward where that does not apply.

    Attributes ``images_encoded`` / ``expressions`` count the work done since construction.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_expressions_per_pass: int = 16,
        share_vision_tokens: bool = True,
        share_llm_prefix: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.training = model.training
        self.max_expressions_per_pass = int(max_expressions_per_pass)
        self.share_vision_tokens = share_vision_tokens
        self.share_llm_prefix = share_llm_prefix
        self.images_encoded = 0
        self.expressions = 0

    @property
    def _applies(self) -> bool:
        # The wrapped model's mode decides (inference_on_dataset puts both in eval mode).
        return not self.model.training and getattr(self.model, "mode", None) == "referring"

    # ------------------------------------------------------------------ the two halves
    def encode_image(self, x: Dict[str, Any]) -> SharedImageFeatures:
        """Everything that depends on the image of ``x`` only."""
        m = self.model
        images = m.preprocess_image([x])
        features = m.backbone(images.tensor)
        mask_features, _, multi_scale = m.sem_seg_head.pixel_decoder.forward_features(features)
        tokens = None
        head = m.condition_head
        if (
            self.share_vision_tokens
            and head is not None
            and getattr(head, "vision_encoder", None) is not None
        ):
            tokens = head.vision_encoder([x["image"]])
        self.images_encoded += 1
        return SharedImageFeatures(
            images, mask_features, list(multi_scale), tokens, features.get("sam_tokens")
        )

    def decode(self, feats: SharedImageFeatures, inputs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Condition head + decoder + selection/BAR for the K expressions of one encoded image."""
        m = self.model
        k = len(inputs)
        cond = self._conditions(feats, inputs)
        seg_embed = None
        if "seg_embed" in cond:  # as FlowSeg.run_head: no <SEG> -> zero S
            seg_embed = cond["seg_embed"] * cond["seg_mask"].unsqueeze(-1).to(cond["seg_embed"].dtype)
        mask_features = _expand(feats.mask_features, k)
        outputs = m.sem_seg_head.predictor(
            [_expand(f, k) for f in feats.multi_scale_features],
            mask_features,
            None,
            conditions=cond.get("conditions"),
            condition_mask=cond.get("condition_mask"),
            seg_embed=seg_embed,
        )
        outputs["mask_features"] = mask_features
        images = ImageList(_expand(feats.images.tensor, k), list(feats.images.image_sizes) * k)
        self.expressions += k
        return m.referring_inference(outputs, cond, list(inputs), images)

    def _conditions(self, feats: SharedImageFeatures, inputs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        m = self.model
        cond = None
        # generic samples get their category names from FlowSeg.encode_conditions: not shared here
        plain = all(x.get("task", "referring") in ("referring", "reasoning") for x in inputs)
        if self.share_llm_prefix and plain and m.condition_head is not None and len(inputs) > 1:
            cond = conditions_with_shared_prefix(
                m.condition_head, inputs, feats.vision_tokens, feats.sam_tokens
            )
            if cond is not None and not bool(cond["condition_mask"].any(dim=1).all()):
                # same check as FlowSeg.encode_conditions
                raise ValueError(
                    "a referring/reasoning sample produced no condition embedding (empty <p> span?)"
                )
        if cond is None:
            sam = None if feats.sam_tokens is None else _expand(feats.sam_tokens, len(inputs))
            with _vision_tokens_shared(m.condition_head, feats.vision_tokens):
                cond = m.encode_conditions(list(inputs), sam_tokens=sam)
        return cond

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if not self._applies:
            return self.model(batched_inputs)
        results: List[Optional[Dict[str, Any]]] = [None] * len(batched_inputs)
        step = self.max_expressions_per_pass
        for group in group_consecutive_inputs(batched_inputs):
            feats = self.encode_image(batched_inputs[group[0]])
            chunks = [group] if step <= 0 else [group[j : j + step] for j in range(0, len(group), step)]
            for chunk in chunks:
                for i, out in zip(chunk, self.decode(feats, [batched_inputs[i] for i in chunk])):
                    results[i] = out
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
