"""X-SAM's feature path of the SAM-ViT backbone (``MODEL.SAM_VIT.FEATURE_PATH "connector"``):
pixel-shuffle channel order, the connector's shapes and computation, parity of the block outputs,
SAM's neck and ``"sam_tokens"`` with Hugging Face's SamVisionModel, and the registry build."""

import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from flowseg import add_flowseg_config
from flowseg.checkpoint.sam import load_sam_checkpoint
from flowseg.modeling.backbone.connector import (
    ConnectorBranch,
    SAMViTConnector,
    default_connector_layers,
    pixel_shuffle,
    sam_neck,
    vit_block_outputs,
)
from flowseg.modeling.backbone.sam_vit import SAM_VIT_PRESETS, build_sam_vit
from test_sam_vit import IMG, OUT_CH, _hf_to_official, _random_hf


def test_pixel_shuffle_channel_order_by_index():
    x = torch.randn(2, 8, 4, 6)
    up, down = pixel_shuffle(x, 2.0), pixel_shuffle(x, 0.5)
    assert up.shape == (2, 2, 8, 12) and down.shape == (2, 32, 2, 3)
    c = 8
    for h in range(4):
        for w in range(6):
            for b in range(2):  # row offset
                for a in range(2):  # column offset
                    for k in range(c // 4):
                        assert torch.equal(
                            up[:, k, 2 * h + b, 2 * w + a], x[:, a * c // 2 + b * c // 4 + k, h, w]
                        )
    for h in range(2):
        for w in range(3):
            for b in range(2):
                for a in range(2):
                    for k in range(c):
                        assert torch.equal(
                            down[:, b * 2 * c + a * c + k, h, w], x[:, k, 2 * h + b, 2 * w + a]
                        )
    assert torch.equal(pixel_shuffle(x, 1.0), x)
    # not torch's PixelShuffle order (channel-major), on purpose
    assert not torch.equal(up, F.pixel_shuffle(x, 2))
    last = pixel_shuffle(x.permute(0, 2, 3, 1), 0.5, channels_last=True)
    assert torch.equal(last, down.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="does not divide"):
        pixel_shuffle(torch.randn(1, 8, 3, 4), 0.5)


@pytest.mark.parametrize(
    "scale, out_conv, params", [(2.0, 2048, 3_938_304), (1.0, 1024, 3_411_968), (0.5, 512, 3_148_800)]
)
def test_connector_branch_has_xsams_parameter_shapes(scale, out_conv, params):
    branch = ConnectorBranch(1024, scale, 512)
    shapes = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
    # X-SAM's seg_connector.model.{level}.model.{0..5}: convs without bias, LayerNorm2d weight + bias
    assert shapes == {
        "0.weight": (512, 1024, 1, 1),
        "1.weight": (512,),
        "1.bias": (512,),
        "2.weight": (512, 512, 3, 3),
        "3.weight": (512,),
        "3.bias": (512,),
        "4.weight": (out_conv, 512, 1, 1),
        "5.weight": (out_conv,),
        "5.bias": (out_conv,),
    }
    assert sum(p.numel() for p in branch.parameters()) == params
    assert branch.out_channels == int(1024 / scale)


def _layer_norm_2d(x, weight, bias, eps=1e-6):
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def test_connector_branch_computes_convs_norms_then_shuffle():
    torch.manual_seed(0)
    branch = ConnectorBranch(16, 0.5, 8)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 16, 5, 7)  # odd grid: one zero row and column, bottom / right
    y = F.pad(x, (0, 1, 0, 1))
    sd = branch.state_dict()
    y = _layer_norm_2d(F.conv2d(y, sd["0.weight"]), sd["1.weight"], sd["1.bias"])
    y = _layer_norm_2d(F.conv2d(y, sd["2.weight"], padding=1), sd["3.weight"], sd["3.bias"])
    y = _layer_norm_2d(F.conv2d(y, sd["4.weight"]), sd["5.weight"], sd["5.bias"])
    with torch.no_grad():
        out = branch(x)
    assert out.shape == (2, 32, 3, 4)
    torch.testing.assert_close(out, pixel_shuffle(y, 0.5), rtol=1e-5, atol=1e-5)


def _connector(**kw):
    defaults = dict(layers=(2, 3, 4), scales=(2.0, 1.0, 0.5), hidden=16, tokens=0)
    defaults.update(kw)
    return build_sam_vit(
        "tiny",
        img_size=IMG,
        window_size=4,
        out_channels=OUT_CH,
        feature_path="connector",
        connector_layers=defaults["layers"],
        connector_scale_factors=defaults["scales"],
        connector_hidden_dim=defaults["hidden"],
        sam_tokens_layer=defaults["tokens"],
    ).eval()


def test_hf_sam_parity_of_block_outputs_neck_and_sam_tokens():
    torch.manual_seed(0)
    hf = _random_hf()
    ours = _connector(tokens=3)
    missing, unexpected = load_sam_checkpoint(ours, hf.state_dict())
    # SAM has every tensor but the connector's; its neck lands in sam_neck
    assert unexpected == [] and missing and all(k.startswith("connector.") for k in missing)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        hf_out = hf(pixel_values=x, output_hidden_states=True)
        blocks = vit_block_outputs(ours.net, x, [2, 3, 4])
        feats = ours(x)
    hidden = hf_out.hidden_states  # [0]: patch embedding, [i]: output of block i (1-indexed)
    assert len(hidden) == 5 and hidden[3].abs().mean() > 0.1
    for i in (2, 3, 4):
        torch.testing.assert_close(blocks[i], hidden[i], atol=1e-4, rtol=1e-4)
    # "sam_tokens" is X-SAM's hidden_states[-2] (block depth - 1), channels first
    torch.testing.assert_close(feats["sam_tokens"], hidden[-2].permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)
    # the carried neck holds SAM's weights: on the last block it gives SAM's neck output
    with torch.no_grad():
        neck = ours.sam_neck(blocks[4].permute(0, 3, 1, 2))
    torch.testing.assert_close(neck, hf_out.last_hidden_state, atol=1e-4, rtol=1e-4)
    # each level is its connector branch on its block's output
    for name, branch, i in zip(("p3", "p4", "p5"), ours.connector, (2, 3, 4)):
        with torch.no_grad():
            expected = branch(hidden[i].permute(0, 3, 1, 2))
        torch.testing.assert_close(feats[name], expected, atol=1e-4, rtol=1e-4)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "p3": (2, 32, 16, 16),
        "p4": (2, 64, 8, 8),
        "p5": (2, 128, 4, 4),
        "sam_tokens": (2, 64, 8, 8),
    }


def test_official_checkpoint_neck_goes_to_sam_neck_and_is_frozen():
    hf = _random_hf()
    ours = _connector()
    load_sam_checkpoint(ours, _hf_to_official(hf.state_dict()))
    assert torch.equal(
        ours.sam_neck[1].norm.weight, hf.state_dict()["vision_encoder.neck.layer_norm2.weight"]
    )
    assert torch.equal(ours.sam_neck[1].weight, hf.state_dict()["vision_encoder.neck.conv2.weight"])
    # not computed, so frozen (DDP would wait for its gradients otherwise); the connector trains
    assert not any(p.requires_grad for p in ours.sam_neck.parameters())
    assert all(p.requires_grad for p in ours.connector.parameters())
    assert ours.sam_neck_prefix == "sam_neck"
    # SAM's neck: 1x1 conv and 3x3 conv to 256 channels at full size (852,992 parameters)
    assert sum(p.numel() for p in sam_neck(1024, 256).parameters()) == 852_992


def _cfg(**overrides):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_sam_vit_backbone"
    cfg.MODEL.SAM_VIT.PRESET = "tiny"
    cfg.MODEL.SAM_VIT.IMG_SIZE = IMG
    cfg.MODEL.SAM_VIT.WINDOW_SIZE = 4
    cfg.MODEL.SAM_VIT.FEATURE_PATH = "connector"
    cfg.MODEL.SAM_VIT.CONNECTOR.LAYERS = [2, 3, 4]
    cfg.MODEL.SAM_VIT.CONNECTOR.HIDDEN_DIM = 16
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def test_registry_build_shapes_square_pad_and_tokens():
    cfg = _cfg(**{"MODEL.SAM_VIT.SQUARE_PAD": IMG, "MODEL.SAM_VIT.RETURN_SAM_TOKENS": True})
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, SAMViTConnector)
    shapes = {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()}
    assert shapes == {"p3": (32, 8), "p4": (64, 16), "p5": (128, 32), "sam_tokens": (64, 16)}
    assert backbone.sam_tokens_layer == 3  # SAM_TOKENS_LAYER 0: the penultimate block
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": IMG}
    assert backbone.size_divisibility == 32
    x = torch.randn(1, 3, 96, 128)  # non-square input (the meta-architecture pads it square)
    with torch.no_grad():
        out = backbone(x)
    assert tuple(out["p3"].shape) == (1, 32, 12, 16) and tuple(out["p5"].shape) == (1, 128, 3, 4)
    # without RETURN_SAM_TOKENS there is no "sam_tokens" (and block 3 is not kept)
    plain = build_backbone(_cfg())
    assert "sam_tokens" not in plain.output_shape()


def test_default_layers_are_the_last_global_blocks_and_errors():
    assert default_connector_layers(SAM_VIT_PRESETS["L"]["global_attn_indexes"], 3) == [12, 18, 24]
    assert default_connector_layers(SAM_VIT_PRESETS["B"]["global_attn_indexes"], 3) == [6, 9, 12]
    with pytest.raises(ValueError, match=re.escape("3 connector levels need as many global blocks")):
        build_backbone(_cfg(**{"MODEL.SAM_VIT.CONNECTOR.LAYERS": []}))  # tiny has 2 global blocks
    with pytest.raises(ValueError, match="1..4"):
        build_backbone(_cfg(**{"MODEL.SAM_VIT.CONNECTOR.LAYERS": [2, 3, 5]}))
    with pytest.raises(ValueError, match="FEATURE_PATH"):
        build_backbone(_cfg(**{"MODEL.SAM_VIT.FEATURE_PATH": "fpn"}))


def test_pyramid_path_sam_tokens_leave_the_pyramid_unchanged():
    hf = _random_hf()
    torch.manual_seed(0)
    plain = build_sam_vit("tiny", img_size=IMG, window_size=4, out_channels=OUT_CH).eval()
    torch.manual_seed(0)
    tokens = build_sam_vit(
        "tiny", img_size=IMG, window_size=4, out_channels=OUT_CH, sam_tokens_layer=3
    ).eval()
    load_sam_checkpoint(plain, hf.state_dict())
    load_sam_checkpoint(tokens, hf.state_dict())
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        a, b = plain(x), tokens(x)
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert set(b) == set(a) | {"sam_tokens"} and tokens.output_shape()["sam_tokens"].stride == 16
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(b["sam_tokens"], hidden[3].permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["pyramid", "connector"])
def test_return_sam_tokens_switch(path):
    kw = dict(feature_path=path, connector_layers=(2, 3, 4), connector_hidden_dim=16)
    backbone = build_sam_vit("tiny", img_size=IMG, window_size=4, out_channels=OUT_CH, **kw).eval()
    x = torch.randn(1, 3, IMG, IMG)
    assert not backbone.return_sam_tokens and "sam_tokens" not in backbone(x)
    backbone.return_sam_tokens = True  # the penultimate block
    assert backbone.sam_tokens_layer == 3 and backbone.output_shape()["sam_tokens"].channels == 64
    with torch.no_grad():
        tokens = backbone(x)["sam_tokens"]
        expected = vit_block_outputs(backbone.net, x, [3])[3].permute(0, 3, 1, 2)
    assert torch.equal(tokens, expected)
    backbone.return_sam_tokens = False
    assert "sam_tokens" not in backbone(x) and "sam_tokens" not in backbone.output_shape()
    with pytest.raises(ValueError, match="1..4"):
        backbone.set_sam_tokens_layer(5)


def test_block_outputs_stop_after_the_last_requested_block():
    net = _connector().net
    calls = []
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(net.blocks, 1)
    ]
    with torch.no_grad():
        out = vit_block_outputs(net, torch.randn(1, 3, IMG, IMG), [2])
    for h in hooks:
        h.remove()
    assert calls == [1, 2] and list(out) == [2]
