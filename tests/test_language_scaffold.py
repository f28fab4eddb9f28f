"""X-SAM's language scaffold: projector shapes at the paper's sizes, the dual encoder's SAM tokens
(pixel-unshuffle order, the second-to-last SAM block, their place at <image>), X-SAM's prompts
and vocabulary, and a tiny model that trains and evaluates with all of it."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.structures import BitMasks, Instances
from flowseg import add_flowseg_config
from flowseg.engine.shared_features import SharedImageFeatureInference
from flowseg.modeling.backbone.sam_vit import build_sam_vit
from flowseg.modeling.language import condition_head as head_module
from flowseg.modeling.language.projector import pixel_unshuffle_tokens
from flowseg.modeling.language.prompts import encode_sample
from flowseg.modeling.language.templates import (
    REASONING_LONG_QUESTIONS,
    REASONING_SHORT_QUESTIONS,
    REFERRING_QUESTIONS,
    SEG_ANSWERS,
)
from flowseg.modeling.language.tokens import (
    IMAGE_TOKEN_INDEX,
    XSAM_SPECIAL_TOKENS,
    SpecialTokenIds,
    add_special_tokens,
)
from flowseg.utils.tiny_models import make_tiny_llm_dir, make_tokenizer, tiny_llm_cfg_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "Base-FlowSeg-Referring.yaml")
TINY = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ paper sizes
def _qwen3_4b_tokenizer():
    # Qwen3's 151,669 tokens (ids 0..151668); only the vocabulary size matters here
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(151669)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def test_paper_projectors_and_vocabulary_on_the_meta_device(monkeypatch):
    """Base-FlowSeg-Referring (X-SAM's scaffold) at Qwen3-4B / SigLIP2-so400m / SAM-ViT-L sizes:
    phi_llm 721,408, phi_vis 9,507,840, SAM-token projector 17,044,480 parameters; <SEG>, <p>,
    </p> get ids 151,669..151,671 and the tied embeddings 151,672 rows (4,021,792,256 LLM
    parameters, full fine-tuning: no LoRA or peft rows)."""
    from transformers import AutoModelForCausalLM, Qwen3Config, SiglipVisionConfig, SiglipVisionModel

    qwen3_4b = Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    so400m = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
    )
    monkeypatch.setattr(head_module, "load_tokenizer", lambda path: _qwen3_4b_tokenizer())
    monkeypatch.setattr(
        head_module, "load_causal_lm", lambda p, c, d: AutoModelForCausalLM.from_config(qwen3_4b)
    )
    monkeypatch.setattr(head_module, "build_vision_tower", lambda p, c, d: SiglipVisionModel(so400m))
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(PAPER)
    cfg.merge_from_list(["MODEL.LLM.LORA.ENABLED", False, "MODEL.LLM.FREEZE", False])
    with torch.device("meta"):
        head = head_module.LLMConditionHead(cfg)

    assert _numel(head.llm_projector) == 721_408
    assert [tuple(p.shape) for p in head.llm_projector.parameters()] == [
        (256, 2560),
        (256,),
        (256, 256),
        (256,),
    ]
    assert _numel(head.vis_projector) == 9_507_840
    assert head.vis_projector[0].weight.shape == (2560, 1152)
    assert _numel(head.sam_projector) == 17_044_480
    assert head.sam_projector[0].weight.shape == (2560, 4096)  # 1024 SAM channels x 2 x 2
    assert head.vision_encoder.num_tokens == 729 and head.vision_encoder.feature_layer == -2
    assert _numel(head.vision_encoder.tower) == 428_225_600  # with SigLIP's (unused) pooling head

    ids = head.token_ids
    assert (ids.seg, ids.p_start, ids.p_end, ids.image) == (151669, 151670, 151671, IMAGE_TOKEN_INDEX)
    assert len(head.tokenizer) == 151672 and "<image>" not in head.tokenizer.get_vocab()
    assert head.llm.get_input_embeddings().weight.shape == (151672, 2560)
    assert head.llm.get_output_embeddings().weight is head.llm.get_input_embeddings().weight
    assert _numel(head.llm) == 4_021_792_256
    assert head.prompt_style == "xsam"


# ------------------------------------------------------------------------------ SAM tokens
def test_pixel_unshuffle_order_matches_a_hand_computation():
    """out[b, i*(W/2)+j, (dy*2+dx)*C + c] = x[b, c, 2i+dy, 2j+dx] (X-SAM's channel order)."""
    b, c, h, w = 2, 3, 4, 6
    x = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    out = pixel_unshuffle_tokens(x, 0.5)
    assert out.shape == (b, (h // 2) * (w // 2), 4 * c)
    for bb in range(b):
        for i in range(h // 2):
            for j in range(w // 2):
                want = [
                    x[bb, cc, 2 * i + dy, 2 * j + dx] for dy in (0, 1) for dx in (0, 1) for cc in range(c)
                ]
                assert out[bb, i * (w // 2) + j].tolist() == torch.stack(want).tolist()
    # first token of the first image, written out: pixels (0,0), (0,1), (1,0), (1,1), each 3 channels
    assert out[0, 0].tolist() == [0, 24, 48, 1, 25, 49, 6, 30, 54, 7, 31, 55]
    with pytest.raises(ValueError, match="not divisible"):
        pixel_unshuffle_tokens(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="DOWNSAMPLE"):
        pixel_unshuffle_tokens(x, 0.3)


def test_sam_tokens_are_the_second_to_last_block_output():
    torch.manual_seed(0)
    backbone = build_sam_vit("tiny", img_size=64, out_channels=32).eval()
    backbone.return_sam_tokens = True
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
        net = backbone.net
        h = net.patch_embed(x)
        h = h + get_abs_pos(net.pos_embed, net.pretrain_use_cls_token, (h.shape[1], h.shape[2]))
        for blk in net.blocks[:-1]:
            h = blk(h)
        last = net.blocks[-1](h)
    assert out["sam_tokens"].shape == (2, 64, 4, 6)
    torch.testing.assert_close(out["sam_tokens"], h.permute(0, 3, 1, 2))
    torch.testing.assert_close(net(x)["last_feat"], last.permute(0, 3, 1, 2))  # one block before the last
    backbone.return_sam_tokens = False
    assert "sam_tokens" not in backbone(x)


# ------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def xsam_tokenizer():
    tok = make_tokenizer()
    base = len(tok)
    add_special_tokens(tok, XSAM_SPECIAL_TOKENS)
    return tok, base, SpecialTokenIds.from_tokenizer(tok, IMAGE_TOKEN_INDEX)


def _pick(options, key):
    return options[zlib.crc32(key.encode()) % len(options)]


def test_xsam_prompt_is_chatml_without_system_message(xsam_tokenizer):
    tok, base, ids = xsam_tokenizer
    assert (ids.seg, ids.p_start, ids.p_end) == (base, base + 1, base + 2)  # after the base vocabulary
    sample = {"task": "referring", "expression": "The Red Car"}
    enc = encode_sample(tok, sample, ids, style="xsam")
    question = _pick(REFERRING_QUESTIONS, "the red car").replace("{phrase}", "<p>the red car</p>")
    answer = _pick(SEG_ANSWERS, "answer|the red car")
    assert enc.text == (
        f"<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
    )
    # <image> is the sentinel id, not a token; the span covers <p> .. </p>; the answer is supervised
    prefix = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and enc.image_position == len(prefix)
    assert enc.input_ids[: len(prefix)] == prefix
    ((s, e),) = enc.spans
    assert enc.input_ids[s] == ids.p_start and enc.input_ids[e] == ids.p_end
    assert tok.decode(enc.input_ids[s + 1 : e]) == "the red car"
    n_answer = len(tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    assert enc.labels[-n_answer:] == enc.input_ids[-n_answer:]
    assert set(enc.labels[:-n_answer]) == {-100}
    assert enc.input_ids[enc.seg_position] == ids.seg


def test_xsam_template_choice_is_deterministic_and_covers_the_templates(xsam_tokenizer):
    tok, _, ids = xsam_tokenizer
    sample = {"task": "referring", "expression": "a dog"}
    first = encode_sample(tok, sample, ids, style="xsam").text
    assert encode_sample(tok, dict(sample), ids, style="xsam").text == first
    # the same in a fresh interpreter with another hash seed (no salted hash() involved)
    code = (
        "from flowseg.modeling.language.templates import xsam_turns;"
        "print(repr(xsam_turns({'task': 'referring', 'expression': 'a dog'})))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    from flowseg.modeling.language.templates import xsam_turns

    assert other.stdout.strip() == repr(xsam_turns(sample))
    # training samples carry a prompt seed: all ten questions and five answers get used
    turns = [xsam_turns({**sample, "prompt_seed": s})[0] for s in range(300)]
    questions = {q.replace("<p>a dog</p>", "{phrase}") for q, _ in turns}
    assert questions == set(REFERRING_QUESTIONS) and {a for _, a in turns} == set(SEG_ANSWERS)


def test_xsam_reasoning_and_packed_samples(xsam_tokenizer):
    tok, _, ids = xsam_tokenizer
    long = xsam_turns_of({"task": "reasoning", "expression": "What holds Water?", "is_sentence": True})
    short = xsam_turns_of({"task": "reasoning", "expression": "the cup", "is_sentence": False})
    assert long[0][0] in {t.replace("{phrase}", "<p>What holds Water?</p>") for t in REASONING_LONG_QUESTIONS}
    assert short[0][0] in {t.replace("{phrase}", "<p>the cup</p>") for t in REASONING_SHORT_QUESTIONS}
    # packed: one turn per expression, <image> in the first, S = the last turn's <SEG>
    packed = {"task": "referring", "expressions": ["the man", "a dog", "the red car"], "prompt_seed": 7}
    enc = encode_sample(tok, packed, ids, style="xsam")
    assert enc.text.count("<|im_start|>user\n") == 3 and enc.text.count("<image>") == 1
    assert enc.text.startswith("<|im_start|>user\n<image>")
    assert "<|im_end|>\n<|im_start|>user\n" in enc.text  # turns separated by a newline
    assert [tok.decode(enc.input_ids[s + 1 : e]) for s, e in enc.spans] == packed["expressions"]
    segs = [i for i, t in enumerate(enc.input_ids) if t == ids.seg]
    assert len(segs) == 3 and enc.seg_position == segs[-1] and segs[0] > enc.spans[0][1]
    # a complete instruction with its own spans is kept; unknown styles are refused
    own = encode_sample(tok, {"task": "referring", "expression": "<p>x</p> and <p>y</p>"}, ids, style="xsam")
    assert "<image><p>x</p> and <p>y</p><|im_end|>" in own.text and len(own.spans) == 2
    with pytest.raises(ValueError, match="PROMPT_STYLE"):
        encode_sample(tok, packed, ids, style="llava")


def xsam_turns_of(sample):
    from flowseg.modeling.language.templates import xsam_turns

    return xsam_turns(sample)


# ------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


def _xsam_cfg(llm, *opts):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(TINY)
    cfg.merge_from_list(
        [
            *tiny_llm_cfg_overrides(llm, lora=False),
            "MODEL.LLM.PROMPT_STYLE",
            "xsam",
            "MODEL.LLM.PROJ_HIDDEN_DIM",
            16,
            "MODEL.LLM.SAM_TOKENS.ENABLED",
            True,
            "MODEL.SAM_VIT.RETURN_SAM_TOKENS",
            True,
            "MODEL.VANILLA_ENCODER.FEATURE_LAYER",
            -2,
            *opts,
        ]
    )
    return cfg


def _batch(n=2, size=128):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, size, size - 32), dtype=torch.uint8, generator=g)
    out = []
    for k, e in enumerate(("the small red circle", "the leftmost star")[:n]):
        masks = torch.zeros(1, size, size - 32, dtype=torch.bool)
        masks[0, 10 + 20 * k : 50 + 20 * k, 20:60] = True
        inst = Instances((size, size - 32))
        inst.gt_masks, inst.gt_classes = BitMasks(masks), torch.zeros(1, dtype=torch.long)
        out.append({"image": image, "instances": inst, "expression": e, "task": "referring", "image_id": 1})
    return out


def test_sam_tokens_follow_the_siglip_tokens_at_image(llm):
    torch.manual_seed(0)
    model = build_model(_xsam_cfg(llm)).eval()
    head = model.condition_head
    batch = _batch()
    sam = torch.randn(2, 64, 8, 6)
    with torch.no_grad():
        out = head(batch, return_hidden_states=True, sam_tokens=sam)
        vis = head.vis_projector(head.vision_encoder([x["image"] for x in batch]))
        sam_tok = head.sam_projector(pixel_unshuffle_tokens(sam))
        enc = head.encode(batch)
    q, n_vis = enc[0].image_position, head.vision_encoder.num_tokens
    assert sam_tok.shape[1] == 12  # 8 x 6 grid -> 4 x 3
    embeds = out["inputs_embeds"]
    torch.testing.assert_close(embeds[:, q : q + n_vis], vis)
    torch.testing.assert_close(embeds[:, q + n_vis : q + n_vis + 12], sam_tok)
    after = head.llm.get_input_embeddings()(torch.tensor(enc[0].input_ids[q + 1 : q + 4]))
    torch.testing.assert_close(embeds[0, q + n_vis + 12 : q + n_vis + 15], after)
    with pytest.raises(ValueError, match="RETURN_SAM_TOKENS"):
        head(batch)
    with pytest.raises(ValueError, match="RETURN_SAM_TOKENS"):
        build_model(_xsam_cfg(llm, "MODEL.SAM_VIT.RETURN_SAM_TOKENS", False))


@pytest.mark.parametrize("lora", [False, True])
def test_xsam_scaffold_trains_with_full_finetuning_or_lora(llm, lora):
    opts = ["MODEL.LLM.LORA.ENABLED", lora, "MODEL.LLM.FREEZE", lora]
    torch.manual_seed(0)
    model = build_model(_xsam_cfg(llm, *opts)).train()
    losses = model(_batch())
    total = sum(losses.values())
    assert torch.isfinite(total) and "loss_llm" in losses
    total.backward()
    for name in ("sam_projector", "vis_projector", "llm_projector"):
        grads = [p.grad for p in getattr(model.condition_head, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    base = [p for n, p in model.condition_head.llm.named_parameters() if "lora_" in n]
    assert bool(base) == lora  # LoRA adapters exist only with LoRA
    # conversation batches (stage 2) also get the SAM tokens
    conv = {
        "image": _batch(1)[0]["image"],
        "task": "conversation",
        "expression": "what is it?",
        "answer": "a star",
    }
    assert torch.isfinite(model([conv])["loss_llm"])


def test_shared_image_features_equal_the_plain_forward_with_sam_tokens(llm):
    torch.manual_seed(0)
    model = build_model(_xsam_cfg(llm)).eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch()]
    with torch.no_grad():
        ref = [model([x])[0] for x in batch]
        got = SharedImageFeatureInference(model)(batch)
    for a, b in zip(ref, got):
        assert a["ref_seg"]["query"] == b["ref_seg"]["query"]
        assert abs(a["ref_seg"]["score"] - b["ref_seg"]["score"]) < 1e-5
        assert (a["ref_seg"]["mask"] != b["ref_seg"]["mask"]).float().mean() < 1e-3


def test_vanilla_encoder_feature_layer():
    """FEATURE_LAYER -2: the tower's penultimate layer output, without the final LayerNorm;
    0: last_hidden_state (with it)."""
    from flowseg.modeling.language.vanilla_encoder import VanillaEncoder
    from flowseg.utils.tiny_models import tiny_siglip_vision_config
    from transformers import SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(tiny_siglip_vision_config()).eval()
    size = tower.config.image_size
    image = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    penultimate = VanillaEncoder(tower, image_size=size, feature_layer=-2)
    last = VanillaEncoder(tower, image_size=size)
    with torch.no_grad():
        ref = tower(pixel_values=penultimate.preprocess([image]), output_hidden_states=True)
        got, got_last = penultimate([image]), last([image])
    torch.testing.assert_close(got, ref.hidden_states[-2])
    torch.testing.assert_close(got_last, ref.last_hidden_state)
    assert not torch.allclose(got, got_last)
    with pytest.raises(ValueError, match="FEATURE_LAYER"):
        VanillaEncoder(tower, image_size=size, feature_layer=1)
