"""BSFTransformerDecoder as Mask2Former's decoder (SR/CR off): HF parity, checkpoints, config, heads."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from flowseg.checkpoint.mask2former_decoder import (
    D2_PREDICTOR_PREFIX,
    convert_d2_mask2former_checkpoint,
    convert_hf_mask2former_transformer_decoder,
)
from flowseg.config import add_flowseg_config
from flowseg.modeling.registry import TRANSFORMER_DECODER_REGISTRY
from flowseg.modeling.transformer_decoder import (
    PADDED_CONDITION_LOGIT,
    BSFTransformerDecoder,
    build_transformer_decoder,
)
from hf_tiny import bsf_decoder, decoder_inputs, tiny_hf_mask2former

HIDDEN, HEADS, QUERIES, CLASSES = 32, 4, 7, 5


def _decoder(in_channels: int = HIDDEN, layers: int = 4, **kw) -> BSFTransformerDecoder:
    return bsf_decoder(
        hidden=HIDDEN,
        heads=HEADS,
        queries=QUERIES,
        classes=CLASSES,
        layers=layers,
        feedforward=64,
        in_channels=in_channels,
        **kw,
    )


def _inputs(b: int = 2, c: int = HIDDEN, seed: int = 0):
    return decoder_inputs(b, c, HIDDEN, seed)


def _original_predictor_keys(num_layers: int, input_proj: bool) -> set:
    """Key names of Mask2Former's ``MultiScaleMaskedTransformerDecoder`` (written out independently)."""
    keys = {"query_feat.weight", "query_embed.weight", "level_embed.weight", "decoder_norm.weight"}
    keys |= {"decoder_norm.bias", "class_embed.weight", "class_embed.bias"}
    keys |= {f"mask_embed.layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")}
    if input_proj:
        keys |= {f"input_proj.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    for n in range(num_layers):
        for name, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            keys |= {f"{name}.{n}.{attn}.{p}" for p in ("in_proj_weight", "in_proj_bias")}
            keys |= {f"{name}.{n}.{attn}.out_proj.{p}" for p in ("weight", "bias")}
            keys |= {f"{name}.{n}.norm.{p}" for p in ("weight", "bias")}
        keys |= {
            f"transformer_ffn_layers.{n}.{m}.{p}"
            for m in ("linear1", "linear2", "norm")
            for p in ("weight", "bias")
        }
    return keys


# ---------------------------------------------------------------------------- HF parity
@pytest.fixture(scope="module", params=[False, True], ids=["post_norm", "pre_norm"])
def hf_run(request):
    pytest.importorskip("transformers")
    # HF counts decoder layers like Mask2Former's yamls: decoder_layers=5 -> 4 layers.
    model = tiny_hf_mask2former(
        hidden=HIDDEN,
        heads=HEADS,
        queries=QUERIES,
        classes=CLASSES,
        decoder_layers=5,
        encoder_layers=1,
        pre_norm=request.param,
    )
    with torch.no_grad():
        # Shift one mask-feature channel so that some queries' masks are empty at some level:
        # exercises the "all-masked row -> attend everywhere" rule as well as partial masks.
        model.model.pixel_level_module.decoder.mask_projection.bias[0] -= 0.5
        out = model(torch.randn(2, 3, 64, 64), output_hidden_states=True, output_auxiliary_logits=True)
    return model, out


def test_hf_parity_final_and_every_aux_layer(hf_run):
    hf_model, hf_out = hf_run
    assert len(hf_model.model.transformer_module.decoder.layers) == 4
    multi_scale = list(hf_out.pixel_decoder_hidden_states)  # what HF's transformer module receives
    mask_features = hf_out.pixel_decoder_last_hidden_state
    assert [tuple(t.shape[-2:]) for t in multi_scale] == [(2, 2), (4, 4), (8, 8)]  # 1/32, 1/16, 1/8

    ours = _decoder(layers=4, pre_norm=hf_model.config.pre_norm)
    state = convert_hf_mask2former_transformer_decoder(hf_model.state_dict())
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        out = ours(multi_scale, mask_features)

    assert out["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
    assert out["pred_masks"].shape == (2, QUERIES, 16, 16)
    torch.testing.assert_close(out["pred_logits"], hf_out.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_masks"], hf_out.masks_queries_logits, atol=1e-4, rtol=0)
    # L+1 predictions; both sides return the first L as auxiliary ones (incl. the pre-layer one).
    assert len(out["aux_outputs"]) == len(hf_out.auxiliary_logits) == 4
    for ours_aux, hf_aux in zip(out["aux_outputs"], hf_out.auxiliary_logits):
        torch.testing.assert_close(ours_aux["pred_logits"], hf_aux["class_queries_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours_aux["pred_masks"], hf_aux["masks_queries_logits"], atol=1e-4, rtol=0)
    with torch.no_grad():
        hf_query_embeds = hf_model.model.transformer_module.decoder.layernorm(
            hf_out.transformer_decoder_last_hidden_state
        )
    torch.testing.assert_close(out["query_embeds"], hf_query_embeds, atol=1e-4, rtol=0)

    # The comparison covers real masked attention: partial masks and fully-masked rows occur.
    sizes = [t.shape[-2:] for t in multi_scale]
    frac, empty_rows = [], 0
    for level, aux in enumerate(out["aux_outputs"]):
        m = F.interpolate(aux["pred_masks"], size=sizes[level % 3], mode="bilinear", align_corners=False)
        m = m.sigmoid().flatten(2) < 0.5
        frac.append(m.float().mean().item())
        empty_rows += int(m.all(-1).sum())
    assert any(0.05 < f < 0.95 for f in frac), frac
    assert empty_rows > 0


def test_hf_converter_key_variants(hf_run):
    hf_model, _ = hf_run
    full = convert_hf_mask2former_transformer_decoder(hf_model.state_dict())
    # Mask2FormerModel (no "model." prefix, no class head) and the bare transformer module.
    from_model = convert_hf_mask2former_transformer_decoder(hf_model.model.state_dict())
    bare = convert_hf_mask2former_transformer_decoder(hf_model.model.transformer_module.state_dict())
    assert set(full) - set(from_model) == {"class_embed.weight", "class_embed.bias"}
    assert set(from_model) == set(bare)
    assert set(full) == _original_predictor_keys(4, input_proj=False)
    hf_self_attn = hf_model.model.transformer_module.decoder.layers[1].self_attn
    qkv = [getattr(hf_self_attn, f"{p}_proj").weight for p in "qkv"]
    assert torch.equal(full["transformer_self_attention_layers.1.self_attn.in_proj_weight"], torch.cat(qkv))
    prefixed = convert_hf_mask2former_transformer_decoder(hf_model.state_dict(), prefix=D2_PREDICTOR_PREFIX)
    assert set(prefixed) == {D2_PREDICTOR_PREFIX + k for k in full}
    with pytest.raises(KeyError, match="unexpected key"):
        convert_hf_mask2former_transformer_decoder(
            {"transformer_module.decoder.bogus.weight": torch.zeros(1)}
        )


# ---------------------------------------------------------------------------- original checkpoints
def test_names_match_original_mask2former_layout():
    assert set(_decoder(layers=3).state_dict()) == _original_predictor_keys(3, input_proj=False)
    assert set(_decoder(in_channels=48, layers=2).state_dict()) == _original_predictor_keys(
        2, input_proj=True
    )


def test_convert_d2_checkpoint_loads_without_missing_or_unexpected_keys():
    ours = _decoder(in_channels=48, layers=3)
    original = {}
    for k, v in ours.state_dict().items():
        k = k.replace("query_feat.", "static_query.")  # pre-v2 name
        original[D2_PREDICTOR_PREFIX + k] = v.numpy().copy() + 1.0  # model-zoo .pkl: numpy arrays
    original["sem_seg_head.pixel_decoder.mask_features.weight"] = np.zeros((HIDDEN, HIDDEN, 1, 1), np.float32)
    original["backbone.res2.0.conv1.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    original["criterion.empty_weight"] = np.ones(CLASSES + 1, np.float32)

    converted = convert_d2_mask2former_checkpoint({"model": original}, num_classes=CLASSES)
    assert not any(k.startswith(("backbone.", "criterion.")) for k in converted)
    assert "sem_seg_head.pixel_decoder.mask_features.weight" in converted
    predictor = {
        k[len(D2_PREDICTOR_PREFIX) :]: v for k, v in converted.items() if k.startswith(D2_PREDICTOR_PREFIX)
    }
    fresh = _decoder(in_channels=48, layers=3)
    result = fresh.load_state_dict(predictor, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = ours.query_feat.weight + 1.0
    torch.testing.assert_close(fresh.query_feat.weight, expected, atol=0, rtol=0)
    torch.testing.assert_close(fresh.class_embed.bias, ours.class_embed.bias + 1.0, atol=0, rtol=0)

    # Another class count: class_embed is dropped, everything else kept.
    other = convert_d2_mask2former_checkpoint(original, num_classes=CLASSES + 3)
    assert D2_PREDICTOR_PREFIX + "class_embed.weight" not in other
    assert D2_PREDICTOR_PREFIX + "class_embed.bias" not in other
    assert len(other) == len(converted) - 2


def test_static_query_is_renamed_by_load_state_dict():
    ours = _decoder(layers=2)
    state = ours.state_dict()
    state["static_query.weight"] = state.pop("query_feat.weight") * 0 + 3.0
    del state._metadata[""]["version"]  # an old checkpoint has no version
    fresh = _decoder(layers=2)
    fresh.load_state_dict(state, strict=True)
    assert torch.all(fresh.query_feat.weight == 3.0)


# ---------------------------------------------------------------------------- config / registry
def _cfg(**overrides):
    cfg = add_flowseg_config(get_cfg())
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = HIDDEN
    cfg.MODEL.MASK_FORMER.NHEADS = HEADS
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = QUERIES
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 9
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = HIDDEN
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = CLASSES
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def test_build_generic_without_llm_is_the_baseline(caplog):
    cfg = _cfg()
    assert cfg.MODEL.FLOWSEG.SEMANTIC_REFINEMENT and cfg.MODEL.FLOWSEG.CONDITION_REFINEMENT
    with caplog.at_level("INFO"):
        dec = build_transformer_decoder(cfg, HIDDEN)
    assert isinstance(dec, BSFTransformerDecoder)
    assert TRANSFORMER_DECODER_REGISTRY.get("BSFTransformerDecoder") is BSFTransformerDecoder
    assert "switched off" in caplog.text
    assert not dec.semantic_refinement and not dec.condition_refinement and not dec.condition_logits
    assert dec.num_layers == 9  # DEC_LAYERS means L here (no Mask2Former "-1")
    assert set(dec.state_dict()) == _original_predictor_keys(9, input_proj=False)
    x, mf = _inputs(b=1)
    with torch.no_grad():
        out = dec.eval()(x, mf)  # no conditions needed
    assert len(out["aux_outputs"]) == 9
    assert out["pred_logits"].shape == (1, QUERIES, CLASSES + 1)


def test_build_referring_and_visual_control():
    dec = build_transformer_decoder(_cfg(**{"MODEL.FLOWSEG.MODE": "referring"}), HIDDEN)
    assert dec.semantic_refinement and dec.condition_refinement and dec.condition_logits
    assert not hasattr(dec, "class_embed")
    assert len(dec.semantic_cross_attention_layers) == len(dec.fusion_gates) == 9
    assert len(dec.condition_refinement_layers) == 9
    assert dec.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    vis = build_transformer_decoder(
        _cfg(**{"MODEL.FLOWSEG.MODE": "referring", "MODEL.FLOWSEG.VISUAL_CROSS_ATTN_CONTROL": True}), HIDDEN
    )
    assert vis.visual_cross_attn_control and vis.semantic_refinement and not vis.condition_refinement
    assert not hasattr(vis, "condition_refinement_layers")

    # generic mode with an LLM: condition logits, BSF kept on.
    gen_llm = build_transformer_decoder(_cfg(**{"MODEL.LLM.CONFIG": "tiny_llm.json"}), HIDDEN)
    assert gen_llm.condition_logits and gen_llm.semantic_refinement and gen_llm.condition_refinement
    with pytest.raises(ValueError, match="MODE"):
        build_transformer_decoder(_cfg(**{"MODEL.FLOWSEG.MODE": "panoptic"}), HIDDEN)


def test_conditions_required_error():
    dec = _decoder(layers=2, semantic_refinement=True, condition_logits=True)
    x, mf = _inputs()
    with pytest.raises(ValueError, match="conditions are required"):
        dec(x, mf)
    with pytest.raises(ValueError, match="conditions are required"):
        _decoder(layers=2, condition_refinement=True)(x, mf)
    with pytest.raises(ValueError, match="semantic_refinement=True"):
        _decoder(layers=2, visual_cross_attn_control=True)
    with pytest.raises(ValueError, match="condition_refinement=False"):
        _decoder(
            layers=2, semantic_refinement=True, condition_refinement=True, visual_cross_attn_control=True
        )


# ---------------------------------------------------------------------------- condition logits
def test_condition_logits_formula_padding_and_clamp():
    torch.manual_seed(1)
    dec = _decoder(layers=2, condition_logits=True)
    x, mf = _inputs()
    cond = torch.randn(2, 3, HIDDEN)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, condition_mask=valid)
    logits, q = out["pred_logits"], out["query_embeds"]
    assert logits.shape == (2, QUERIES, 3 + 1)
    with torch.no_grad():
        cos = F.cosine_similarity(dec.cond_query_proj(q)[:, :, None, :], cond[:, None, :, :], dim=-1)
        expected = math.exp(math.log(1 / 0.07)) * cos
        no_obj = dec.no_object_embed(q)[..., 0]
    torch.testing.assert_close(logits[0, :, :2], expected[0, :, :2], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[1, :, :1], expected[1, :, :1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[..., -1], no_obj, atol=1e-6, rtol=0)
    assert torch.all(logits[0, :, 2] == PADDED_CONDITION_LOGIT) and torch.all(logits[1, :, 1:3] == -1e4)
    assert torch.isfinite(logits).all()
    assert all(a["pred_logits"].shape == (2, QUERIES, 4) for a in out["aux_outputs"])

    with torch.no_grad():
        dec.logit_scale.fill_(10.0)  # exp(10) would be 22026: clamped to 100
        clamped = dec.condition_class_logits(q, cond, valid)
    assert clamped[0, :, :2].abs().max() <= 100.0 + 1e-4
    torch.testing.assert_close(clamped[0, :, :2], 100.0 * cos[0, :, :2], atol=1e-3, rtol=1e-5)


def test_no_mask_classification_returns_masks_only():
    dec = _decoder(layers=2, mask_classification=False)
    assert not hasattr(dec, "class_embed")
    x, mf = _inputs()
    with torch.no_grad():
        out = dec(x, mf)
    assert out["pred_logits"] is None
    assert all(set(a) == {"pred_masks"} for a in out["aux_outputs"])
    assert out["pred_masks"].shape == (2, QUERIES, 16, 24)
