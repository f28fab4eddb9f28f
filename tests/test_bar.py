"""Boundary-Aware Refinement (FlowSeg §3.4 eq. 6-7, A.1): known-answer and invariance tests."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from flowseg.config import add_flowseg_config
from flowseg.modeling.refiner import BoundaryAwareRefiner, boundary_map, build_refiner
from flowseg.modeling.registry import REFINER_REGISTRY
from torch import nn


def _refiner(epsilon: float = 0.1, alpha: float = 0.1, seed: int = 0) -> BoundaryAwareRefiner:
    torch.manual_seed(seed)
    return BoundaryAwareRefiner(mask_dim=8, epsilon=epsilon, compress_dim=4, hidden_dim=6, alpha_init=alpha)


def _square_logits(size: int = 12, lo: int = 3, hi: int = 9, value: float = 20.0) -> torch.Tensor:
    m = torch.full((size, size), -value)
    m[lo:hi, lo:hi] = value
    return m


def _by_hand(refiner: BoundaryAwareRefiner, m_raw: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Eq. 7 literally: tanh(f_refine([M_raw || f_comp(F)])) * alpha, one mask [H,W], feats [C,H,W]."""
    x = torch.cat([m_raw[None, None], refiner.f_comp(feats[None])], dim=1)
    return torch.tanh(refiner.f_refine(x))[0, 0] * refiner.alpha


def test_boundary_map_binary_square_is_two_pixel_ring():
    # 6x6 square (rows/cols 3..8) in a 12x12 map: the 3x3 morphological gradient is 1 exactly on
    # the pixels whose 3x3 window holds both 0 and 1 = inner ring (3..8) and outer ring (2..9).
    prob = torch.zeros(12, 12)
    prob[3:9, 3:9] = 1.0
    expected = np.zeros((12, 12), dtype=np.float32)
    expected[2:10, 2:10] = 1  # outer ring and everything inside it ...
    expected[4:8, 4:8] = 0  # ... minus the interior at chebyshev distance >= 2 from the edge ...
    expected_rows = [
        "000000000000",
        "000000000000",
        "001111111100",
        "001111111100",
        "001100001100",
        "001100001100",
        "001100001100",
        "001100001100",
        "001111111100",
        "001111111100",
        "000000000000",
        "000000000000",
    ]
    hand = np.array([[int(c) for c in r] for r in expected_rows], dtype=np.float32)
    np.testing.assert_array_equal(expected, hand)
    b = boundary_map(prob, 0.1)
    assert b.dtype == prob.dtype and b.shape == prob.shape
    np.testing.assert_array_equal(b.numpy(), hand)
    assert int(b.sum()) == 8 * 8 - 4 * 4 == 48
    # batched shapes work the same way
    batched = boundary_map(prob[None, None].expand(2, 3, 12, 12), 0.1)
    np.testing.assert_array_equal(batched[1, 2].numpy(), hand)


def test_boundary_map_soft_ramp_threshold_is_strict():
    # A ramp along x (constant along y): the gradient at column j is p[j+1] - p[j-1] inside,
    # p[1] - p[0] at column 0 and p[-1] - p[-2] at the last column (pooling pads with -inf).
    # Values are multiples of 1/16, exact in float32, so ties are real ties.
    p = torch.tensor([0, 0, 1, 2, 4, 7, 8, 8, 10, 16], dtype=torch.float32) / 16
    prob = p.expand(3, 10).contiguous()
    grads = [0, 1, 2, 3, 5, 4, 1, 2, 8, 6]  # in 1/16, by hand
    for eps16 in (1, 2, 3, 5, 8):
        expected = np.array([float(g > eps16) for g in grads], dtype=np.float32)
        got = boundary_map(prob, eps16 / 16)
        np.testing.assert_array_equal(got.numpy(), np.broadcast_to(expected, (3, 10)), err_msg=str(eps16))
    # eps = 2/16: columns with gradient exactly 2/16 (2 and 7) are excluded (strict '>').
    np.testing.assert_array_equal(boundary_map(prob, 2 / 16)[0].numpy(), [0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
    # the paper's eps = 0.1 (= 1.6/16): the flat start (0) and the small step at column 6 (1/16) stay out
    np.testing.assert_array_equal(boundary_map(prob, 0.1)[0].numpy(), [0, 0, 1, 1, 1, 1, 0, 1, 1, 1])
    # a constant map has no boundary whatever the threshold below 1
    assert boundary_map(torch.full((5, 5), 0.5), 0.0).sum() == 0


def test_outside_boundary_bit_identical_and_inside_equals_eq7():
    refiner = _refiner(alpha=50.0)  # large alpha: any leak outside B would show
    with torch.no_grad():
        for p in refiner.parameters():
            p.normal_(0, 2.0)
        refiner.alpha.fill_(50.0)
    torch.manual_seed(1)
    b, q, h, w = 2, 3, 12, 12
    logits = torch.randn(b, q, h, w) * 8
    logits[0, 0] = _square_logits()
    logits[1, 2, :, :6] = -1e4  # saturated region: confident, never boundary
    logits[1, 2, :, 6:] = 1e4
    logits[1, 2, :, 5:7] = float("-inf")  # extreme values stay untouched outside B
    feats = torch.randn(b, 8, h, w)
    with torch.no_grad():
        out = refiner(logits, feats)
        boundary = boundary_map(logits.sigmoid(), 0.1) > 0
    assert out.shape == logits.shape
    assert boundary.any() and (~boundary).any()
    outside = ~boundary
    assert torch.equal(out[outside], logits[outside])  # bit-identical, not just close
    # square map: exactly the 48-pixel two-pixel ring is refined
    assert int(boundary[0, 0].sum()) == 48
    with torch.no_grad():
        for bi in range(b):
            for qi in range(q):
                delta = _by_hand(refiner, logits[bi, qi], feats[bi])
                sel = boundary[bi, qi]
                if not torch.isfinite(logits[bi, qi][sel]).all():
                    continue
                expected = logits[bi, qi][sel] + delta[sel]
                torch.testing.assert_close(out[bi, qi][sel], expected, rtol=1e-5, atol=1e-4)
    # the refinement changed the boundary pixels of the square (large alpha)
    assert not torch.equal(out[0, 0][boundary[0, 0]], logits[0, 0][boundary[0, 0]])


def test_by_hand_small_weights_tight_tolerance():
    refiner = _refiner(alpha=0.7, seed=3)
    torch.manual_seed(4)
    logits = torch.randn(1, 2, 9, 11)
    feats = torch.randn(1, 8, 9, 11)
    with torch.no_grad():
        out = refiner(logits, feats)
        bmap = boundary_map(logits.sigmoid(), 0.1)
        for qi in range(2):
            expected = logits[0, qi] + _by_hand(refiner, logits[0, qi], feats[0]) * bmap[0, qi]
            torch.testing.assert_close(out[0, qi], expected, rtol=1e-6, atol=1e-6)


def test_epsilon_one_is_identity():
    # Table 8's "no BAR" row: a probability gradient never exceeds 1.
    refiner = _refiner(epsilon=1.0, alpha=100.0)
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, 10) * 10
    logits[0, 0] = _square_logits(10, 2, 7, 50.0)
    feats = torch.randn(2, 8, 10, 10)
    out = refiner(logits, feats)
    assert torch.equal(out, logits)
    sel = refiner.refine_selected(logits[0], feats, torch.zeros(4, dtype=torch.long))
    assert torch.equal(sel, logits[0])


def test_subset_and_selected_match_full_forward():
    refiner = _refiner(alpha=2.0)
    torch.manual_seed(5)
    logits = torch.randn(2, 5, 8, 8) * 4
    feats = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        full = refiner(logits, feats)
        idx = torch.tensor([4, 1])
        sub = refiner(logits[:, idx], feats)  # a gathered subset of queries
        torch.testing.assert_close(sub, full[:, idx], rtol=1e-6, atol=1e-6)
        one = refiner(logits[:, 2:3], feats)  # Q = 1 (the selected referring mask)
        torch.testing.assert_close(one, full[:, 2:3], rtol=1e-6, atol=1e-6)
        b_idx = torch.tensor([1, 0, 1])
        q_idx = torch.tensor([0, 3, 4])
        sel = refiner.refine_selected(logits[b_idx, q_idx], feats, b_idx)
        torch.testing.assert_close(sel, full[b_idx, q_idx], rtol=1e-6, atol=1e-6)
        empty = refiner(logits[:, :0], feats)
        assert empty.shape == (2, 0, 8, 8)
        assert refiner.refine_selected(logits[0, :0], feats, b_idx[:0]).shape == (0, 8, 8)
        # batch_idx=None: all masks from image 0
        torch.testing.assert_close(refiner.refine_selected(logits[0], feats), full[0], rtol=1e-6, atol=1e-6)


def test_f_comp_runs_once_per_image_not_per_query():
    refiner = _refiner()
    calls = []
    refiner.f_comp.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    refiner(torch.randn(2, 7, 6, 6), torch.randn(2, 8, 6, 6))
    assert calls == [(2, 8, 6, 6)]  # one call over the 2 images, not 2 * 7 query copies


def test_gradients_reach_all_parameters():
    refiner = _refiner()
    logits = _square_logits(12, 3, 9, 3.0)[None, None].repeat(1, 2, 1, 1).requires_grad_(True)
    feats = torch.randn(1, 8, 12, 12, requires_grad=True)
    refiner(logits, feats).square().sum().backward()
    for name, p in refiner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert logits.grad is not None and feats.grad is not None and feats.grad.abs().sum() > 0
    # refine_selected path as well
    refiner.zero_grad()
    b_idx = torch.zeros(2, dtype=torch.long)
    refiner.refine_selected(logits[0].detach(), feats.detach(), b_idx).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.parameters())
    # no matched queries: the empty result is still connected to every parameter (DDP)
    refiner.zero_grad(set_to_none=True)
    empty = refiner.refine_selected(logits[0, :0].detach(), feats.detach(), b_idx[:0])
    assert empty.shape == (0, 12, 12)
    (empty.sum() * 0.0).backward()
    assert all(p.grad is not None for p in refiner.parameters())


def test_module_conversion_and_state_dict_layout():
    refiner = _refiner().double()  # nn.Module._apply must stay intact
    assert refiner.alpha.dtype == torch.float64
    keys = set(refiner.state_dict())
    assert keys == {
        "alpha",
        "f_comp.weight",
        "f_comp.bias",
        "f_refine.0.weight",
        "f_refine.0.bias",
        "f_refine.2.weight",
        "f_refine.2.bias",
    }
    assert refiner.f_refine[0].weight.shape == (6, 1 + 4, 3, 3)


def test_build_from_config_and_parameter_count():
    cfg = add_flowseg_config(get_cfg())
    refiner = build_refiner(cfg)
    assert isinstance(refiner, BoundaryAwareRefiner)
    assert REFINER_REGISTRY.get("BoundaryAwareRefiner") is BoundaryAwareRefiner
    assert refiner.epsilon == pytest.approx(0.1)
    assert refiner.f_comp.in_channels == 256 and refiner.f_comp.out_channels == 16
    assert refiner.f_refine[0].out_channels == 32
    assert refiner.alpha.item() == pytest.approx(0.1)
    n = sum(p.numel() for p in refiner.parameters())
    # f_comp 256*16+16 = 4112; conv1 17*32*9+32 = 4928; conv2 32*9+1 = 289; alpha 1
    print(f"BAR parameters (mask_dim 256): {n}")
    assert n == 4112 + 4928 + 289 + 1 == 9330
    assert isinstance(refiner.f_refine[1], nn.ReLU)
    cfg.MODEL.FLOWSEG.BAR.ENABLED = False
    assert build_refiner(cfg) is None
