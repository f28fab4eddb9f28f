"""Pixel decoder: MSDeformAttn against a naive reference, and the whole decoder against Hugging Face."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from flowseg import add_flowseg_config
from flowseg.checkpoint.mask2former_pixel_decoder import convert_hf_mask2former_pixel_decoder
from flowseg.modeling.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
    ms_deform_attn_core_pytorch,
)
from flowseg.modeling.registry import PIXEL_DECODER_REGISTRY
from flowseg.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine
from hf_tiny import tiny_hf_mask2former


# ----------------------------------------------------------------------------- naive reference
def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample ``img`` (H, W, D) at normalised (x, y), pixel centres at (i + 0.5) / size."""
    h, w, _ = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[-1], dtype=img.dtype)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            if 0 <= xi < w and 0 <= yi < h:
                out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[yi, xi]
    return out


def _naive_ms_deform_attn(value, shapes, locs, weights):
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locs.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl] + h * w, head].reshape(h, w, d)
                    for p in range(n_points):
                        x, y = locs[b, q, head, lvl, p].tolist()
                        out[b, q, head] += weights[b, q, head, lvl, p] * _bilinear_zero_pad(img, x, y)
    return out.reshape(n, lq, m * d)


def test_core_known_values():
    # One 2x2 map [[1, 2], [3, 4]], one head, one channel, one point per query.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    locs = torch.tensor(
        [
            [0.25, 0.25],  # centre of pixel (0, 0)
            [0.75, 0.75],  # centre of pixel (1, 1)
            [0.5, 0.5],  # middle of the four pixels
            [0.0, 0.0],  # image corner: 1/4 of pixel (0, 0), the rest is zero padding
            [1.0, 0.25],  # right edge, row 0: half of pixel (0, 1)
            [0.5, 0.25],  # between pixels (0, 0) and (0, 1)
            [2.0, 2.0],  # far outside
        ]
    ).view(1, 7, 1, 1, 1, 2)
    weights = torch.ones(1, 7, 1, 1, 1)
    out = ms_deform_attn_core_pytorch(value, [(2, 2)], locs, weights)
    expected = torch.tensor([1.0, 4.0, 2.5, 0.25, 1.0, 1.5, 0.0]).view(1, 7, 1)
    torch.testing.assert_close(out, expected)


def test_core_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, n_points = 2, 2, 3, 4, 3
    shapes = [(3, 4), (2, 5), (1, 2)]
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    # Part of the points fall outside [0, 1] to exercise zero padding.
    locs = torch.rand(n, lq, m, len(shapes), n_points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, lq, m, len(shapes), n_points, generator=g, dtype=torch.float64)
    expected = _naive_ms_deform_attn(value, shapes, locs, weights)
    for spatial_shapes in (shapes, torch.tensor(shapes)):
        out = ms_deform_attn_core_pytorch(value, spatial_shapes, locs, weights)
        assert out.shape == (n, lq, m * d)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_msdeformattn_init_matches_deformable_detr():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h looks along angle 2*pi*h/4 (normalised so the larger coordinate is 1), point k at k+1 px.
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):
        for lvl in range(2):
            torch.testing.assert_close(bias[:, lvl, k], directions * (k + 1), atol=1e-6, rtol=0)
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_module_matches_naive(ref_dim):
    torch.manual_seed(0)
    d_model, n_heads, n_levels, n_points = 8, 2, 2, 2
    shapes = [(3, 2), (2, 3)]
    attn = MSDeformAttn(d_model, n_levels, n_heads, n_points).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    n, lq = 2, 3
    s = sum(h * w for h, w in shapes)
    query = torch.randn(n, lq, d_model, dtype=torch.float64)
    inp = torch.randn(n, s, d_model, dtype=torch.float64)
    ref = torch.rand(n, lq, n_levels, ref_dim, dtype=torch.float64)
    pad = torch.zeros(n, s, dtype=torch.bool)
    pad[1, -2:] = True
    out = attn(query, ref, inp, torch.tensor(shapes), torch.tensor([0, 6]), pad)

    # Reference: the same maths written out, sampled with the naive loop.
    value = attn.value_proj(inp).masked_fill(pad[..., None], 0.0).view(n, s, n_heads, d_model // n_heads)
    off = attn.sampling_offsets(query).view(n, lq, n_heads, n_levels, n_points, 2)
    w = (
        attn.attention_weights(query)
        .view(n, lq, n_heads, -1)
        .softmax(-1)
        .view(n, lq, n_heads, n_levels, n_points)
    )
    if ref_dim == 2:
        norm = torch.tensor([[w_, h_] for h_, w_ in shapes], dtype=torch.float64)
        locs = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        locs = ref[:, :, None, :, None, :2] + off / n_points * ref[:, :, None, :, None, 2:] * 0.5
    expected = attn.output_proj(_naive_ms_deform_attn(value, shapes, locs, w))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- position embedding
def test_position_embedding_sine_closed_form():
    f, h, w = 8, 3, 5
    pos = PositionEmbeddingSine(f, normalize=True)(torch.zeros(2, 1, h, w))
    assert pos.shape == (2, 2 * f, h, w)
    two_pi = 2 * math.pi
    for i, j in [(0, 0), (2, 4), (1, 3)]:
        y, x = (i + 1) / (h + 1e-6) * two_pi, (j + 1) / (w + 1e-6) * two_pi
        for k in range(f // 2):
            freq = 10000 ** (2 * k / f)
            assert pos[1, 2 * k, i, j].item() == pytest.approx(math.sin(y / freq), abs=1e-6)
            assert pos[1, 2 * k + 1, i, j].item() == pytest.approx(math.cos(y / freq), abs=1e-6)
            assert pos[1, f + 2 * k, i, j].item() == pytest.approx(math.sin(x / freq), abs=1e-6)
            assert pos[1, f + 2 * k + 1, i, j].item() == pytest.approx(math.cos(x / freq), abs=1e-6)
    # A padding mask restarts the normalisation on the valid area.
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[:, :, 3:] = True
    masked = PositionEmbeddingSine(f, normalize=True)(torch.zeros(1, 1, h, w), mask)
    torch.testing.assert_close(
        masked[0, :, :, :3], PositionEmbeddingSine(f, normalize=True)(torch.zeros(1, 1, h, 3))[0]
    )


# ----------------------------------------------------------------------------- decoder structure
def _decoder(conv_dim=32, mask_dim=16, layers=2, channels=(8, 16, 24, 32)) -> MSDeformAttnPixelDecoder:
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = conv_dim
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = mask_dim
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = layers
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 64
    input_shape = {f"p{i + 2}": ShapeSpec(channels=c, stride=4 * 2**i) for i, c in enumerate(channels)}
    input_shape["extra"] = ShapeSpec(channels=3, stride=64)  # not in IN_FEATURES: must be ignored
    return build_pixel_decoder(cfg, input_shape)


def test_state_dict_names_are_mask2former_names():
    dec = _decoder(layers=2)
    assert PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder") is MSDeformAttnPixelDecoder
    expected = {"transformer.level_embed", "mask_features.weight", "mask_features.bias"}
    expected |= {f"input_proj.{i}.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    for n in range(2):
        pre = f"transformer.encoder.layers.{n}."
        for mod in (
            "self_attn.sampling_offsets",
            "self_attn.attention_weights",
            "self_attn.value_proj",
            "self_attn.output_proj",
            "norm1",
            "linear1",
            "linear2",
            "norm2",
        ):
            expected |= {pre + mod + ".weight", pre + mod + ".bias"}
    for mod in ("adapter_1", "layer_1"):
        expected |= {f"{mod}.weight", f"{mod}.norm.weight", f"{mod}.norm.bias"}
    assert set(dec.state_dict()) == expected
    # input_proj[0] reads the coarsest level (p5, 32 channels), as in Mask2Former.
    assert [p[0].in_channels for p in dec.input_proj] == [32, 24, 16]
    assert dec.adapter_1.in_channels == 8 and dec.maskformer_num_feature_levels == 3
    layer = dec.transformer.encoder.layers[1]
    assert (layer.self_attn.n_heads, layer.self_attn.n_points, layer.self_attn.n_levels) == (4, 4, 3)
    assert layer.linear1.out_features == 64 and dec.in_features == ["p2", "p3", "p4", "p5"]


def test_forward_from_cfg_nonsquare_batch_and_gradients():
    torch.manual_seed(0)
    dec = _decoder()
    dec.train()
    # Deformable DETR zero-initialises the offset and attention-weight projections, so at init
    # the query (and with it level_embed) cannot influence the output; nudge them as one
    # optimizer step would, so that every parameter must receive a non-zero gradient.
    with torch.no_grad():
        for layer in dec.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.05)
            layer.self_attn.attention_weights.weight.normal_(0, 0.05)
    sizes = {"p2": (18, 25), "p3": (9, 13), "p4": (5, 7), "p5": (3, 4)}  # a 70x100 image, rounded up
    chans = {"p2": 8, "p3": 16, "p4": 24, "p5": 32}
    feats = {k: torch.randn(2, chans[k], *hw) for k, hw in sizes.items()}
    mask_features, enc_out, ms = dec.forward_features(feats)
    assert mask_features.shape == (2, 16, 18, 25)
    assert [tuple(x.shape) for x in ms] == [(2, 32, 3, 4), (2, 32, 5, 7), (2, 32, 9, 13)]
    assert enc_out is ms[0]

    loss = (mask_features * torch.randn_like(mask_features)).sum() + sum(
        (x * torch.randn_like(x)).sum() for x in ms
    )
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    # Each image is decoded independently of the other one in the batch.
    dec.eval()
    with torch.no_grad():
        full = dec.forward_features(feats)
        single = dec.forward_features({k: v[1:] for k, v in feats.items()})
    torch.testing.assert_close(full[0][1:], single[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(full[2], single[2]):
        torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-5)

    # Under autocast the decoder still computes (and returns) float32.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp = dec.forward_features(feats)
    assert amp[0].dtype == torch.float32
    torch.testing.assert_close(amp[0], full[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Hugging Face parity
@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    model = tiny_hf_mask2former(
        hidden=32,
        mask_hidden=16,
        encoder_feedforward=48,
        heads=2,
        queries=5,
        classes=3,
        decoder_layers=2,
        encoder_layers=2,
        universal=False,
    )
    # Random weights everywhere in the decoder, so that non-uniform attention, real offsets and
    # non-trivial norms are exercised (HF's init zeroes the attention and offset weights).
    with torch.no_grad():
        for p in model.pixel_level_module.decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def test_hf_pixel_decoder_parity(hf_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 96)  # non-square, batch 2
    with torch.no_grad():
        hf_out = hf_model.pixel_level_module(pixel_values, output_hidden_states=True)
    backbone = hf_out.encoder_hidden_states
    assert [f.shape[-2:] for f in backbone] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    feats = {f"p{i + 2}": f for i, f in enumerate(backbone)}

    ours = MSDeformAttnPixelDecoder(
        {f"p{i + 2}": ShapeSpec(channels=f.shape[1], stride=4 * 2**i) for i, f in enumerate(backbone)},
        transformer_dropout=0.0,
        transformer_nheads=2,
        transformer_dim_feedforward=48,
        transformer_enc_layers=2,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["p3", "p4", "p5"],
        common_stride=4,
    ).eval()
    converted = convert_hf_mask2former_pixel_decoder(hf_model.state_dict())
    assert set(converted) == set(ours.state_dict())
    ours.load_state_dict(converted, strict=True)

    with torch.no_grad():
        mask_features, enc_out, ms = ours.forward_features(feats)
    torch.testing.assert_close(mask_features, hf_out.decoder_last_hidden_state, rtol=0, atol=1e-4)
    assert len(ms) == len(hf_out.decoder_hidden_states) == 3
    for a, b in zip(ms, hf_out.decoder_hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(enc_out, hf_out.decoder_hidden_states[0], rtol=0, atol=1e-4)
    # The comparison is not vacuous: outputs vary across pixels and images.
    assert mask_features.std() > 0.1 and (mask_features[0] - mask_features[1]).abs().max() > 0.1


def test_hf_converter_prefixes_and_errors(hf_model):
    sd = hf_model.state_dict()
    base = convert_hf_mask2former_pixel_decoder(sd)
    # Mask2FormerForUniversalSegmentation nests the model under "model.".
    nested = convert_hf_mask2former_pixel_decoder({"model." + k: v for k, v in sd.items()})
    assert nested.keys() == base.keys()
    # The bare decoder's own state dict, and an output prefix for a whole-model checkpoint.
    bare = convert_hf_mask2former_pixel_decoder(
        hf_model.pixel_level_module.decoder.state_dict(), out_prefix="sem_seg_head.pixel_decoder."
    )
    assert bare.keys() == {"sem_seg_head.pixel_decoder." + k for k in base}
    assert torch.equal(
        bare["sem_seg_head.pixel_decoder.adapter_1.norm.weight"], base["adapter_1.norm.weight"]
    )
    assert torch.equal(base["adapter_1.weight"], sd["pixel_level_module.decoder.adapter_1.0.weight"])
    assert torch.equal(
        base["transformer.encoder.layers.1.norm2.bias"],
        sd["pixel_level_module.decoder.encoder.layers.1.final_layer_norm.bias"],
    )
    with pytest.raises(KeyError, match="something_new"):
        convert_hf_mask2former_pixel_decoder(
            {"pixel_level_module.decoder.something_new.weight": torch.zeros(1)}
        )


def test_position_embedding_matches_hf():
    mod = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    x = torch.zeros(2, 7, 5, 9)
    hf = mod.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)(
        x.shape, x.device, x.dtype
    )
    torch.testing.assert_close(PositionEmbeddingSine(16, normalize=True)(x), hf, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    dec = _decoder().eval()
    sizes = {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3)}
    chans = {"p2": 8, "p3": 16, "p4": 24, "p5": 32}
    feats = {k: torch.randn(2, chans[k], *hw) for k, hw in sizes.items()}
    # TF32 convolutions/matmuls would dominate the difference; compare true float32.
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            cpu = dec.forward_features(feats)
            gpu = dec.cuda().forward_features({k: v.cuda() for k, v in feats.items()})
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(gpu[2], cpu[2]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
