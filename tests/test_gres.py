"""Several targets or none: GRES metrics (hand-computed), the multi-target / no-target selection,
FlowSeg's answers for hand-set scores, and training that learns the no-target decision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from flowseg import add_flowseg_config
from flowseg.engine.evaluation import build_evaluator
from flowseg.evaluation.gres_evaluation import GRESEvaluator, gres_metrics
from flowseg.modeling.criterion import SetCriterion
from flowseg.modeling.matcher import HungarianMatcher
from flowseg.modeling.meta_arch.gres import select_targets
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides


def _mask(h: int, w: int, *boxes) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------- metrics


def _five_samples():
    """(input, output) pairs whose counts are worked out in the test below."""
    gt_a = _mask(10, 10, (0, 2, 0, 2))  # 4 px
    pred_a = _mask(10, 10, (0, 1, 0, 2), (5, 6, 5, 7))  # 2 inside, 2 outside: I 2, U 6
    gt_b = _mask(10, 10, (0, 1, 0, 3), (5, 6, 0, 3))  # two targets, 6 px, found exactly
    gt_e = _mask(10, 10, (3, 4, 0, 5))  # 5 px, answered "no target"
    empty = np.zeros((10, 10), bool)
    return [
        ({"gt_mask": gt_a, "ann_ids": [1], "no_target": False}, {"mask": pred_a, "score": 0.9}),
        ({"gt_mask": gt_b, "ann_ids": [2, 3], "no_target": False}, {"mask": gt_b.copy(), "score": 0.8}),
        ({"gt_mask": empty, "ann_ids": [], "no_target": True}, {"mask": empty, "no_target": True}),
        ({"gt_mask": empty, "ann_ids": [], "no_target": True}, {"mask": _mask(10, 10, (9, 10, 0, 3))}),
        ({"gt_mask": gt_e, "ann_ids": [4], "no_target": False}, {"mask": empty, "no_target": True}),
    ]


def test_gres_metrics_hand_computed(tmp_path):
    ev = GRESEvaluator("gres_hand", output_dir=str(tmp_path), distributed=False)
    ev.reset()
    for inp, ref in _five_samples():
        ev.process([inp], [{"ref_seg": ref}])
    res = ev.evaluate()["gres"]
    # cIoU = (2 + 6 + 0 + 0 + 0) / (6 + 6 + 0 + 3 + 5): the wrong no-target answer adds its area
    assert res["cIoU"] == pytest.approx(100 * 8 / 20)
    # gIoU: 1/3, 1, 1 (empty answered empty), 0 (no-target answered with a mask), 0 (missed)
    assert res["gIoU"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 0 + 0) / 5)
    assert res["N-acc"] == pytest.approx(50.0)  # 1 of 2 no-target samples answered empty
    assert res["T-acc"] == pytest.approx(100 * 2 / 3)  # 2 of 3 targeted samples answered
    assert res["cIoU_single"] == pytest.approx(100 * 2 / 11)  # samples a and e
    assert res["cIoU_multi"] == pytest.approx(100.0) and res["gIoU_multi"] == pytest.approx(100.0)
    assert (res["num_samples"], res["num_no_target"], res["num_multi_target"]) == (5, 2, 1)
    assert "sweep_gIoU" not in res  # no query scores / candidates: nothing to sweep
    records = json.load(open(tmp_path / "per_expression.json"))
    assert [r["pred_no_target"] for r in records] == [False, False, True, False, True]
    assert [r["gt_no_target"] for r in records] == [False, False, True, True, False]


def test_gres_metrics_without_flags_read_emptiness_and_a_contradiction_is_named():
    gt = _mask(4, 4, (0, 2, 0, 2))
    recs = [
        {
            "intersection": 0,
            "union": 0,
            "gt_no_target": True,
            "pred_no_target": True,
            "num_targets": 0,
            "gt_area": 0,
        },
        {
            "intersection": 4,
            "union": 4,
            "gt_no_target": False,
            "pred_no_target": False,
            "num_targets": 1,
            "gt_area": 4,
        },
    ]
    res = gres_metrics(recs)
    assert res["N-acc"] == res["T-acc"] == res["gIoU"] == res["cIoU"] == 100.0
    assert math.isnan(res["cIoU_multi"])
    ev = GRESEvaluator("gres_flags", distributed=False)
    ev.reset()
    ev.process([{"gt_mask": np.zeros((4, 4), bool)}], [{"ref_seg": {"mask": np.zeros((4, 4), bool)}}])
    ev.process([{"gt_mask": gt}], [{"ref_seg": {"mask": np.zeros((4, 4), bool)}}])
    res = ev.evaluate()["gres"]
    assert res["N-acc"] == 100.0 and res["T-acc"] == 0.0  # emptiness of masks, no flags
    with pytest.raises(ValueError, match="marked no_target but its gt_mask is not empty"):
        ev.process([{"gt_mask": gt, "no_target": True}], [{"ref_seg": {"mask": gt}}])


def test_threshold_sweep_finds_the_thresholds_that_separate_the_cases(tmp_path):
    left, right, junk = _mask(8, 8, (0, 8, 0, 3)), _mask(8, 8, (0, 8, 5, 8)), _mask(8, 8, (0, 2, 3, 5))
    cands = np.stack([left, right, junk])
    ev = GRESEvaluator("gres_sweep", output_dir=str(tmp_path), distributed=False)
    ev.reset()
    # multi-target: the targets score 0.9 / 0.6, the junk query 0.1; no-target: best score 0.3
    ev.process(
        [{"gt_mask": left | right, "ann_ids": [1, 2], "no_target": False}],
        [{"ref_seg": {"mask": left, "query_scores": [0.9, 0.6, 0.1], "candidates": cands}}],
    )
    ev.process(
        [{"gt_mask": np.zeros((8, 8), bool), "ann_ids": [], "no_target": True}],
        [{"ref_seg": {"mask": junk, "query_scores": [0.2, 0.3, 0.1], "candidates": cands}}],
    )
    res = ev.evaluate()["gres"]
    # keep both targets but not the junk (0.1 < t <= 0.6), call 0.3 "no target" (0.3 < nt <= 0.9):
    # the first such pair of the grid is (0.2, 0.4)
    assert (res["sweep_score_threshold"], res["sweep_no_target_threshold"]) == (0.2, 0.4)
    assert res["sweep_gIoU"] == 100.0 and res["sweep_N-acc"] == 100.0
    assert res["gIoU"] == pytest.approx(100 * (24 / 48) / 2)  # the outputs as given: left only, junk
    table = json.load(open(tmp_path / "gres_threshold_sweep.json"))
    row = next(r for r in table if r["score_threshold"] == 0.05 and r["no_target_threshold"] == 0.05)
    # t = 0.05 keeps the junk too (I 48, U 52); nt = 0.05 answers the no-target sample with the
    # union of all three candidates (52 px)
    assert row["cIoU"] == pytest.approx(100 * 48 / (52 + 52))


def test_build_evaluator_picks_gres_for_gres_data():
    MetadataCatalog.get("gres_evaluator_type").set(evaluator_type="gres")
    cfg = add_flowseg_config(get_cfg())
    assert isinstance(build_evaluator(cfg, "gres_evaluator_type", "/tmp/unused"), GRESEvaluator)


# ------------------------------------------------------------------------------------- selection


def test_select_targets_union_best_and_no_target():
    # 4 queries, 2 conditions + no-object; rows sum to 1
    prob = torch.tensor([[0.85, 0.05, 0.10], [0.70, 0.10, 0.20], [0.10, 0.20, 0.70], [0.40, 0.30, 0.30]])
    first, second = select_targets(prob, 2, score_threshold=0.5, no_target_threshold=0.35)
    assert first.queries == [0, 1] and first.best_query == 0 and not first.no_target
    assert first.score == pytest.approx(0.85)
    assert second.no_target and second.queries == [] and second.score == pytest.approx(0.30)
    # a lower no-target threshold answers condition 1 with its best query only (0.3 < 0.5)
    (_, second) = select_targets(prob, 2, 0.5, 0.25)
    assert second.queries == [3] and not second.no_target
    with pytest.raises(ValueError, match="GRES.SCORE_THRESHOLD must be a probability"):
        select_targets(prob, 2, 1.5, 0.5)
    with pytest.raises(ValueError, match="num_conditions"):
        select_targets(prob, 3, 0.5, 0.5)


@pytest.fixture(scope="module")
def referring_model(tmp_path_factory):
    paths = make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file("configs/tiny/flowseg_refer_tiny.yaml")
    cfg.merge_from_list(tiny_llm_cfg_overrides(paths))
    cfg.merge_from_list(
        ["MODEL.FLOWSEG.GRES.SCORE_THRESHOLD", 0.5, "MODEL.FLOWSEG.GRES.NO_TARGET_THRESHOLD", 0.4]
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _hand_outputs(model, p_condition):
    """Outputs of one sample whose query probabilities of condition 0 are ``p_condition`` and whose
    queries' masks are blocks at different places of a 16x16 grid."""
    q = model.num_queries
    p = torch.full((q,), 0.01)
    p[: len(p_condition)] = torch.tensor(p_condition)
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1)[None]  # softmax = [p, 1 - p]
    masks = torch.full((1, q, 16, 16), -8.0)
    for k in range(q):
        r, c = divmod(k % 16, 4)
        masks[0, k, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 8.0
    mf = torch.zeros(1, model.sem_seg_head.predictor.mask_embed.layers[-1].out_features, 16, 16)
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    cond = {"condition_mask": torch.ones(1, 1, dtype=torch.bool)}
    return {"pred_logits": logits, "pred_masks": masks, "mask_features": mf}, cond, images


def test_model_with_hand_set_scores_answers_the_union(referring_model):
    model = referring_model
    outputs, cond, images = _hand_outputs(model, [0.9, 0.05, 0.7, 0.2])
    x = {"height": 64, "width": 64, "multi_target": True}
    with torch.no_grad():
        gres = model.referring_inference(dict(outputs), cond, [x], images)[0]["ref_seg"]
        single = model.referring_inference(dict(outputs), cond, [dict(x, multi_target=False)], images)[0]
    assert gres["queries"] == [0, 2] and gres["query"] == 0 and gres["no_target"] is False
    # the union of the two kept queries' final masks, as the single-target path computes them
    cand = single["ref_seg"]["candidates"]
    assert torch.equal(gres["mask"].cpu(), (cand[0] | cand[2]).cpu())
    assert cand[0].any() and cand[2].any() and not (cand[0] & cand[2]).any()
    assert len(gres["query_scores"]) == model.num_queries and gres["candidates"].shape == cand.shape
    # single-target samples keep propose-then-select: the best query only, no flag
    assert single["ref_seg"]["query"] == 0 and "no_target" not in single["ref_seg"]
    assert torch.equal(single["ref_seg"]["mask"], cand[0])


def test_model_with_hand_set_scores_answers_nothing(referring_model):
    outputs, cond, images = _hand_outputs(referring_model, [0.3, 0.2, 0.35])
    x = {"height": 64, "width": 64, "multi_target": True}
    with torch.no_grad():
        ref = referring_model.referring_inference(outputs, cond, [x], images)[0]["ref_seg"]
    assert ref["no_target"] is True and ref["queries"] == [] and ref["mask"].shape == (64, 64)
    assert not ref["mask"].any() and ref["score"] == pytest.approx(0.35, abs=1e-6)
    # the same scores for an ordinary RefCOCO sample still give a mask (the best query's)
    with torch.no_grad():
        plain = referring_model.referring_inference(outputs, cond, [dict(x, multi_target=False)], images)
    assert plain[0]["ref_seg"]["mask"].any() and plain[0]["ref_seg"]["query"] == 2
    # MODEL.FLOWSEG.GRES.ALL_SAMPLES: every referring sample may be answered "no target"
    referring_model.gres_all_samples = True
    try:
        with torch.no_grad():
            out = referring_model.referring_inference(outputs, cond, [dict(x, multi_target=False)], images)
        assert out[0]["ref_seg"]["no_target"] is True and not out[0]["ref_seg"]["mask"].any()
    finally:
        referring_model.gres_all_samples = False


# ------------------------------------------------------------------------------------- training


def test_training_learns_the_union_and_the_no_target_decision():
    """Free logits and masks of 8 queries for two samples, fitted with the set criterion: one
    expression with two targets (both labelled condition 0), one with none. After training the
    selection returns exactly the two targets for the first and "no target" for the second."""
    torch.manual_seed(0)
    q, s = 8, 16
    a, b = torch.zeros(s, s), torch.zeros(s, s)
    a[2:8, 2:8], b[9:15, 6:14] = 1, 1
    targets = [
        {"labels": torch.tensor([0, 0]), "masks": torch.stack([a, b])},
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, s, s)},
    ]
    logits = torch.zeros(2, q, 2, requires_grad=True)
    masks = (0.1 * torch.randn(2, q, s, s)).requires_grad_()
    crit = SetCriterion(
        None,
        HungarianMatcher(2.0, 5.0, 5.0, num_points=256),
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=256,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    opt = torch.optim.Adam([logits, masks], lr=0.1)
    first = None
    for _ in range(150):
        losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
        loss = sum(crit.weight_dict[k] * v for k, v in losses.items())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    with torch.no_grad():
        prob = logits.softmax(-1)
        (multi,) = select_targets(prob[0], 1, 0.5, 0.5)
        (empty,) = select_targets(prob[1], 1, 0.5, 0.5)
    matched = sorted(crit.last_indices[0][0].tolist())
    assert sorted(multi.queries) == matched and len(matched) == 2
    union = (masks[0, multi.queries] > 0).any(0)
    assert torch.equal(union, (a + b) > 0)
    assert empty.no_target


def test_flowseg_trains_on_a_multi_target_and_a_no_target_sample(referring_model):
    """The whole referring model takes a batch with two targets of one condition and a sample
    without any target (every query supervised as "no object"): finite losses, gradients."""
    from detectron2.structures import BitMasks, Instances

    model = referring_model
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 4:20, 4:20], masks[1, 40:60, 30:50] = True, True
    multi = Instances((64, 64), gt_masks=BitMasks(masks), gt_classes=torch.tensor([0, 0]))
    empty = Instances((64, 64), gt_masks=BitMasks(masks[:0]), gt_classes=torch.zeros(0, dtype=torch.long))
    batch = [
        {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=g), "instances": inst}
        for inst in (multi, empty)
    ]
    batch[0].update(expression="all small squares", task="referring")
    batch[1].update(expression="the purple hexagon", task="referring")
    model.train()
    try:
        losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert len(model.criterion.last_indices[0][0]) == 2 and len(model.criterion.last_indices[1][0]) == 0
        assert model.refiner.alpha.grad is not None
    finally:
        model.zero_grad()
        model.eval()
