"""Table 9 to the parameter: ``tools/benchmark.py --count-only`` builds the paper configuration
(``configs/flowseg_refcoco.yaml``: SAM-ViT-L with X-SAM's connector, Qwen3-4B, SigLIP2-so400m-
patch14-384, 200 queries, 9 layers) on the meta device, without and with BSF + BAR.

The expected numbers are X-SAM's modules at these sizes, which give the paper's baseline exactly
(segmentor 328.9M, total 4816.7M) and, with BSF's 5,928,192, FlowSeg's (334.8M, 4822.6M). Each
component is computed by hand below from its layer shapes."""

import pytest
from repo_scripts import load_script

D_SAM, D_LLM, D_VIS, HIDDEN = 1024, 2560, 1152, 256


def _conv(c_in: int, c_out: int, k: int = 1, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def _linear(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


# X-SAM's conv connector: per level Conv1x1(C, 512) + LN, Conv3x3(512, 512) + LN, Conv1x1(512, C*s)
# + LN, no biases; s = 2, 1, 0.5.
CONNECTOR = sum(
    _conv(D_SAM, 512, 1, False) + 2 * 512 + _conv(512, 512, 3, False) + 2 * 512
    + _conv(512, int(D_SAM * s), 1, False) + 2 * int(D_SAM * s)
    for s in (2, 1, 0.5)
)  # fmt: skip
# SAM's neck: Conv1x1(1024, 256) + LN2d, Conv3x3(256, 256) + LN2d, no biases.
SAM_NECK = _conv(D_SAM, 256, 1, False) + 2 * 256 + _conv(256, 256, 3, False) + 2 * 256
# Mask2Former's pixel decoder on 2048/1024/512-channel inputs: input projections (+ GroupNorm),
# 6 deformable encoder layers (8 heads, 3 levels, 4 points, FFN 1024), level embedding, one FPN
# level (lateral from 512 channels, 3x3 output conv, both GroupNorm, no bias), mask projection.
_DEFORM = _linear(HIDDEN, 8 * 3 * 4 * 2) + _linear(HIDDEN, 8 * 3 * 4) + 2 * _linear(HIDDEN, HIDDEN)
_ENC_LAYER = _DEFORM + 2 * HIDDEN + _linear(HIDDEN, 1024) + _linear(1024, HIDDEN) + 2 * HIDDEN
PIXEL_DECODER = (
    sum(_conv(c, HIDDEN) + 2 * HIDDEN for c in (2048, 1024, 512))
    + 6 * _ENC_LAYER
    + 3 * HIDDEN
    + _conv(512, HIDDEN, 1, False) + 2 * HIDDEN
    + _conv(HIDDEN, HIDDEN, 3, False) + 2 * HIDDEN
    + _conv(HIDDEN, HIDDEN)
)  # fmt: skip
# Mask2Former's decoder: query features + positions (200), level embedding, 9 layers of
# self-attention, masked cross-attention (each + LayerNorm) and FFN 2048 (+ LayerNorm), the final
# LayerNorm and the 3-layer mask MLP; no class head (classes are conditions).
_ATTN = 4 * _linear(HIDDEN, HIDDEN) + 2 * HIDDEN
_DEC_LAYER = 2 * _ATTN + _linear(HIDDEN, 2048) + _linear(2048, HIDDEN) + 2 * HIDDEN
DECODER = 2 * 200 * HIDDEN + 3 * HIDDEN + 9 * _DEC_LAYER + 2 * HIDDEN + 3 * _linear(HIDDEN, HIDDEN)

TABLE9 = {
    "sam_trunk": 307_425_280,
    "sam_neck": 852_992,
    "pixel_decoder": 6_101_440,
    "decoder": 14_509_824,
    "logit_scale": 1,
    "feature_path": 10_499_072,  # X-SAM's connector
    "background_embed": 256,
    "llm": 4_021_792_256,  # Qwen3-4B, tied embeddings resized to 151,672 rows
    "vision_tower": 428_225_600,  # SigLIP2-so400m-patch14-384 with its pooling head
    "vis_projector": 9_507_840,  # phi_vis: Linear(1152, D) - GELU - Linear(D, D)
    "llm_projector": 721_408,  # phi_llm: Linear(D, 256) - GELU - Linear(256, 256)
    "sam_token_projector": 17_044_480,  # Linear(4 * 1024, D) - GELU - Linear(D, D)
}
BSF = 5_928_192
SEGMENTOR = (328_889_537, 334_817_729)
TOTAL = (4_816_680_449, 4_822_608_641)


@pytest.fixture(scope="module")
def counts():
    bench = load_script("tools/benchmark.py")
    result = bench.main(["--count-only"])  # both variants, on the meta device
    return result["baseline"]["params"], result["flowseg"]["params"], result["deltas"]


def test_hand_computed_components_are_table_9s():
    assert (CONNECTOR, SAM_NECK, PIXEL_DECODER, DECODER) == (
        TABLE9["feature_path"],
        TABLE9["sam_neck"],
        TABLE9["pixel_decoder"],
        TABLE9["decoder"],
    )
    assert _linear(D_LLM, HIDDEN) + _linear(HIDDEN, HIDDEN) == TABLE9["llm_projector"]
    assert _linear(D_VIS, D_LLM) + _linear(D_LLM, D_LLM) == TABLE9["vis_projector"]
    assert _linear(4 * D_SAM, D_LLM) + _linear(D_LLM, D_LLM) == TABLE9["sam_token_projector"]
    segmentor = sum(TABLE9[k] for k in ("sam_trunk", "sam_neck", "pixel_decoder", "decoder", "logit_scale"))
    assert (segmentor, segmentor + BSF) == SEGMENTOR
    assert (sum(TABLE9.values()), sum(TABLE9.values()) + BSF) == TOTAL


@pytest.mark.parametrize(
    "name",
    ["sam_trunk", "sam_neck", "pixel_decoder", "decoder", "logit_scale", "feature_path", "background_embed"],
)
def test_segmentor_side_components(counts, name):
    base, flow, _ = counts
    assert base[name] == flow[name] == TABLE9[name]


def test_segmentor_baseline_and_with_bsf(counts):
    base, flow, deltas = counts
    assert (base["bsf"], flow["bsf"], deltas["bsf_params"]) == (0, BSF, BSF)
    assert (base["segmentor"], flow["segmentor"]) == SEGMENTOR
    # BAR is reported on its own, outside the segmentor and the total
    assert base["bar"] == 0 < flow["bar"] and deltas["segmentor_params"] == deltas["total_params"] == BSF


@pytest.mark.parametrize(
    "name", ["llm", "vision_tower", "vis_projector", "llm_projector", "sam_token_projector"]
)
def test_language_side_components(counts, name):
    base, flow, _ = counts
    assert base[name] == flow[name] == TABLE9[name]


def test_total_baseline_and_with_bsf(counts):
    base, flow, _ = counts
    assert base["condition_head_other"] == 0
    assert (base["total"], flow["total"]) == TOTAL
    # no LoRA in the count: the model may have adapters, the total leaves them out
    assert flow["all"] == flow["total"] + flow["lora"] + flow["bar"]


def test_padded_tokenizer_has_qwen3s_length_and_tokenises_as_before():
    bench = load_script("tools/benchmark.py")
    from flowseg.utils.tiny_models import CHATML_TEMPLATE, make_tokenizer

    tok = make_tokenizer(CHATML_TEMPLATE)
    padded = bench.pad_vocabulary(tok, bench.QWEN3_TOKENIZER_LEN)
    assert len(padded) == bench.QWEN3_TOKENIZER_LEN == 151_669
    text = "Please segment <p>the man in the red shirt</p> in this image."
    assert padded(text)["input_ids"] == tok(text)["input_ids"]
    assert padded.chat_template == tok.chat_template and padded.eos_token == tok.eos_token
