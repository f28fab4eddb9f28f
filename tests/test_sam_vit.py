"""SAM-ViT segmentation encoder: parity with Hugging Face's SamVisionModel, official-checkpoint
loading, the Detectron2 registry entry and checkpoint-path errors."""

import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from flowseg import add_flowseg_config
from flowseg.checkpoint.sam import convert_sam_checkpoint, load_sam_checkpoint
from flowseg.modeling.backbone.sam_vit import SAM_VIT_PRESETS, build_sam_vit
from flowseg.modeling.from_scratch import conv_stem
from transformers import SamVisionConfig, SamVisionModel

IMG = 128  # 8x8 tokens: windows of 4 tile them, windows of 3 need padding
OUT_CH = 32
PYRAMID_ONLY = re.compile(r"^simfp_[235]\.")  # stages SAM has no weights for


def _hf_config(window: int = 4, img: int = IMG) -> SamVisionConfig:
    # SAM's official settings: LN eps 1e-6, rel-pos on, qkv bias, GELU, mlp ratio 4.
    cfg = SamVisionConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=256,
        window_size=window,
        global_attn_indexes=[1, 3],
        image_size=img,
        patch_size=16,
        output_channels=OUT_CH,
        layer_norm_eps=1e-6,
        use_rel_pos=True,
        use_abs_pos=True,
        qkv_bias=True,
        hidden_act="gelu",
    )
    cfg._attn_implementation = "eager"
    return cfg


def _random_hf(window: int = 4, img: int = IMG, seed: int = 0) -> SamVisionModel:
    """HF initialises pos/rel-pos to zero and weights with std 1e-10: randomise everything so
    that every parameter (position tables included) affects the output."""
    model = SamVisionModel(_hf_config(window, img)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def _ours(window: int = 4, img: int = IMG, **kw):
    return build_sam_vit("tiny", img_size=img, window_size=window, out_channels=OUT_CH, **kw).eval()


def _hf_to_official(sd: dict) -> dict:
    """Rename a HF SamVisionModel state dict to segment_anything's names (written independently
    of the converter, from segment_anything/modeling/image_encoder.py)."""
    out = {}
    neck = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
    for k, v in sd.items():
        k = k.replace("vision_encoder.", "image_encoder.")
        m = re.match(r"image_encoder\.neck\.(\w+)\.(weight|bias)", k)
        if m:
            k = f"image_encoder.neck.{neck[m.group(1)]}.{m.group(2)}"
        k = k.replace("patch_embed.projection", "patch_embed.proj").replace(".layers.", ".blocks.")
        k = k.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
        out[k] = v
    # a full SAM checkpoint also carries the prompt encoder and mask decoder
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    out["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    return out


def _hf_features(model: SamVisionModel, x: torch.Tensor):
    """(ViT output before the neck as NCHW, neck output)."""
    seen = {}
    hook = model.vision_encoder.neck.register_forward_pre_hook(lambda m, a: seen.setdefault("vit", a[0]))
    with torch.no_grad():
        neck = model(pixel_values=x).last_hidden_state
    hook.remove()
    return seen["vit"].permute(0, 3, 1, 2), neck


@pytest.mark.parametrize("window", [4, 3])
def test_parity_with_hf_sam(window):
    torch.manual_seed(0)
    hf = _random_hf(window)
    ours = _ours(window)
    missing, unexpected = load_sam_checkpoint(ours, hf.state_dict())
    assert unexpected == []
    assert missing and all(PYRAMID_ONLY.match(k) for k in missing)

    x = torch.randn(2, 3, IMG, IMG)
    hf_vit, hf_neck = _hf_features(hf, x)
    with torch.no_grad():
        vit = ours.net(x)["last_feat"]
        feats = ours(x)
    assert hf_vit.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(vit, hf_vit, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats["p4"], hf_neck, atol=1e-4, rtol=1e-4)
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {
        "p2": (32, 32),
        "p3": (16, 16),
        "p4": (8, 8),
        "p5": (4, 4),
    }


def test_official_and_hf_files_load_identically(tmp_path):
    from safetensors.torch import save_file

    hf = _random_hf()
    hf_sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    official = _hf_to_official(hf_sd)
    assert official["image_encoder.pos_embed"].shape == (1, 8, 8, 64)
    torch.save(official, tmp_path / "sam_vit_tiny.pth")
    save_file(hf_sd, str(tmp_path / "model.safetensors"))

    a, b = _ours(), _ours()
    res_off = load_sam_checkpoint(a, tmp_path / "sam_vit_tiny.pth")
    res_hf = load_sam_checkpoint(b, str(tmp_path))  # HF model folder
    assert res_off == res_hf
    assert res_off[1] == [] and all(PYRAMID_ONLY.match(k) for k in res_off[0])

    # Same encoder weights either way; the new pyramid stages differ (random init) so compare p4.
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not PYRAMID_ONLY.match(k):
            assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(a(x)["p4"], b(x)["p4"])
    _, hf_neck = _hf_features(hf, x)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["p4"], hf_neck, atol=1e-4, rtol=1e-4)


def test_converter_names():
    hf_sd = _random_hf().state_dict()
    conv = convert_sam_checkpoint(hf_sd, prefix_out="backbone.")
    # bare SamVisionEncoder names and official names give the same result
    bare = {k[len("vision_encoder.") :]: v for k, v in hf_sd.items()}
    assert convert_sam_checkpoint(bare, prefix_out="backbone.").keys() == conv.keys()
    off = convert_sam_checkpoint(_hf_to_official(hf_sd), prefix_out="backbone.")
    assert off.keys() == conv.keys()  # prompt encoder / mask decoder dropped
    assert torch.equal(conv["backbone.net.pos_embed"], hf_sd["vision_encoder.pos_embed"].reshape(1, 64, 64))
    assert conv["backbone.simfp_4.0.weight"] is hf_sd["vision_encoder.neck.conv1.weight"]
    assert conv["backbone.simfp_4.1.norm.bias"] is hf_sd["vision_encoder.neck.layer_norm2.bias"]
    assert conv["backbone.net.blocks.3.mlp.fc2.weight"] is hf_sd["vision_encoder.layers.3.mlp.lin2.weight"]
    # own names pass through; unknown names are kept so that loading reports them
    assert convert_sam_checkpoint({"net.blocks.0.norm1.weight": torch.ones(1)}).keys() == {
        "net.blocks.0.norm1.weight"
    }
    assert convert_sam_checkpoint({"image_encoder.foo": torch.ones(1)}).keys() == {"image_encoder.foo"}


@pytest.mark.parametrize("preset", ["B", "L", "H"])
def test_full_size_presets_match_sam_shapes(preset, monkeypatch):
    """Every tensor of a full-size HF SAM encoder maps onto our module with the same shape
    (meta tensors: nothing is allocated)."""
    # Detectron2's ViT calls .item() on its drop-path schedule, impossible on meta tensors.
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    p = SAM_VIT_PRESETS[preset]
    cfg = SamVisionConfig(
        hidden_size=p["embed_dim"],
        num_hidden_layers=p["depth"],
        num_attention_heads=p["num_heads"],
        global_attn_indexes=list(p["global_attn_indexes"]),
        mlp_dim=4 * p["embed_dim"],
    )
    with torch.device("meta"):
        hf_sd = SamVisionModel(cfg).state_dict()
        ours_sd = build_sam_vit(preset).state_dict()
    conv = convert_sam_checkpoint(hf_sd)
    sam_part = {k: v.shape for k, v in ours_sd.items() if not PYRAMID_ONLY.match(k)}
    assert {k: v.shape for k, v in conv.items()} == sam_part
    dim = p["embed_dim"]
    assert sam_part["net.pos_embed"] == (1, 64 * 64, dim)
    g = p["global_attn_indexes"][0]
    assert sam_part[f"net.blocks.{g}.attn.rel_pos_h"] == (127, dim // p["num_heads"])
    assert sam_part["net.blocks.0.attn.rel_pos_h"] == (27, dim // p["num_heads"])


def test_position_tables_resampled_for_other_input_size():
    """Loading a 128-px checkpoint into a 64-px model resamples pos / rel-pos tables exactly as
    Detectron2 does at run time, so both models agree on 64-px inputs."""
    sd = _random_hf().state_dict()
    big, small = _ours(img=128), _ours(img=64)
    assert load_sam_checkpoint(big, sd)[1] == []
    missing, unexpected = load_sam_checkpoint(small, sd)
    assert unexpected == [] and all(PYRAMID_ONLY.match(k) for k in missing)
    assert small.net.pos_embed.shape == (1, 16, 64)
    assert small.net.blocks[1].attn.rel_pos_h.shape == (7, 32)
    small.load_state_dict({k: v for k, v in big.state_dict().items() if PYRAMID_ONLY.match(k)}, strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out_big, out_small = big(x), small(x)
    for k in out_big:
        torch.testing.assert_close(out_small[k], out_big[k], atol=1e-5, rtol=1e-5)


def _tiny_cfg():
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_sam_vit_backbone"
    cfg.MODEL.SAM_VIT.PRESET = "tiny"
    cfg.MODEL.SAM_VIT.IMG_SIZE = 128
    cfg.MODEL.SAM_VIT.WINDOW_SIZE = 4
    return cfg


def test_registry_build_non_square():
    cfg = _tiny_cfg()
    torch.manual_seed(3)
    backbone = build_backbone(cfg).eval()
    shapes = backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    assert {s.channels for s in shapes.values()} == {256}
    assert backbone.size_divisibility == 32
    assert [b.window_size for b in backbone.net.blocks] == [4, 0, 4, 0]
    assert backbone.net.blocks[0].norm1.eps == 1e-6
    # same result as the plain-python constructor with the same seed
    torch.manual_seed(3)
    plain = build_sam_vit("tiny", img_size=128, window_size=4).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out, ref = backbone(x), plain(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 256, 24, 32),
        "p3": (1, 256, 12, 16),
        "p4": (1, 256, 6, 8),
        "p5": (1, 256, 3, 4),
    }
    for k in out:
        assert torch.equal(out[k], ref[k])
    # LN output: every position of every map is normalised over channels (weight 1, bias 0)
    torch.testing.assert_close(out["p4"].mean(1), torch.zeros(1, 6, 8), atol=1e-5, rtol=0)


def _loss_and_attn_calls(model, x):
    calls = []
    hooks = [b.attn.register_forward_hook(lambda *_: calls.append(1)) for b in model.net.blocks]
    model.train()
    sum(v.square().mean() for v in model(x).values()).backward()
    for h in hooks:
        h.remove()
    return len(calls)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = _ours(drop_path_rate=0.0)
    ckpt = _ours(use_act_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay compatible
    x = torch.randn(1, 3, IMG, IMG)
    # checkpointed blocks run their forward again during backward
    assert _loss_and_attn_calls(plain, x) == 4
    assert _loss_and_attn_calls(ckpt, x) == 8
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_freeze_stops_vit_gradients_only():
    torch.manual_seed(0)
    plain = _ours()
    frozen = _ours(freeze=True)
    frozen.load_state_dict(plain.state_dict())
    assert not any(p.requires_grad for p in frozen.net.parameters())
    x = torch.randn(1, 3, IMG, IMG)
    _loss_and_attn_calls(plain, x)
    _loss_and_attn_calls(frozen, x)
    for (n, a), (_, b) in zip(plain.named_parameters(), frozen.named_parameters()):
        if n.startswith("net."):
            assert b.grad is None and a.grad is not None, n
        else:  # the pyramid trains and its gradients do not depend on the ViT being frozen
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_missing_checkpoint_raises(tmp_path):
    path = str(tmp_path / "no_such_sam_vit_l.pth")
    with pytest.raises(FileNotFoundError, match="no_such_sam_vit_l.pth"):
        build_sam_vit("tiny", img_size=64, checkpoint=path)
    cfg = _tiny_cfg()
    cfg.MODEL.SAM_VIT.CHECKPOINT = path
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        build_backbone(cfg)


def test_cfg_checkpoint_loaded_at_build(tmp_path):
    hf = _random_hf()
    torch.save(_hf_to_official(hf.state_dict()), tmp_path / "sam.pth")
    cfg = _tiny_cfg()
    cfg.MODEL.SAM_VIT.OUT_CHANNELS = OUT_CH
    cfg.MODEL.SAM_VIT.CHECKPOINT = str(tmp_path / "sam.pth")
    cfg.MODEL.SAM_VIT.FREEZE = True
    backbone = build_backbone(cfg).eval()
    x = torch.randn(1, 3, IMG, IMG)
    _, hf_neck = _hf_features(hf, x)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["p4"], hf_neck, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in backbone.net.parameters())


@pytest.mark.parametrize("patch", [8, 16])
def test_conv_stem_same_token_grid_and_shift_equivariant(patch):
    torch.manual_seed(0)
    stem = conv_stem(3, 64, patch).eval()
    # log2(patch) stride-2 3x3 convs + 1x1 projection
    assert sum(isinstance(m, torch.nn.Conv2d) for m in stem) == patch.bit_length()
    linear = build_sam_vit("tiny", img_size=128, patch_size=patch).net.patch_embed
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert stem(x).shape == linear.proj(x).shape
        # a shift by one patch moves the token map by one token (away from the zero-padded border)
        shifted = torch.roll(x, shifts=patch, dims=3)
        a, b = stem(x), stem(shifted)
    # (up to GroupNorm statistics, which the zero-padded border shifts slightly)
    scale = a.abs().mean()
    assert (b[..., 2:-1] - a[..., 1:-2]).abs().mean() < 0.05 * scale
    assert (a[..., 1:] - a[..., :-1]).abs().mean() > 0.3 * scale  # neighbouring tokens differ


def test_conv_stem_from_config_and_errors(tmp_path):
    cfg = _tiny_cfg()
    cfg.MODEL.SAM_VIT.PATCH_SIZE = 8
    cfg.MODEL.SAM_VIT.CONV_STEM = True
    backbone = build_backbone(cfg)
    assert isinstance(backbone.net.patch_embed.proj, torch.nn.Sequential)
    out = backbone(torch.randn(2, 3, 64, 64))
    assert out["p4"].shape == (2, 256, 4, 4)
    with pytest.raises(ValueError, match="power-of-two"):
        conv_stem(3, 64, 12)
    torch.save({}, tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="CONV_STEM"):
        build_sam_vit("tiny", img_size=64, use_conv_stem=True, checkpoint=str(tmp_path / "sam.pth"))
