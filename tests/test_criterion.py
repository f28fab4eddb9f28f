"""Hungarian matcher and set criterion (FlowSeg §3.5): known answers, dynamic K, BAR, deep supervision."""

from __future__ import annotations

import math
from typing import Dict, List

import flowseg.modeling.criterion as criterion_mod
import pytest
import torch
from flowseg.modeling.criterion import (
    SetCriterion,
    build_criterion,
    build_weight_dict,
    dice_loss,
    sigmoid_ce_loss,
)
from flowseg.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
from torch import Tensor, nn

LN3 = math.log(3.0)


def _criterion(num_classes=None, num_points: int = 64, **kw) -> SetCriterion:
    matcher = kw.pop("matcher", None) or HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points)
    weight_dict = kw.pop("weight_dict", {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=kw.pop("eos_coef", 0.1),
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        **kw,
    )


def _pixel_centres(h: int, w: int) -> Tensor:
    """[1, h*w, 2] (x, y) normalised coordinates of the pixel centres of an h x w grid."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]


@pytest.fixture
def exact_points(monkeypatch):
    """Replace the random uncertainty sampling by the pixel centres, so point losses are exact."""
    calls: List[Dict] = []

    def fake(coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio):
        calls.append(
            dict(num_points=num_points, oversample=oversample_ratio, importance=importance_sample_ratio)
        )
        n, _, h, w = coarse_logits.shape
        return _pixel_centres(h, w).expand(n, -1, -1).to(coarse_logits.device)

    monkeypatch.setattr(criterion_mod, "get_uncertain_point_coords_with_randomness", fake)
    return calls


def _two_targets(size: int = 16) -> Dict[str, Tensor]:
    a = torch.zeros(size, size)
    a[:, : size // 2] = 1  # left half
    b = torch.zeros(size, size)
    b[: size // 2, size // 2 :] = 1  # top-right quadrant
    return {"labels": torch.tensor([1, 0]), "masks": torch.stack([a, b])}


# ---------------------------------------------------------------------------------------- matcher
def test_matcher_recovers_permutation_of_masks():
    torch.manual_seed(0)
    tgt = _two_targets(16)  # targets at 16x16, predictions at 8x8: point sampling bridges the sizes
    small = torch.nn.functional.interpolate(tgt["masks"][:, None], size=(8, 8), mode="nearest")[:, 0]
    pred_masks = torch.stack([small[1] * 20 - 10, torch.full((8, 8), -10.0), small[0] * 20 - 10])[None]
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": pred_masks}
    ((rows, cols),) = HungarianMatcher(2.0, 5.0, 5.0, num_points=128)(outputs, [tgt])
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]


def test_matcher_follows_class_probabilities_not_greedy():
    # Greedy (best query per target) would give t0<-q0 (0.5), t1<-q1 (0.05): total 0.55.
    # The optimal assignment is t0<-q1 (0.4), t1<-q0 (0.45): total 0.85.
    probs = torch.tensor([[0.5, 0.45, 0.05], [0.4, 0.05, 0.55], [0.01, 0.01, 0.98]])
    outputs = {"pred_logits": probs.log()[None], "pred_masks": torch.randn(1, 3, 4, 4)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 4, 4)}]
    ((rows, cols),) = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0)(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_matcher_zero_targets_gives_empty_indices():
    outputs = {"pred_logits": torch.randn(2, 3, 3), "pred_masks": torch.randn(2, 3, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8)},
    ]
    indices = HungarianMatcher(2.0, 5.0, 5.0, num_points=16)(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 1] and [len(c) for _, c in indices] == [0, 1]
    assert indices[0][0].dtype == torch.int64


def test_batch_costs_known_values():
    inputs = torch.tensor([[0.0, 0.0], [LN3, -LN3]])  # sigmoid: [.5, .5] and [.75, .25]
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    dice = batch_dice_cost(inputs, targets)
    # q0,t0: 1-(2*.5+1)/(1+1+1) = 1/3; q1,t0: 1-(1.5+1)/(1+1+1) = 1/6; q0,t1: 1-(2+1)/(1+2+1) = 1/4
    # q1,t1: 1-(2+1)/(1+2+1) = 1/4
    torch.testing.assert_close(dice, torch.tensor([[1 / 3, 1 / 4], [1 / 6, 1 / 4]]))
    bce = batch_sigmoid_ce_cost(inputs, targets)
    ln2, l75, l25 = math.log(2), -math.log(0.75), -math.log(0.25)
    expected = torch.tensor([[ln2, ln2], [(l75 + l75) / 2, (l75 + l25) / 2]])
    torch.testing.assert_close(bce, expected)


# ---------------------------------------------------------------------------------------- mask losses
def test_dice_and_bce_losses_hand_computed():
    inputs = torch.tensor([[0.0, 0.0], [LN3, -LN3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # dice: mask0 1/3, mask1 1-(1.5+1)/(2+1) = 1/6 -> (1/3+1/6)/2
    torch.testing.assert_close(dice_loss(inputs, targets, num_masks=2.0), torch.tensor(0.25))
    # bce: mask0 ln2 at both points, mask1 -ln(.75) at both points
    expected = (math.log(2) - math.log(0.75)) / 2
    torch.testing.assert_close(sigmoid_ce_loss(inputs, targets, num_masks=2.0), torch.tensor(expected))


def test_loss_masks_exact_on_pixel_centres(exact_points):
    crit = _criterion(num_points=4)
    pred = torch.tensor([[LN3, -LN3], [-LN3, -LN3]])  # p = [.75, .25, .25, .25]
    pred_masks = torch.stack([torch.zeros(2, 2), pred])[None].requires_grad_()
    tgt = torch.zeros(4, 4)
    tgt[:2, :2] = 1  # 4x4 target whose 2x2 pixel-centre samples are exactly [1, 0, 0, 0]
    targets = [{"labels": torch.tensor([0]), "masks": tgt[None]}]
    losses = crit.loss_masks(
        {"pred_masks": pred_masks}, targets, [(torch.tensor([1]), torch.tensor([0]))], 1.0
    )
    torch.testing.assert_close(losses["loss_mask"], torch.tensor(-math.log(0.75)))
    # dice: 1 - (2*.75 + 1) / (1.5 + 1 + 1) = 2/7
    torch.testing.assert_close(losses["loss_dice"], torch.tensor(2 / 7))
    assert exact_points[-1] == dict(num_points=4, oversample=3.0, importance=0.75)
    # num_masks normalises: twice the masks, half the loss
    half = crit.loss_masks({"pred_masks": pred_masks}, targets, [(torch.tensor([1]), torch.tensor([0]))], 2.0)
    torch.testing.assert_close(half["loss_dice"], torch.tensor(1 / 7))


# ---------------------------------------------------------------------------------------- class loss
def test_ce_dynamic_k_with_padded_logits_hand_computed():
    crit = _criterion(num_classes=None)
    # K = 3 conditions in this batch; image 1 has only 2, its column 2 is padding (-1e4).
    logits = torch.tensor(
        [
            [[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 3.0, 0.0], [0.2, 0.1, 0.0, 1.0]],
            [[0.5, 2.0, -1e4, 0.0], [1.0, 1.0, -1e4, 1.0], [0.0, 0.0, -1e4, 2.0]],
        ]
    )
    targets = [{"labels": torch.tensor([2])}, {"labels": torch.tensor([1])}]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    loss = crit.loss_labels({"pred_logits": logits}, targets, indices, 1.0)["loss_ce"]
    assert torch.isfinite(loss)

    target_classes = [[3, 2, 3], [1, 3, 3]]
    weights = [1.0, 1.0, 1.0, 0.1]
    num = den = 0.0
    for b in range(2):
        for q in range(3):
            row = logits[b, q].tolist()
            y = target_classes[b][q]
            lse = math.log(sum(math.exp(v) for v in row))
            num += weights[y] * (lse - row[y])
            den += weights[y]
    torch.testing.assert_close(loss, torch.tensor(num / den))

    # Same criterion, another batch with a different K (2 conditions): weight vector rebuilt.
    loss2 = crit.loss_labels(
        {"pred_logits": torch.zeros(1, 2, 3)},
        [{"labels": torch.tensor([0])}],
        [(torch.tensor([0]), torch.tensor([0]))],
        1.0,
    )["loss_ce"]
    torch.testing.assert_close(loss2, torch.tensor(math.log(3.0)))  # uniform logits: ln(K+1)
    # Low precision logits with -1e4 padding are upcast: still finite.
    loss_bf16 = crit.loss_labels({"pred_logits": logits.bfloat16()}, targets, indices, 1.0)["loss_ce"]
    assert torch.isfinite(loss_bf16)


def test_fixed_num_classes_checks_width_and_labels():
    crit = _criterion(num_classes=4)
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": torch.zeros(1, 3, 8, 8)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}]
    with pytest.raises(ValueError, match="num_classes=4"):
        crit(outputs, targets)
    bad = [{"labels": torch.tensor([3]), "masks": torch.ones(1, 8, 8)}]  # 3 == K: the no-object column
    with pytest.raises(ValueError, match="labels"):
        _criterion(num_classes=None)(outputs, bad)


# ---------------------------------------------------------------------------------------- forward
def test_empty_targets_zero_mask_loss_connected_and_ce_to_no_object():
    crit = _criterion(num_classes=None)
    logits = torch.randn(2, 3, 3, requires_grad=True)
    masks = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv = nn.Conv2d(1, 1, 3, padding=1)

    def refine_fn(b: Tensor, q: Tensor) -> Tensor:
        return conv(masks[b, q][:, None])[:, 0]

    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}
    losses = crit({"pred_logits": logits, "pred_masks": masks, "refine_fn": refine_fn}, [empty, empty])
    for k in ("loss_mask", "loss_dice", "loss_mask_refined", "loss_dice_refined"):
        assert losses[k].item() == 0.0 and losses[k].requires_grad, k
    # all queries -> no-object (equal weights cancel): mean of -log softmax[..., K]
    expected = -torch.log_softmax(logits.detach(), -1)[..., -1].mean()
    torch.testing.assert_close(losses["loss_ce"], expected)
    sum(crit.weight_dict.get(k, 1.0) * v for k, v in losses.items()).backward()
    assert masks.grad is not None and torch.count_nonzero(masks.grad) == 0
    assert conv.weight.grad is not None and torch.isfinite(logits.grad).all()
    assert [len(r) for r, _ in crit.last_indices] == [0, 0]


def test_deep_supervision_keys_and_identical_aux_gives_identical_ce():
    torch.manual_seed(0)
    tgt = _two_targets(8)
    final = {
        "pred_logits": torch.randn(1, 3, 3),
        "pred_masks": torch.stack([tgt["masks"][1], torch.zeros(8, 8), tgt["masks"][0]])[None] * 20 - 10,
    }
    outputs = dict(final, aux_outputs=[dict(final), dict(final)])
    base = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    crit = _criterion(
        num_classes=2, weight_dict={**base, **{f"{k}_{i}": v for k, v in base.items() for i in (0, 1)}}
    )
    losses = crit(outputs, [tgt])
    expected = {"loss_ce", "loss_mask", "loss_dice"} | {
        f"loss_{n}_{i}" for n in ("ce", "mask", "dice") for i in (0, 1)
    }
    assert set(losses) == expected
    torch.testing.assert_close(losses["loss_ce_0"], losses["loss_ce"])
    torch.testing.assert_close(losses["loss_ce_1"], losses["loss_ce"])
    assert [r.tolist() for r, _ in crit.last_indices] == [[0, 2]]
    # deep_supervision=False ignores the aux outputs
    assert set(_criterion(num_classes=2, deep_supervision=False)(outputs, [tgt])) == {
        "loss_ce",
        "loss_mask",
        "loss_dice",
    }


def test_refine_fn_losses_and_gradient(exact_points):
    torch.manual_seed(0)
    tgt = _two_targets(8)
    masks = (
        torch.stack([tgt["masks"][1], torch.zeros(8, 8), tgt["masks"][0]])[None] * 4 - 2
    ).requires_grad_()
    seen = {}

    def identity(b: Tensor, q: Tensor) -> Tensor:
        seen["idx"] = (b.tolist(), q.tolist())
        return masks[b, q]

    crit = _criterion(num_classes=2)
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": masks, "refine_fn": identity}
    losses = crit(outputs, [tgt])
    assert seen["idx"] == ([0, 0], [0, 2])  # final-layer matching, in query order
    # identity refinement on the same (pixel-centre) points reproduces the raw mask losses
    torch.testing.assert_close(losses["loss_mask_refined"], losses["loss_mask"])
    torch.testing.assert_close(losses["loss_dice_refined"], losses["loss_dice"])

    conv = nn.Conv2d(1, 1, 3, padding=1)
    outputs["refine_fn"] = lambda b, q: masks[b, q] + conv(masks[b, q][:, None])[:, 0]
    losses = crit(outputs, [tgt])
    (losses["loss_mask_refined"] + losses["loss_dice_refined"]).backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(conv.weight.grad).all()


def test_loss_goes_down_and_mask_fits():
    torch.manual_seed(0)
    h = w = 32
    target = torch.zeros(h, w)
    target[6:24, 8:28] = 1
    targets = [{"labels": torch.tensor([0]), "masks": target[None]}]
    mask_logits = (0.1 * torch.randn(1, 3, h, w)).requires_grad_()
    class_logits = torch.zeros(1, 3, 2, requires_grad=True)
    crit = _criterion(num_classes=1, num_points=h * w)
    # Importance sampling keeps ~75% of the training points on the (soft, bilinear) boundary, which
    # puts a floor under the training loss; judge the fit also on uniformly random points.
    uniform = SetCriterion(1, crit.matcher, crit.weight_dict, 0.1, ["labels", "masks"], 4096, 1.0, 0.0)
    opt = torch.optim.Adam([mask_logits, class_logits], lr=0.2)

    def total(c: SetCriterion) -> Tensor:
        losses = c({"pred_logits": class_logits, "pred_masks": mask_logits}, targets)
        return sum(crit.weight_dict[k] * v for k, v in losses.items())

    first_train, first_uniform = total(crit).item(), total(uniform).item()
    for _ in range(50):
        opt.zero_grad()
        loss = total(crit)
        loss.backward()
        opt.step()
    last_train, last_uniform = total(crit).item(), total(uniform).item()
    assert last_train < first_train / 4, (first_train, last_train)
    assert last_uniform < first_uniform / 10, (first_uniform, last_uniform)
    (q,), _ = crit.last_indices[0]
    pred = mask_logits[0, q].detach() > 0
    iou = (pred & target.bool()).sum() / (pred | target.bool()).sum()
    assert iou > 0.9
    assert class_logits[0, q].argmax().item() == 0  # matched query -> the class
    others = [i for i in range(3) if i != q]
    assert (class_logits[0, others].argmax(-1) == 1).all()  # unmatched -> no-object


# ---------------------------------------------------------------------------------------- config
def test_build_from_config():
    from detectron2.config import get_cfg
    from flowseg.config import add_flowseg_config

    cfg = add_flowseg_config(get_cfg())
    wd = build_weight_dict(cfg)
    L = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    assert wd["loss_ce"] == 2.0 and wd["loss_mask"] == 5.0 and wd["loss_dice"] == 5.0
    assert wd["loss_mask_refined"] == 5.0 and wd["loss_dice_refined"] == 5.0
    assert wd[f"loss_ce_{L - 1}"] == 2.0 and wd[f"loss_dice_{L - 1}"] == 5.0 and f"loss_ce_{L}" not in wd
    assert len(wd) == 3 * (L + 1) + 2

    crit = build_criterion(cfg)
    assert crit.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert crit.empty_weight[-1].item() == pytest.approx(0.1) and crit.num_points == 12544
    assert crit.matcher.cost_class == 2.0 and crit.matcher.num_points == 12544
    cfg.MODEL.LLM.CONFIG = "tiny_llm.json"  # generic mode with an LLM: condition logits, dynamic K
    assert build_criterion(cfg).num_classes is None
    cfg.MODEL.LLM.CONFIG = ""
    cfg.MODEL.FLOWSEG.MODE = "referring"
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    cfg.MODEL.FLOWSEG.BAR.ENABLED = False
    crit = build_criterion(cfg)
    assert crit.num_classes is None and not crit.deep_supervision
    assert set(crit.weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    tgt = {k: v.to(dev) for k, v in _two_targets(32).items()}
    masks = torch.randn(2, 5, 16, 16, device=dev, requires_grad=True)
    logits = torch.randn(2, 5, 4, device=dev)
    logits[1, :, 2] = -1e4  # padded condition column of image 1
    logits.requires_grad_()
    conv = nn.Conv2d(1, 1, 3, padding=1).to(dev)
    seen = {}

    def refine_fn(b: Tensor, q: Tensor) -> Tensor:
        seen["device"] = (b.device.type, q.device.type)
        return conv(masks[b, q][:, None])[:, 0]

    empty = {
        "labels": torch.zeros(0, dtype=torch.int64, device=dev),
        "masks": torch.zeros(0, 32, 32, device=dev),
    }
    outputs = {"pred_logits": logits, "pred_masks": masks, "refine_fn": refine_fn}
    outputs["aux_outputs"] = [{"pred_logits": logits, "pred_masks": masks}]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = _criterion(num_classes=None, num_points=256)(outputs, [tgt, empty])
    assert seen["device"] == ("cuda", "cuda")
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(masks.grad).all() and conv.weight.grad.abs().sum() > 0


def test_segment_class_loss_pools_logits_over_each_mask():
    # two 8x8 segments on a 16x16 canvas (4x4 logits at 1/4 scale: a 2x2 block each)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, :8] = 1
    masks[1, 8:, :8] = 1
    targets = [{"labels": torch.tensor([2, 0]), "masks": masks}]
    uniform = torch.zeros(1, 3, 4, 4, requires_grad=True)
    torch.testing.assert_close(criterion_mod.segment_class_loss(uniform, targets), torch.tensor(LN3))
    # segment 0: half its cells say class 2 with logit 4, half say nothing -> pooled logits (0, 0, 2);
    # segment 1: every cell says class 0 with logit 3 -> (3, 0, 0); cells outside both are ignored
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 2, 0, :2] = 4.0
    logits[0, 0, 2:, :2] = 3.0
    logits[0, 1, :, 2:] = 50.0  # no segment there
    expected = 0.5 * (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.exp(3) / (math.exp(3) + 2)))
    torch.testing.assert_close(criterion_mod.segment_class_loss(logits, targets), torch.tensor(expected))
    # no segments at all: a connected zero
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}]
    loss = criterion_mod.segment_class_loss(uniform, empty)
    loss.backward()
    assert loss.item() == 0.0 and uniform.grad is not None


def test_segment_class_loss_reported_and_weighted_from_config():
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    cfg = add_flowseg_config(get_cfg())
    assert "loss_segment_aux" not in build_weight_dict(cfg)  # off by default
    cfg.MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT = 2.0
    assert build_weight_dict(cfg)["loss_segment_aux"] == 2.0
    crit = _criterion(num_classes=3)
    outputs = {
        "pred_logits": torch.zeros(1, 2, 4),
        "pred_masks": torch.zeros(1, 2, 16, 16),
        "aux_class_logits": torch.zeros(1, 3, 4, 4),
    }
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 16, 16)}]
    losses = crit(outputs, targets)
    torch.testing.assert_close(losses["loss_segment_aux"], torch.tensor(LN3))
    assert "loss_segment_aux" not in crit(
        {k: v for k, v in outputs.items() if k != "aux_class_logits"}, targets
    )
