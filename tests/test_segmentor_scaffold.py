"""X-SAM's segmentor scaffold behind FlowSeg's config keys: the pixel decoder on 1/8-1/32 with one
FPN level on the 1/8 input (parity with Hugging Face's Mask2Former pixel decoder built as X-SAM
builds it), the background-embedding condition logits, BAR at 1/4 on 1/8 mask features, and a
tiny model with all of it trained one step and run on a non-square image."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer
from flowseg.checkpoint.mask2former_pixel_decoder import convert_hf_mask2former_pixel_decoder
from flowseg.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from flowseg.modeling.refiner import BoundaryAwareRefiner, build_refiner
from flowseg.modeling.transformer_decoder import PADDED_CONDITION_LOGIT
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from hf_tiny import bsf_decoder, decoder_inputs
from paper_scaffold import XSAM_TINY
from test_sam_vit import _hf_to_official, _random_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 32


# ----------------------------------------------------------------------------- pixel decoder
def _xsam_pixel_decoder(channels=(8, 16, 32), **kw) -> MSDeformAttnPixelDecoder:
    shape = {f"p{i + 3}": ShapeSpec(channels=c, stride=8 * 2**i) for i, c in enumerate(channels)}
    args = dict(
        transformer_dropout=0.0,
        transformer_nheads=2,
        transformer_dim_feedforward=48,
        transformer_enc_layers=2,
        conv_dim=HIDDEN,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["p3", "p4", "p5"],
        common_stride=8,
        num_fpn_levels=1,
    )
    args.update(kw)
    return MSDeformAttnPixelDecoder(shape, **args).eval()


def test_pixel_decoder_matches_hf_built_as_xsam_builds_it():
    """X-SAM builds transformers' Mask2FormerPixelDecoder with feature_channels [512, 1024, 2048]
    for strides 8-32 and Mask2Former's stride-4 settings: one FPN level lands on the 1/8 input."""
    tr = pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    config = tr.Mask2FormerConfig(
        feature_size=HIDDEN,
        mask_feature_size=16,
        encoder_feedforward_dim=48,
        encoder_layers=2,
        num_attention_heads=2,
        common_stride=4,
        feature_strides=[4, 8, 16, 32],
    )
    torch.manual_seed(0)
    hf = Mask2FormerPixelDecoder(config, feature_channels=[8, 16, 32]).eval()
    with torch.no_grad():
        hf.level_embed.normal_()  # allocated with torch.empty: uninitialised outside from_pretrained
        for p in hf.parameters():  # HF zero-initialises offsets / attention weights
            p.add_(0.2 * torch.randn_like(p))
    ours = _xsam_pixel_decoder()
    converted = convert_hf_mask2former_pixel_decoder(hf.state_dict())
    assert set(converted) == set(ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    assert ours.adapter_1.in_channels == 8 and ours.num_fpn_levels == 1

    feats = [torch.randn(2, c, 12 // 2**i, 16 // 2**i) for i, c in enumerate((8, 16, 32))]
    with torch.no_grad():
        hf_out = hf(feats)
        mask_features, _, ms = ours.forward_features(dict(zip(("p3", "p4", "p5"), feats)))
    assert mask_features.shape == (2, 16, 12, 16)  # 1/8, like the finest input
    torch.testing.assert_close(mask_features, hf_out.mask_features, rtol=0, atol=1e-4)
    for a, b in zip(ms, hf_out.multi_scale_features):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert mask_features.std() > 0.1


def test_pixel_decoder_fpn_levels_checked_against_common_stride():
    assert _xsam_pixel_decoder(num_fpn_levels=0).num_fpn_levels == 0  # mask features = encoder's 1/8
    with pytest.raises(ValueError, match="COMMON_STRIDE"):
        _xsam_pixel_decoder(common_stride=4)
    with pytest.raises(ValueError, match="input features"):
        _xsam_pixel_decoder(num_fpn_levels=4)
    # -1 keeps Mask2Former's rule: no level between stride 8 and common stride 8
    assert _xsam_pixel_decoder(num_fpn_levels=-1).num_fpn_levels == 0


# ----------------------------------------------------------------------------- class head
def _background_decoder(**kw):
    return bsf_decoder(
        hidden=HIDDEN,
        heads=4,
        queries=7,
        classes=5,
        layers=2,
        feedforward=64,
        in_channels=HIDDEN,
        condition_logits=True,
        condition_logit_type="background",
        **kw,
    )


def test_background_head_formula_padding_and_clamp():
    torch.manual_seed(1)
    dec = _background_decoder()
    names = set(dec.state_dict())
    assert {"logit_scale", "background_embed.weight"} <= names
    assert not any(n.startswith(("cond_query_proj", "no_object_embed", "class_embed")) for n in names)
    assert dec.background_embed.weight.shape == (1, HIDDEN) and dec.logit_scale.numel() == 1
    assert dec.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    x, mf = decoder_inputs(2, HIDDEN, HIDDEN, 0)
    cond = torch.randn(2, 3, HIDDEN)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, condition_mask=valid)
    logits, q = out["pred_logits"], out["query_embeds"]  # q: the decoder's LayerNorm output
    assert logits.shape == (2, 7, 3 + 1)
    with torch.no_grad():
        bg = dec.background_embed.weight[0]
        for b in range(2):
            for k in range(int(valid[b].sum())):
                expected = F.cosine_similarity(q[b], cond[b, k][None], dim=-1) / 0.07
                torch.testing.assert_close(logits[b, :, k], expected, atol=1e-4, rtol=1e-5)
            # the no-object column is the background condition, scored like the others
            torch.testing.assert_close(logits[b, :, -1], F.cosine_similarity(q[b], bg[None], dim=-1) / 0.07)
    assert torch.all(logits[0, :, 2] == PADDED_CONDITION_LOGIT) and torch.all(logits[1, :, 1:3] == -1e4)
    with torch.no_grad():
        dec.logit_scale.fill_(math.log(1000.0))  # not clamped itself, the logits are: +-50
        clamped = dec.condition_class_logits(q, cond, valid)
        cos = F.cosine_similarity(q[0][:, None], cond[0, :2][None], dim=-1)
    torch.testing.assert_close(clamped[0, :, :2], (1000.0 * cos).clamp(-50, 50), atol=1e-3, rtol=1e-5)
    assert clamped[0, :, :2].abs().max() == 50.0


def test_background_head_from_config_and_errors():
    from flowseg.modeling.transformer_decoder import build_transformer_decoder

    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_list(["MODEL.FLOWSEG.MODE", "referring", "MODEL.FLOWSEG.CONDITION_LOGITS", "background"])
    dec = build_transformer_decoder(cfg, 256)
    assert dec.condition_logit_type == "background" and hasattr(dec, "background_embed")
    cfg.MODEL.FLOWSEG.CONDITION_LOGITS = "dot"
    with pytest.raises(ValueError, match="CONDITION_LOGITS"):
        build_transformer_decoder(cfg, 256)


# ----------------------------------------------------------------------------- BAR scale
def test_bar_upsampled_equals_bar_on_upsampled_inputs():
    torch.manual_seed(0)
    up = BoundaryAwareRefiner(mask_dim=8, compress_dim=4, hidden_dim=6, upsample=2)
    same = BoundaryAwareRefiner(mask_dim=8, compress_dim=4, hidden_dim=6)
    same.load_state_dict(up.state_dict())
    logits = torch.randn(2, 3, 6, 5) * 4
    feats = torch.randn(2, 8, 6, 5)

    def x2(t):
        return F.interpolate(t, size=(12, 10), mode="bilinear", align_corners=False)

    with torch.no_grad():
        out = up(logits, feats)
        ref = same(x2(logits), x2(feats))  # f_comp commutes with the bilinear upsampling
        sel = up.refine_selected(logits[1], feats, torch.tensor([1, 1, 1]))
    assert out.shape == (2, 3, 12, 10)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sel, out[1], atol=1e-5, rtol=1e-5)
    assert (out != x2(logits)).any()  # some boundary pixels were refined


def test_bar_stride_from_config():
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8, "MODEL.FLOWSEG.BAR.STRIDE", 4])
    assert build_refiner(cfg).upsample == 2
    cfg.MODEL.FLOWSEG.BAR.STRIDE = 0  # the mask features' own stride
    assert build_refiner(cfg).upsample == 1
    cfg.MODEL.FLOWSEG.BAR.STRIDE = 3
    with pytest.raises(ValueError, match="BAR.STRIDE"):
        build_refiner(cfg)


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def xsam_tiny(tmp_path_factory):
    llm = make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml"))
    cfg.merge_from_list(tiny_llm_cfg_overrides(llm, lora=False) + XSAM_TINY + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _batch(hw=(96, 128)):
    g = torch.Generator().manual_seed(0)
    out = []
    for expression in ("the small red circle", "the leftmost star"):
        inst = Instances(hw)
        masks = torch.zeros(1, *hw, dtype=torch.bool)
        masks[0, 20:60, 30:70] = True
        inst.gt_masks, inst.gt_classes = BitMasks(masks), torch.zeros(1, dtype=torch.long)
        image = torch.randint(0, 255, (3, *hw), dtype=torch.uint8, generator=g)
        out.append({"image": image, "instances": inst, "expression": expression, "task": "referring"})
    return out


def test_tiny_xsam_scaffold_trains_and_infers(xsam_tiny):
    cfg, model = xsam_tiny
    shapes = {k: (s.channels, s.stride) for k, s in model.backbone.output_shape().items()}
    assert shapes == {"p3": (32, 8), "p4": (64, 16), "p5": (128, 32), "sam_tokens": (64, 16)}
    assert model.sem_seg_head.pixel_decoder.num_fpn_levels == 1 and model.refiner.upsample == 2
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", tuple(a[0].shape)))
    model.sem_seg_head.register_forward_hook(
        lambda m, a, o: seen.__setitem__("masks", tuple(o["pred_masks"].shape))
    )

    model.train()
    losses = model(_batch())
    assert seen["input"] == (2, 3, 128, 128)  # a 96x128 image padded bottom/right to SAM's square
    assert seen["masks"] == (2, 16, 16, 16)  # mask logits at 1/8
    total = sum(losses.values())
    assert torch.isfinite(total) and {"loss_ce", "loss_mask", "loss_mask_refined"} <= set(losses)
    total.backward()
    assert all(p.grad is None for p in model.backbone.sam_neck.parameters())  # carried, unused
    assert all(p.grad is not None for p in model.backbone.connector.parameters())
    pred = model.sem_seg_head.predictor
    assert pred.background_embed.weight.grad is not None and pred.logit_scale.grad is not None
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in x.items() if k != "instances"} for x in _batch()])
    assert out[0]["ref_seg"]["mask"].shape == (96, 128) and 0.0 <= out[0]["ref_seg"]["score"] <= 1.0


def test_sam_checkpoint_through_model_weights_reports_the_connector_as_new(xsam_tiny, tmp_path):
    cfg, model = xsam_tiny
    hf = _random_hf()
    # the tiny HF SAM is 64 wide with 32-channel neck; the model's neck is OUT_CHANNELS (64) wide
    cfg = cfg.clone()
    cfg.merge_from_list(["MODEL.SAM_VIT.OUT_CHANNELS", 32])
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save(_hf_to_official(hf.state_dict()), tmp_path / "sam.pth")
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.load(str(tmp_path / "sam.pth"))
    report = ckpt.last_report
    assert not report.incorrect_shapes and not report.unexpected
    enc = report.missing_expected["segmentation_encoder"]
    assert enc and all(k.startswith("backbone.connector.") for k in enc)
    assert "segmentation_encoder" not in report.missing_unexpected
    sd = hf.state_dict()
    assert torch.equal(model.backbone.sam_neck[0].weight, sd["vision_encoder.neck.conv1.weight"])
    assert torch.equal(
        model.backbone.net.blocks[3].mlp.fc1.weight, sd["vision_encoder.layers.3.mlp.lin1.weight"]
    )


def test_shared_image_features_equal_per_expression_with_the_scaffold(xsam_tiny):
    from flowseg.engine.shared_features import SharedImageFeatureInference
    from test_shared_features import _assert_same_outputs

    _, model = xsam_tiny
    model.eval()
    image = _batch()[0]["image"]
    inputs = [
        {"image": image, "image_id": 7, "height": 96, "width": 128, "expression": e, "task": "referring"}
        for e in ("the small red circle", "the leftmost star", "a big square")
    ]
    with torch.no_grad():
        ref = [model([x])[0] for x in inputs]
        got = SharedImageFeatureInference(model, max_expressions_per_pass=2)(inputs)
    _assert_same_outputs(ref, got)


def test_connector_trains_at_the_base_rate_and_the_neck_is_never_used(xsam_tiny):
    from flowseg.engine import build_optimizer
    from flowseg.engine.ddp import needs_find_unused_parameters

    cfg, model = xsam_tiny
    cfg = cfg.clone()
    cfg.merge_from_list(["SOLVER.BACKBONE_MULTIPLIER", 0.1, "SOLVER.BASE_LR", 1e-4])
    lr_of = {id(p): g["lr"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    # X-SAM: lr_mult 0.1 on the SAM encoder only; the connector is its own module
    assert all(lr_of[id(p)] == pytest.approx(1e-4) for p in model.backbone.connector.parameters())
    assert all(lr_of[id(p)] == pytest.approx(1e-5) for p in model.backbone.net.parameters())
    assert not any(id(p) in lr_of for p in model.backbone.sam_neck.parameters())  # frozen
    assert needs_find_unused_parameters(cfg, model) == []
    model.backbone.sam_neck.requires_grad_(True)
    try:
        assert any("backbone.sam_neck" in r for r in needs_find_unused_parameters(cfg, model))
    finally:
        model.backbone.sam_neck.requires_grad_(False)
