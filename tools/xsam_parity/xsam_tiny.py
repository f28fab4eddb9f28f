"""Tiny random configurations of X-SAM's components (built with X-SAM's own classes)."""

from __future__ import annotations

import json
from pathlib import Path

XSAM_COMMIT = "2e76946bcd690d40ac473a50753ac23e1a138330"
SEED = 1234
EXPRESSION = "the red box on the left"
# Tiny sizes. SAM keeps X-SAM's 24 blocks so that X-SAM's feature indices
# (hidden_states 12 / 18 / 24 for the connector, [-2] for the SAM-token projector) and its
# global-attention block indices (5, 11, 17, 23) are the real ones.
SAM_IMAGE = 64
SAM_PATCH = 16
SAM_HIDDEN = 8
SIGLIP_IMAGE = 32
SIGLIP_PATCH = 8
LLM_HIDDEN = 32
DEC_HIDDEN = 32  # X-SAM's pixel decoder uses GroupNorm(32, .)
NUM_QUERIES = 6
IMAGE_HW = (40, 56)  # a non-square image exercises SAM's resize + bottom/right padding


# --------------------------------------------------------------------------- tokenizers
CORPUS_WORDS = (
    "please identify and segment the in this image what is output corresponding segmentation "
    "mask can you generate could provide a for where picture masks highlight with respond it "
    "sure red box on left blue circle right green . , ? the a is"
)


def train_tiny_tokenizer(kind: str, out_dir: Path) -> Path:
    """Train a small byte-level BPE and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "qwen3":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        specials = ["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = CORPUS_WORDS.split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok.train_from_iterator(lines, trainer=trainer)

    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    if kind == "qwen3":
        # X-SAM prepends no BOS for Qwen2TokenizerFast (its get_bos_eos_token_ids).
        hf_tok = Qwen2TokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            unk_token=None,
        )
        hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    else:
        # Phi-3's real tokenizer is a SentencePiece Llama tokenizer; what X-SAM does with it
        # only depends on it not being a Qwen class: it prepends `bos_token_id` (<s>) itself.
        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="<|endoftext|>",
            unk_token="<unk>",
            pad_token="<|endoftext|>",
        )
        hf_tok.add_special_tokens(
            {"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]}
        )
    tok_dir = out_dir / f"tokenizer_{kind}"
    hf_tok.save_pretrained(str(tok_dir))
    return tok_dir


# --------------------------------------------------------------------------- models
def tiny_llm(kind: str, vocab_size: int):
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=LLM_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        attn_implementation="eager",
        torch_dtype=torch.float32,
    )
    if kind == "qwen3":
        # Qwen3-4B / 1.7B: GQA, explicit head_dim, q/k RMSNorm, tied embeddings.
        cfg = Qwen3Config(
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, rope_theta=1e6, **common
        )
    else:
        # Phi-3-mini: fused qkv_proj / gate_up_proj, untied lm_head.
        cfg = Phi3Config(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32)


def tiny_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=SIGLIP_IMAGE,
        patch_size=SIGLIP_PATCH,
        attn_implementation="eager",
    )
    return SiglipVisionModel(cfg)


def tiny_sam_config():
    from xsam.model.segmentors.sam.configuration_sam import SamConfig

    return SamConfig(
        vision_config=dict(
            hidden_size=SAM_HIDDEN,
            output_channels=8,
            num_hidden_layers=24,
            num_attention_heads=2,
            image_size=SAM_IMAGE,
            patch_size=SAM_PATCH,
            mlp_dim=16,
            window_size=2,
            global_attn_indexes=[5, 11, 17, 23],
            num_pos_feats=4,
        ),
        prompt_encoder_config=dict(
            hidden_size=8, image_size=SAM_IMAGE, patch_size=SAM_PATCH, mask_input_channels=4
        ),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_attention_heads=2, iou_head_hidden_dim=8),
        attn_implementation="eager",
    )


def tiny_segmentor(head_cls_type: str, num_labels: int | None = None):
    import torch
    from xsam.model.segmentors import XSegmentor
    from xsam.model.segmentors.mask2former import Mask2FormerConfig, Mask2FormerModel
    from xsam.model.segmentors.sam import SamModel

    m2f_kwargs = dict(
        use_backbone=False,
        image_size=SAM_IMAGE,
        # tiny analogue of X-SAM's [512, 1024, 2048] (connector outputs at 1/8, 1/16, 1/32)
        feature_channels=[SAM_HIDDEN // 2, SAM_HIDDEN, SAM_HIDDEN * 2],
        num_feature_levels=3,
        feature_size=DEC_HIDDEN,
        mask_feature_size=DEC_HIDDEN,
        hidden_dim=DEC_HIDDEN,
        encoder_feedforward_dim=32,
        encoder_layers=2,
        decoder_layers=4,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=NUM_QUERIES,
        attn_implementation="compiled",  # X-SAM's value; falls back to pytorch_v1 without the op
        use_text_cross_attn=False,
        use_zero_init=False,
        head_cls_type=head_cls_type,
        use_repeat_cond=False,
    )
    if num_labels is not None:
        m2f_kwargs["num_labels"] = num_labels
    # X-SAM's Mask2FormerConfig logs through `transformers.utils.logging.info`, which that
    # module does not define (AttributeError with use_backbone=False); a no-op log call lets
    # the config build unchanged.
    import transformers.utils.logging as hf_logging

    if not hasattr(hf_logging, "info"):
        hf_logging.info = lambda *args, **kwargs: None
    m2f_cfg = Mask2FormerConfig(**m2f_kwargs)
    # X-SAM builds SAM with from_pretrained(attn_implementation="eager"); _from_config is the
    # same construction without weights and also sets the sub-configs' attention choice.
    sam = SamModel._from_config(tiny_sam_config(), attn_implementation="eager", torch_dtype=torch.float32)
    decoder = Mask2FormerModel._from_config(m2f_cfg, torch_dtype=torch.float32)
    return XSegmentor(
        encoder=sam, decoder=decoder, torch_dtype=torch.float32, use_memory=False, init_decoder=True
    )


def sam_processor():
    from xsam.dataset.processors import SamImageProcessor

    side = {"longest_edge": SAM_IMAGE}
    square = {"height": SAM_IMAGE, "width": SAM_IMAGE}
    # SAM's preprocessor_config: ImageNet mean/std, longest side resize, pad bottom/right.
    return SamImageProcessor(
        size=side,
        mask_size=side,
        pad_size=square,
        mask_pad_size=square,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        ignore_index=0,
    )


def siglip_processor():
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": SIGLIP_IMAGE, "width": SIGLIP_IMAGE})


def model_configs(model) -> dict:
    out = {}
    for name in (
        "llm",
        "vision_encoder",
        "visual_projector",
        "llm_projector",
        "seg_projector",
        "seg_connector",
    ):
        module = getattr(model, name, None) if name in model._modules else None
        if module is not None:
            out[name] = module.config.to_dict()
    seg = model.segmentor
    out["sam_vision"] = seg.enc_config.to_dict()
    out["mask2former"] = seg.dec_config.to_dict()
    deform = [m for m in seg.pixel_decoder.modules() if hasattr(m, "attn_implementation")]
    out["msdeformattn_effective_implementation"] = deform[0].attn_implementation if deform else None
    out["sam_processor"] = sam_processor().to_dict()
    if "vision_encoder" in model._modules and model.vision_encoder is not None:
        out["siglip_processor"] = siglip_processor().to_dict()
    out["xsam_model_args"] = {
        "visual_select_layer": model.visual_select_layer,
        "visual_select_indx": model.visual_select_indx,
        "extra_select_layers": list(model.extra_select_layers),
        "cond_type": getattr(model, "cond_type", None),
        "ptoken_shift": getattr(model, "ptoken_shift", None),
        "use_dual_encoder": model.use_dual_encoder,
    }
    return json.loads(json.dumps(out, default=str))


def round_weights_to_half(model) -> None:
    """Round every floating tensor of X-SAM's state dict to a float16-representable value, so
    that the float16 copy the fixture stores holds exactly the weights X-SAM computed with
    (the forward itself stays float32). Halves the fixture's size."""
    import torch

    with torch.no_grad():
        for tensor in model.full_state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.data.copy_(tensor.data.half().float())


def half_state_dict(model) -> dict:
    """X-SAM's own ``state_dict()`` (what its pytorch_model.bin files hold) in float16; tied
    tensors (Qwen3's embedding / lm_head) keep sharing one storage."""
    shared: dict = {}
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            ptr = value.data_ptr()
            if ptr not in shared:
                shared[ptr] = value.half()
            value = shared[ptr]
        out[key] = value
    return out


def train_briefly(model, items: list, steps: int, lr: float) -> list[float]:
    """A few AdamW steps with X-SAM's own training loss (``mode="loss"``) on the fixture's
    samples. A freshly initialised Mask2Former predicts mask logits within ±0.01 of zero, and
    its masked attention thresholds sigmoid(mask logit) at 0.5, so float rounding flips the
    attention masks and no parity check could hold; after these steps the logits are decisive."""
    import torch
    from xsam.dataset.collate_fns import xsam_collate_fn

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        item = items[step % len(items)]() if callable(items[step % len(items)]) else items[step % len(items)]
        batch = model.data_preprocessor(xsam_collate_fn([item]), True)
        loss = model(**batch, mode="loss")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def perturb_weights(model, relative: float, seed: int) -> None:
    """Multiply every floating state-dict tensor by (1 + relative * N(0, 1)) noise: a probe of
    how much float rounding of the weights moves X-SAM's outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.full_state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.data.mul_(1 + relative * noise)
