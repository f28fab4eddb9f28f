"""LLM condition head: image + instruction → condition embeddings ``C`` and SEG embedding ``S``.

Paper §3.1 "Language Model Processing" and A.2 (eq. 11); X-SAM's pooling convention (DESIGN §3):

1. the instruction (``<p>…</p>``-marked phrases) and a teacher-forced answer containing ``<SEG>``
   are tokenised (:mod:`.prompts`);
2. the vanilla encoder's image tokens, projected by ``φ_vis``, replace the ``<image>`` placeholder
   in the LLM's input embeddings (:mod:`.sequences`);
3. one LLM forward pass gives the last hidden states ``H`` (:mod:`.hidden_states`); the LM loss
   covers the answer tokens;
4. ``C_k`` = mean of ``φ_llm(H_t)`` over the tokens ``t`` of span ``k`` from ``<p>`` to ``</p>``
   (markers included); ``S = φ_llm(H_seg)`` at the ``<SEG>`` token (:mod:`.conditions`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ...utils.bad_samples import BadSampleError, describe_sample
from ..backbone.sam_vit import sam_vit_embed_dim
from ..registry import CONDITION_HEAD_REGISTRY
from .conditions import pool_conditions
from .hidden_states import decoder_stack, last_hidden, last_hidden_shared_prefix
from .llm import LoraSettings, load_causal_lm, load_tokenizer, parse_dtype, setup_trainable
from .projector import MLPProjector, pixel_unshuffle_tokens
from .prompts import IGNORE_INDEX, PROMPT_STYLES, EncodedPrompt, encode_sample
from .sequences import insert_image_tokens, pad_right, shared_prefix_len
from .tokens import (
    IMAGE_TOKEN_INDEX,
    P_END,
    P_START,
    SEG,
    SPECIAL_TOKENS,
    XSAM_SPECIAL_TOKENS,
    SpecialTokenIds,
    add_special_tokens,
    resize_token_embeddings,
)
from .vanilla_encoder import VanillaEncoder, build_vision_tower

__all__ = ["LLMConditionHead"]


@CONDITION_HEAD_REGISTRY.register()
class LLMConditionHead(nn.Module):
    """Condition head of FlowSeg (vanilla encoder + ``φ_vis`` + LLM (+LoRA) + ``φ_llm``).

    ``forward(batched_inputs)`` takes Detectron2-style dicts with ``"image"`` (uint8 ``[3, H, W]``),
    ``"task"`` (``"referring" | "reasoning" | "generic" | "conversation"``), ``"expression"`` or
    ``"class_names"``, optional ``"prompt"`` / ``"answer"`` / ``"conversations"`` (see
    :func:`.prompts.build_instruction`) and returns::

        conditions      [B, K, hidden_dim]  K = most spans in the batch, zero-padded
        condition_mask  [B, K] bool          True where a span exists
        seg_embed       [B, hidden_dim]      zeros where the sample has no <SEG>
        seg_mask        [B] bool
        span_positions  list (per sample) of (start, end) positions in the LLM sequence
        seg_positions   list (per sample) of the <SEG> position or None
        loss_llm        scalar, mean CE over answer tokens (when training or compute_loss=True)
        hidden_states, inputs_embeds, attention_mask, labels   (when return_hidden_states=True)
    """

    @configurable
    def __init__(
        self,
        *,
        llm: nn.Module,
        tokenizer,
        hidden_dim: int,
        vision_encoder: VanillaEncoder | None = None,
        proj_hidden_dim: int = 0,
        max_length: int = 512,
        freeze_llm: bool = True,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        sam_token_dim: int = 0,
        sam_downsample: float = 0.5,
        prompt_style: str = "flowseg",
        chat_format: str = "chatml",
    ):
        """
        Args:
            llm: a ``transformers`` causal LM (not yet peft-wrapped).
            tokenizer: its tokenizer; the special tokens are added here and the embeddings resized.
            hidden_dim: decoder width (output of ``φ_llm``, 256 in the paper).
            vision_encoder: image tower; ``None`` = text only (the ``<image>`` placeholder is dropped).
            proj_hidden_dim: ``φ_llm``'s hidden width ``h`` (0 → ``D_llm``).
            max_length: maximum number of text tokens per sample (image tokens not counted; ≤0: no limit).
            freeze_llm: freeze the base LLM weights (LoRA and the new token rows still train).
            lora: LoRA settings (``None`` or ``enabled=False``: no LoRA).
            gradient_checkpointing: activation checkpointing in the LLM.
            sam_token_dim: channels of the segmentation encoder's ``sam_tokens`` (X-SAM's dual
                encoder); > 0 adds ``sam_projector`` = Linear(C/s², D_llm)–GELU–Linear(D_llm, D_llm)
                on the pixel-unshuffled tokens, placed after the vanilla encoder's at ``<image>``.
            sam_downsample: the unshuffle factor ``s`` (0.5: 2x2 cells, 4x the channels).
            prompt_style: ``"flowseg"`` or ``"xsam"`` (:func:`.prompts.encode_sample`).
            chat_format: the ``"xsam"`` style's dialogue markers: ``"chatml"`` (Qwen) or ``"phi3"``.
        """
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown MODEL.LLM.PROMPT_STYLE {prompt_style!r}; use one of {PROMPT_STYLES}")
        self.prompt_style = prompt_style
        self.chat_format = chat_format
        self.tokenizer = tokenizer
        # X-SAM's vocabulary: <SEG>, <p>, </p> only, <image> a sentinel id, matrix cut to the tokenizer
        xsam = prompt_style == "xsam"
        new_tokens = add_special_tokens(tokenizer, XSAM_SPECIAL_TOKENS if xsam else SPECIAL_TOKENS)
        resize_token_embeddings(llm, tokenizer, new_tokens, exact=xsam)
        self.token_ids = SpecialTokenIds.from_tokenizer(tokenizer, IMAGE_TOKEN_INDEX if xsam else None)
        text_config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
        self.llm_dim = int(text_config.hidden_size)
        self._logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        # <image> is never a target nor an input row (image tokens replace it): only these three train.
        trainable_rows = [self.token_ids.p_start, self.token_ids.p_end, self.token_ids.seg]
        self.llm = setup_trainable(
            llm,
            freeze=freeze_llm,
            lora=lora,
            trainable_token_ids=trainable_rows,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.vision_encoder = vision_encoder
        self.vis_projector = None
        if vision_encoder is not None:
            self.vis_projector = MLPProjector(vision_encoder.out_dim, self.llm_dim, self.llm_dim)
        self.llm_projector = MLPProjector(self.llm_dim, int(proj_hidden_dim) or self.llm_dim, int(hidden_dim))
        self.sam_projector = None
        self.sam_downsample = float(sam_downsample)
        if sam_token_dim > 0:
            if vision_encoder is None:
                raise ValueError(
                    "MODEL.LLM.SAM_TOKENS needs the vanilla encoder (its tokens come first at <image>)"
                )
            in_dim = round(int(sam_token_dim) / self.sam_downsample**2)
            self.sam_projector = MLPProjector(in_dim, self.llm_dim, self.llm_dim)
        self.hidden_dim = int(hidden_dim)
        self.max_length = int(max_length)

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        llm_cfg, enc_cfg = cfg.MODEL.LLM, cfg.MODEL.VANILLA_ENCODER
        dtype = parse_dtype(llm_cfg.TORCH_DTYPE)
        tokenizer = load_tokenizer(llm_cfg.TOKENIZER_PATH or llm_cfg.PATH)
        llm = load_causal_lm(llm_cfg.PATH, llm_cfg.CONFIG, dtype)
        vision = None
        if enc_cfg.ENABLED:
            vision = VanillaEncoder(
                build_vision_tower(enc_cfg.PATH, enc_cfg.CONFIG, dtype),
                image_size=enc_cfg.IMAGE_SIZE,
                pixel_mean=enc_cfg.PIXEL_MEAN,
                pixel_std=enc_cfg.PIXEL_STD,
                freeze=enc_cfg.FREEZE,
                input_format=cfg.INPUT.FORMAT,
                feature_layer=enc_cfg.FEATURE_LAYER,
                gradient_checkpointing=enc_cfg.GRADIENT_CHECKPOINTING,
            )
        lora = LoraSettings(
            enabled=llm_cfg.LORA.ENABLED,
            rank=llm_cfg.LORA.RANK,
            alpha=llm_cfg.LORA.ALPHA,
            dropout=llm_cfg.LORA.DROPOUT,
            target_modules=list(llm_cfg.LORA.TARGET_MODULES),
        )
        return {
            "llm": llm,
            "tokenizer": tokenizer,
            "hidden_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "vision_encoder": vision,
            "proj_hidden_dim": llm_cfg.PROJ_HIDDEN_DIM,
            "max_length": llm_cfg.MAX_LENGTH,
            "freeze_llm": llm_cfg.FREEZE,
            "lora": lora,
            "gradient_checkpointing": llm_cfg.GRADIENT_CHECKPOINTING,
            "sam_token_dim": sam_vit_embed_dim(cfg) if llm_cfg.SAM_TOKENS.ENABLED else 0,
            "sam_downsample": llm_cfg.SAM_TOKENS.DOWNSAMPLE,
            "prompt_style": llm_cfg.PROMPT_STYLE,
            "chat_format": llm_cfg.get("CHAT_FORMAT", "chatml"),
        }

    # ------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.llm_projector[0].weight.device

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token → id."""
        t = self.token_ids
        return {P_START: t.p_start, P_END: t.p_end, SEG: t.seg, "<image>": t.image}

    def encode(self, batched_inputs: Sequence[dict[str, Any]]) -> list[EncodedPrompt]:
        """Tokenise each sample (text tokens only; image tokens are inserted in :meth:`forward`).

        A sample whose text cannot be used (empty, unbalanced ``<p>`` markers, longer than
        ``max_length``) raises :class:`~flowseg.utils.bad_samples.BadSampleError` naming it.
        """
        encoded = []
        for x in batched_inputs:
            try:
                encoded.append(
                    encode_sample(
                        self.tokenizer,
                        x,
                        self.token_ids,
                        with_image=self.vision_encoder is not None,
                        max_length=self.max_length,
                        style=self.prompt_style,
                        chat_format=self.chat_format,
                    )
                )
            except ValueError as e:
                raise BadSampleError(f"{describe_sample(x)}: {e}") from e
        return encoded

    def _decoder(self) -> nn.Module | None:
        return decoder_stack(self.llm)

    def pool_outputs(
        self,
        hidden: torch.Tensor,
        span_positions: list[list[tuple[int, int]]],
        seg_positions: list[int | None],
    ) -> dict:
        """C and S from the last hidden states [B,T,D] (eq. 11): see :func:`.conditions.pool_conditions`."""
        return pool_conditions(hidden, span_positions, seg_positions, self.llm_projector, self.hidden_dim)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token CE over positions whose target is an answer token (mean over those tokens).

        Logits are computed for those positions only (the output embedding applied to their hidden
        states), which is what the causal LM head does, minus ``[B, L, vocab]`` memory.
        """
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        if not bool(valid.any()):
            return hidden.sum() * 0.0
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][valid]).float()
        if self._logit_softcap:
            logits = torch.tanh(logits / self._logit_softcap) * self._logit_softcap
        return F.cross_entropy(logits, targets[valid])

    # ------------------------------------------------------------------------------ forward
    def image_embeddings(
        self,
        batched_inputs: Sequence[dict[str, Any]],
        image_tokens: torch.Tensor | None = None,
        sam_tokens: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The tokens that replace ``<image>``, one row per input ``[B, N_vis (+ N_sam), D_llm]``:
        ``φ_vis`` of the vanilla encoder's tokens, then (dual encoder) the SAM-token projector's;
        ``None`` without a vanilla encoder. The tower and the projectors run once per unique image
        (``image_index``, see :meth:`forward`) or once for a single ``[1, ...]`` image.
        ``image_tokens`` skips the vanilla encoder; ``sam_tokens``: the segmentation encoder's
        ``[U or 1, C, h, w]`` map, one per unique image, required when ``sam_projector`` exists."""
        if self.vision_encoder is None:
            return None
        if image_tokens is None:
            firsts = list(range(len(batched_inputs)))
            if image_index is not None:  # the first input of each unique image
                firsts = [image_index.tolist().index(u) for u in range(int(image_index.max()) + 1)]
            try:
                image_tokens = self.vision_encoder([batched_inputs[i]["image"] for i in firsts])
            except KeyError:
                raise ValueError("the vanilla encoder is enabled but a sample has no 'image'") from None
        tokens = self.vis_projector(image_tokens)
        if self.sam_projector is not None:
            if sam_tokens is None:
                raise ValueError(
                    "MODEL.LLM.SAM_TOKENS is enabled but no 'sam_tokens' were given: set "
                    "MODEL.SAM_VIT.RETURN_SAM_TOKENS so that the segmentation encoder returns them"
                )
            sam = self.sam_projector(pixel_unshuffle_tokens(sam_tokens, self.sam_downsample))
            if sam.shape[0] != tokens.shape[0]:  # one image shared by all inputs, on either side
                n = max(sam.shape[0], tokens.shape[0])
                sam, tokens = sam.expand(n, -1, -1), tokens.expand(n, -1, -1)
            tokens = torch.cat([tokens, sam.to(tokens.dtype)], dim=1)
        if image_index is not None and tokens.shape[0] > 1:
            return tokens.index_select(0, image_index)
        return tokens.expand(len(batched_inputs), -1, -1)

    def forward(
        self,
        batched_inputs: Sequence[dict[str, Any]],
        *,
        compute_loss: bool | None = None,
        return_hidden_states: bool = False,
        image_tokens: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        share_prefix: bool = False,
        sam_tokens: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """See the class docstring. ``compute_loss`` defaults to ``self.training``.

        ``image_tokens``: the vision encoder's output for these inputs (``[B, N, D_vis]``, one row
        per unique image with ``image_index``, or ``[1, N, D_vis]`` when all inputs show one
        image); the encoder is then not run. ``sam_tokens``: the segmentation encoder's map, one
        per unique image (see :meth:`image_embeddings`).
        ``image_index`` ([B] long): input b shows unique image ``image_index[b]`` (e.g. an image's
        expressions, :meth:`FlowSeg.preprocess_shared_images`): the encoder and ``φ_vis`` run once
        per unique image, on its first input.
        ``share_prefix`` (inference: no loss, no hidden states): run the LLM once over the prompt
        prefix all inputs share — chat prefix and image tokens when they show one image, ~95% of
        an expression's tokens at paper sizes — and then over each input's rest; outputs equal
        the full pass up to float reduction order. Without a common prefix reaching past the
        image tokens, the full pass runs.
        """
        compute_loss = self.training if compute_loss is None else compute_loss
        encoded = self.encode(batched_inputs)
        embed = self.llm.get_input_embeddings()
        lengths = [len(e.input_ids) for e in encoded]
        flat_ids = torch.tensor(
            [t for e in encoded for t in e.input_ids], dtype=torch.long, device=self.device
        )
        # a negative placeholder id (X-SAM's <image>) has no row: embed any row, it is replaced
        text_embeds = embed(flat_ids.clamp(min=0)).split(lengths)
        tokens = self.image_embeddings(batched_inputs, image_tokens, sam_tokens, image_index)
        if tokens is not None:
            tokens = tokens.to(text_embeds[0].dtype)
        seqs, seq_labels, span_positions, seg_positions = insert_image_tokens(
            encoded, text_embeds, tokens, self.device
        )

        if share_prefix and not compute_loss and not return_hidden_states and len(seqs) > 1:
            n_img = 0 if tokens is None else tokens.shape[1]
            prefix = shared_prefix_len(encoded, seqs, n_img)
            hidden = last_hidden_shared_prefix(self.llm, seqs, prefix, self.device) if prefix > 0 else None
            if hidden is not None:
                return self.pool_outputs(hidden, span_positions, seg_positions)

        inputs_embeds, attention_mask, labels = pad_right(seqs, seq_labels, self.device)
        hidden = last_hidden(self.llm, inputs_embeds, attention_mask)

        out: dict[str, Any] = self.pool_outputs(hidden, span_positions, seg_positions)
        if compute_loss:
            out["loss_llm"] = self.lm_loss(hidden, labels)
        if return_hidden_states:
            out["hidden_states"], out["labels"] = hidden, labels
            out["inputs_embeds"], out["attention_mask"] = inputs_embeds, attention_mask
        return out
