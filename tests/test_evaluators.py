"""Referring / reasoning evaluators and their pure metric functions, against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch
from flowseg.evaluation import ReasoningEvaluator, ReferringEvaluator
from flowseg.evaluation import metrics as M


def grid(*rows: str) -> np.ndarray:
    """Binary mask from rows of '0'/'1'."""
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)


# Three 4x4 samples with hand-counted I / U and IoUs exactly on the Pr thresholds:
#   A: I=2, U=4  -> 0.5      B: I=4, U=5 -> 0.8      C: I=6, U=10 -> 0.6
GT_A, PRED_A = grid("1100", "0000", "0000", "0000"), grid("1111", "0000", "0000", "0000")
GT_B, PRED_B = grid("1100", "1100", "0000", "0000"), grid("1100", "1100", "1000", "0000")
GT_C, PRED_C = grid("1100", "1100", "1100", "0000"), grid("1101", "1101", "1101", "0001")
EMPTY = np.zeros((4, 4), dtype=bool)


def _inp(i, gt, **kw):
    d = {"image_id": 100 + i, "ref_id": 10 + i, "sentence_id": i, "expression": f"thing {i}"}
    d.update(task="referring", gt_mask=gt, **kw)
    return d


def _out(pred, score=0.5, candidates=None):
    ref = {"mask": torch.as_tensor(pred), "score": score}
    if candidates is not None:
        ref["candidates"] = torch.as_tensor(np.stack(candidates))
    return {"ref_seg": ref}


# ---------------------------------------------------------------------- pure functions
def test_intersection_union_and_iou_by_hand():
    assert M.intersection_union(PRED_A, GT_A) == (2, 4)
    assert M.intersection_union(torch.as_tensor(PRED_B), torch.as_tensor(GT_B, dtype=torch.uint8)) == (4, 5)
    assert M.intersection_union(PRED_C, GT_C) == (6, 10)
    assert M.intersection_union(EMPTY, EMPTY) == (0, 0)
    np.testing.assert_array_equal(M.iou_from_iu([2, 4, 6, 0, 0], [4, 5, 10, 0, 3]), [0.5, 0.8, 0.6, 1.0, 0.0])
    with pytest.raises(ValueError):
        M.intersection_union(np.zeros((4, 5), bool), GT_A)


def test_ignore_pixels_left_out_of_i_and_u():
    gt = grid("1111", "1111", "0000", "0000")
    pred = grid("0000", "1111", "1111", "0000")
    assert M.intersection_union(pred, gt) == (4, 12)
    ignore = grid("1000", "0000", "1111", "0000")  # (0,0): a GT-only pixel; row 2: pred-only pixels
    assert M.intersection_union(pred, gt, ignore) == (4, 7)
    # an ignored pixel in the intersection leaves both I and U
    assert M.intersection_union(pred, gt, grid("0000", "0100", "0000", "0000")) == (3, 11)
    inter, union = M.candidates_intersection_union(np.stack([pred, gt]), gt, ignore)
    np.testing.assert_array_equal(inter, [4, 7])
    np.testing.assert_array_equal(union, [7, 7])


def test_aggregates_by_hand():
    i, u = [2, 4, 6], [4, 5, 10]
    assert M.cumulative_iou(i, u) == pytest.approx(12 / 19)
    assert M.mean_iou(i, u) == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    # empty prediction and empty GT: IoU 1.0 in gIoU, nothing added to cIoU
    assert M.cumulative_iou(i + [0], u + [0]) == pytest.approx(12 / 19)
    assert M.mean_iou(i + [0], u + [0]) == pytest.approx((0.5 + 0.8 + 0.6 + 1.0) / 4)
    assert M.cumulative_iou([0, 0], [0, 0]) == 1.0
    assert math.isnan(M.mean_iou([], [])) and math.isnan(M.cumulative_iou([], []))
    # Pr@t counts IoU >= t: the ties 0.5, 0.6, 0.8 are in
    pr = M.precision_at([0.5, 0.8, 0.6])
    assert pr == pytest.approx({0.5: 1.0, 0.6: 2 / 3, 0.7: 1 / 3, 0.8: 1 / 3, 0.9: 0.0})


def test_candidates_intersection_union():
    cands = np.stack([PRED_A, GT_A, EMPTY, np.ones((4, 4), bool)])
    inter, union = M.candidates_intersection_union(torch.as_tensor(cands), GT_A)
    np.testing.assert_array_equal(inter, [2, 2, 0, 2])
    np.testing.assert_array_equal(union, [4, 2, 2, 16])
    with pytest.raises(ValueError):
        M.candidates_intersection_union(GT_A, GT_A)


def test_boundary_width():
    assert M.boundary_width(20, 20) == 1  # 0.02 * 28.28 = 0.57 -> 1
    assert M.boundary_width(100, 100) == 3  # 2.83 -> 3
    assert M.boundary_width(480, 640) == 16  # 0.02 * 800
    assert M.boundary_width(4, 4) == 1  # never below 1
    assert M.boundary_width(480, 640, 0.005) == 4


def test_mask_to_boundary_known_bands():
    sq = np.zeros((20, 20), dtype=np.uint8)
    sq[5:15, 5:15] = 1
    ring = np.zeros((20, 20), dtype=bool)
    ring[5:15, 5:15] = True
    ring[6:14, 6:14] = False
    np.testing.assert_array_equal(M.mask_to_boundary(sq), ring)  # d = 1: the 1-px inner ring
    assert M.mask_to_boundary(sq).sum() == 100 - 64 == 36
    band2 = np.zeros((20, 20), dtype=bool)
    band2[5:15, 5:15] = True
    band2[7:13, 7:13] = False
    np.testing.assert_array_equal(M.mask_to_boundary(sq, width=2), band2)  # d = 2: 2-px band
    # d from the ratio: 0.1 * 28.28 = 2.83 -> 3 -> only the 4x4 core survives the erosion
    assert M.mask_to_boundary(sq, dilation_ratio=0.1).sum() == 100 - 16
    # a mask cut by the image border has a boundary along the border (zero padding)
    full = np.ones((20, 20), dtype=bool)
    frame = np.ones((20, 20), dtype=bool)
    frame[1:19, 1:19] = False
    np.testing.assert_array_equal(M.mask_to_boundary(full), frame)
    assert not M.mask_to_boundary(np.zeros((20, 20), bool)).any()


def test_boundary_iou_shifted_square():
    gt = np.zeros((20, 20), dtype=bool)
    gt[5:15, 5:15] = True
    pred = np.zeros((20, 20), dtype=bool)
    pred[5:15, 6:16] = True  # shifted right by 1 px
    # rings: 36 px each; shared = top and bottom rows at columns 6..14 = 2 * 9 = 18
    assert M.boundary_intersection_union(pred, gt) == (18, 54)
    assert M.boundary_intersection_union(gt, gt) == (36, 36)
    assert M.intersection_union(pred, gt) == (90, 110)


# ---------------------------------------------------------------------- ReferringEvaluator
def _run_referring(tmp_path=None, with_empty=False, distributed=False, candidates=True):
    ev = ReferringEvaluator(
        "refcoco_val_test", output_dir=None if tmp_path is None else str(tmp_path), distributed=distributed
    )
    ev.reset()
    c = {
        "A": [PRED_A, GT_A, EMPTY] if candidates else None,  # best: GT itself -> I=2, U=2
        "B": [PRED_B, grid("1000", "0000", "0000", "0000")] if candidates else None,  # 0.8 vs 0.25
        "C": [PRED_C] if candidates else None,  # only the prediction -> I=6, U=10
    }
    ev.process([_inp(0, GT_A)], [_out(PRED_A, 0.9, c["A"])])
    ev.process(  # a batch of two
        [_inp(1, torch.as_tensor(GT_B, dtype=torch.uint8)), _inp(2, GT_C)],
        [_out(PRED_B, 0.8, c["B"]), _out(PRED_C, 0.7, c["C"])],
    )
    if with_empty:
        ev.process([_inp(3, EMPTY)], [_out(EMPTY, 0.1, [EMPTY, GT_A] if candidates else None)])
    return ev, ev.evaluate()


def test_referring_evaluator_known_answer():
    _, res = _run_referring()
    r = res["referring"]
    assert r["num_samples"] == 3
    assert r["cIoU"] == pytest.approx(100 * 12 / 19)
    assert r["gIoU"] == pytest.approx(100 * 1.9 / 3)
    assert r["Pr@0.5"] == pytest.approx(100.0)
    assert r["Pr@0.6"] == pytest.approx(200 / 3)
    assert r["Pr@0.7"] == pytest.approx(100 / 3)
    assert r["Pr@0.8"] == pytest.approx(100 / 3)
    assert r["Pr@0.9"] == pytest.approx(0.0)
    assert r["oracle_cIoU"] == pytest.approx(100 * (2 + 4 + 6) / (2 + 5 + 10))
    assert r["oracle_gIoU"] == pytest.approx(100 * (1.0 + 0.8 + 0.6) / 3)
    # 4x4 masks: d = 1, so each band is the mask minus its 1-px erosion (zero-padded border).
    #   A: GT band = GT (2 px), pred band = pred (4 px): I=2, U=4
    #   B: GT band = GT (4 px, a 2x2 block erodes to nothing); pred band = pred (5 px): I=4, U=5
    #   C: GT band = GT (6 px); pred band = pred (10 px, nothing survives a 3x3 erosion): I=6, U=10
    assert r["cBIoU"] == pytest.approx(100 * 12 / 19)
    assert r["gBIoU"] == pytest.approx(100 * 1.9 / 3)
    assert set(r) == {"cIoU", "gIoU", "cBIoU", "gBIoU", "oracle_cIoU", "oracle_gIoU", "num_samples"} | {
        f"Pr@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)
    }


def test_referring_empty_empty_counts_one():
    _, res = _run_referring(with_empty=True)
    r = res["referring"]
    assert r["num_samples"] == 4
    assert r["cIoU"] == pytest.approx(100 * 12 / 19)  # 0/0 adds nothing to the sums
    assert r["gIoU"] == pytest.approx(100 * 2.9 / 4)
    assert r["gBIoU"] == pytest.approx(100 * 2.9 / 4)
    assert r["Pr@0.9"] == pytest.approx(25.0)
    assert r["oracle_cIoU"] == pytest.approx(100 * 12 / 17)  # best for D: the empty candidate
    assert r["oracle_gIoU"] == pytest.approx(100 * 3.4 / 4)


def test_referring_without_candidates_reports_no_oracle_and_gather_path():
    _, res = _run_referring(candidates=False, distributed=True)  # world size 1: comm.gather path
    assert "oracle_cIoU" not in res["referring"] and "oracle_gIoU" not in res["referring"]
    assert res["referring"]["cIoU"] == pytest.approx(100 * 12 / 19)


def _rows(*spans):
    """20x20 mask with rows [a, b) set for each (a, b), or (row, c0, c1) for a part of one row."""
    m = np.zeros((20, 20), bool)
    for span in spans:
        if len(span) == 2:
            m[span[0] : span[1]] = True
        else:
            m[span[0], span[1] : span[2]] = True
    return m


def test_oracle_giou_bounds_giou_but_oracle_ciou_does_not_bound_ciou():
    """Two samples. A: the selected mask covers 10 of the 100 GT pixels (I=10, U=100, IoU 0.10);
    another candidate covers 30 GT pixels plus 100 outside (I=30, U=200, IoU 0.15) and is the
    oracle's pick. B: the selected mask is the GT (I=U=100). Per sample the oracle is never worse,
    so oracle gIoU >= gIoU; but A's oracle union doubles, so oracle cIoU (130/300) < cIoU (110/200)."""
    gt = _rows((0, 5))
    sel_a = _rows((0, 0, 10))
    better_a = _rows((0, 1), (1, 0, 10), (10, 15))
    assert M.intersection_union(sel_a, gt) == (10, 100) and M.intersection_union(better_a, gt) == (30, 200)
    ev = ReferringEvaluator("x", distributed=False)
    ev.reset()
    ev.process([_inp(0, gt), _inp(1, gt)], [_out(sel_a, 0.9, [sel_a, better_a]), _out(gt, 0.9, [gt])])
    r = ev.evaluate()["referring"]
    assert r["gIoU"] == pytest.approx(100 * (0.10 + 1.0) / 2)
    assert r["oracle_gIoU"] == pytest.approx(100 * (0.15 + 1.0) / 2)
    assert r["oracle_gIoU"] >= r["gIoU"]
    assert r["cIoU"] == pytest.approx(100 * 110 / 200)
    assert r["oracle_cIoU"] == pytest.approx(100 * 130 / 300)
    assert r["oracle_cIoU"] < r["cIoU"]  # the counter-example: no bound for a ratio of sums


def test_oracle_giou_bound_holds_on_random_samples():
    """Per sample the oracle maximises IoU over candidates that include the selected mask, so oracle
    gIoU >= gIoU whatever the masks (random 8x8 samples, 5 candidates each)."""
    rng = np.random.default_rng(0)
    ev = ReferringEvaluator("x", distributed=False)
    ev.reset()
    for i in range(40):
        gt = rng.random((8, 8)) < rng.random()
        cands = rng.random((5, 8, 8)) < rng.random((5, 1, 1))
        sel = int(rng.integers(5))
        ev.process([_inp(i, gt)], [_out(cands[sel], 0.5, list(cands))])
    r = ev.evaluate()["referring"]
    assert r["oracle_gIoU"] >= r["gIoU"]
    recs = ev._records
    assert all(x["oracle_iou"] >= x["iou"] for x in recs)


def test_referring_boundary_iou_aggregation():
    ev = ReferringEvaluator("x", distributed=False)
    ev.reset()
    gt1 = np.zeros((20, 20), bool)
    gt1[5:15, 5:15] = True
    pred1 = np.zeros((20, 20), bool)
    pred1[5:15, 6:16] = True  # band I=18, U=54 (see test_boundary_iou_shifted_square)
    gt2 = np.zeros((20, 20), bool)
    gt2[2:6, 2:6] = True  # 4x4 square: ring of 16 - 4 = 12 px, predicted exactly
    ev.process([_inp(0, gt1), _inp(1, gt2)], [_out(pred1), _out(gt2)])
    r = ev.evaluate()["referring"]
    assert r["cBIoU"] == pytest.approx(100 * (18 + 12) / (54 + 12))
    assert r["gBIoU"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert r["cIoU"] == pytest.approx(100 * (90 + 16) / (110 + 16))
    assert r["gIoU"] == pytest.approx(100 * (9 / 11 + 1) / 2)


def test_referring_boundary_ratio_is_used():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[5:15, 6:16] = True
    ev = ReferringEvaluator("x", distributed=False, boundary_dilation_ratio=0.1)  # d = 3
    ev.reset()
    ev.process([_inp(0, gt)], [_out(pred)])
    r = ev.evaluate()["referring"]
    # bands (84 px each): the 10x10 square minus its 4x4 core (rows/cols 8..11); pred's one column
    # to the right. Shared: top and bottom 3 rows at columns 6..14 (2 * 27) plus, in the 4 middle
    # rows, columns 6, 7, 13, 14 (16) -> I = 70, U = 84 + 84 - 70 = 98.
    gb = np.zeros((20, 20), bool)
    gb[5:15, 5:15] = True
    gb[8:12, 8:12] = False
    pb = np.roll(gb, 1, axis=1)
    assert (gb & pb).sum() == 70 and (gb | pb).sum() == 98
    assert r["gBIoU"] == pytest.approx(100 * 70 / 98)
    assert r["cBIoU"] == pytest.approx(100 * 70 / 98)


def test_per_expression_json(tmp_path):
    _run_referring(tmp_path=tmp_path, with_empty=True)
    rows = json.loads((tmp_path / "per_expression.json").read_text())
    assert [r["ref_id"] for r in rows] == [10, 11, 12, 13]
    a, b, c, d = rows
    assert a["image_id"] == 100 and a["sentence_id"] == 0 and a["expression"] == "thing 0"
    assert a["iou"] == pytest.approx(0.5) and a["oracle_iou"] == pytest.approx(1.0) and a["oracle_query"] == 1
    assert (a["intersection"], a["union"]) == (2, 4)
    assert a["biou"] == pytest.approx(0.5) and a["score"] == pytest.approx(0.9)
    assert b["iou"] == pytest.approx(0.8) and b["oracle_iou"] == pytest.approx(0.8) and b["oracle_query"] == 0
    assert c["iou"] == pytest.approx(0.6) and c["oracle_iou"] == pytest.approx(0.6)
    assert d["iou"] == 1.0 and d["union"] == 0 and d["oracle_iou"] == 1.0 and d["biou"] == 1.0
    for key in ("image_id", "ref_id", "expression", "iou", "oracle_iou", "biou", "score", "task"):
        assert all(key in r for r in rows)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["referring"]["gIoU"] == pytest.approx(100 * 2.9 / 4)


def test_sample_id_fallback_and_errors():
    ev = ReferringEvaluator("x", distributed=False)
    ev.reset()
    assert ev.evaluate() == {}  # nothing processed
    inp = {"image_id": 1, "sample_id": "s7", "sentence": {"sent": "the dog", "sent_id": 3}, "gt_mask": GT_A}
    ev.process([inp], [_out(PRED_A)])
    assert ev._records[0]["ref_id"] == "s7" and ev._records[0]["expression"] == "the dog"
    # RefCOCO dicts carry "sent_id", ReasonSeg dicts "query_index"
    ev.process([{"image_id": 2, "ref_id": 5, "sent_id": 9, "gt_mask": GT_A}], [_out(PRED_A)])
    ev.process([{"image_id": "img", "query_index": 0, "expression": "why", "gt_mask": GT_A}], [_out(PRED_A)])
    assert [r["sentence_id"] for r in ev._records] == [None, 9, 0]
    assert ev._records[2]["ref_id"] is None
    with pytest.raises(KeyError):
        ev.process([{"image_id": 1}], [_out(PRED_A)])
    with pytest.raises(ValueError):
        ev.process([_inp(0, np.zeros((5, 5), bool))], [_out(PRED_A)])


def test_two_workers_merge_like_gather():
    # What comm.gather does across ranks: each rank's records, concatenated in rank order.
    ev0, ev1 = ReferringEvaluator("x", distributed=False), ReferringEvaluator("x", distributed=False)
    ev0.reset()
    ev1.reset()
    ev0.process([_inp(0, GT_A)], [_out(PRED_A)])
    ev1.process([_inp(1, GT_B), _inp(2, GT_C)], [_out(PRED_B), _out(PRED_C)])
    merged = ReferringEvaluator("x", distributed=False)
    merged.reset()
    merged._records = ev0._records + ev1._records
    r = merged.evaluate()["referring"]
    assert r["cIoU"] == pytest.approx(100 * 12 / 19) and r["num_samples"] == 3


# ---------------------------------------------------------------------- ReasoningEvaluator
def test_reasoning_evaluator_short_long_and_ignore(tmp_path):
    gt_l1 = grid("1111", "1111", "0000", "0000")
    pred_l1 = grid("0000", "1111", "1111", "0000")
    ign_l1 = grid("0000", "0000", "1111", "0000")  # I=4, U=8 -> 0.5 (row 2 ignored)
    gt_l2 = grid("1111", "0000", "0000", "0000")
    pred_l2 = grid("1110", "0000", "0000", "0000")  # I=3, U=4 -> 0.75
    samples = [
        (dict(is_sentence=False, gt_mask=GT_A), PRED_A),  # short: I=2, U=4 -> 0.5
        (dict(is_sentence=False, gt_mask=EMPTY), EMPTY),  # short: empty/empty -> 1.0
        (dict(is_sentence=True, gt_mask=gt_l1, ignore_mask=torch.as_tensor(ign_l1)), pred_l1),
        (dict(is_sentence=True, gt_mask=gt_l2), pred_l2),
    ]
    ev = ReasoningEvaluator("reason_seg_val", output_dir=str(tmp_path), distributed=False)
    ev.reset()
    for i, (extra, pred) in enumerate(samples):
        inp = {"image_id": i, "sample_id": i, "expression": f"q{i}", "task": "reasoning", **extra}
        ev.process([inp], [_out(pred)])
    r = ev.evaluate()["reasoning"]
    assert r["num_samples"] == 4
    assert r["gIoU"] == pytest.approx(100 * (0.5 + 1.0 + 0.5 + 0.75) / 4)
    assert r["cIoU"] == pytest.approx(100 * (2 + 0 + 4 + 3) / (4 + 0 + 8 + 4))
    assert r["short_gIoU"] == pytest.approx(100 * 1.5 / 2)
    assert r["short_cIoU"] == pytest.approx(100 * 2 / 4)
    assert r["long_gIoU"] == pytest.approx(100 * 1.25 / 2)
    assert r["long_cIoU"] == pytest.approx(100 * 7 / 12)
    assert set(r) == {"gIoU", "cIoU", "short_gIoU", "short_cIoU", "long_gIoU", "long_cIoU", "num_samples"}
    rows = json.loads((tmp_path / "per_expression.json").read_text())
    assert [row["is_sentence"] for row in rows] == [False, False, True, True]
    assert (rows[2]["intersection"], rows[2]["union"]) == (4, 8)
    assert json.loads((tmp_path / "metrics.json").read_text())["reasoning"]["long_cIoU"] == pytest.approx(
        100 * 7 / 12
    )


def test_reasoning_empty_split_is_nan():
    ev = ReasoningEvaluator("x", distributed=True)  # world size 1: gather path
    ev.reset()
    ev.process([{"image_id": 0, "is_sentence": True, "gt_mask": GT_B}], [_out(PRED_B)])
    r = ev.evaluate()["reasoning"]
    assert r["long_gIoU"] == pytest.approx(80.0) and r["cIoU"] == pytest.approx(80.0)
    assert math.isnan(r["short_gIoU"]) and math.isnan(r["short_cIoU"])


def test_to_jsonable_converts_numpy_torch_and_non_finite_values():
    import json

    import torch
    from flowseg.utils.jsonable import to_jsonable

    value = {1: np.float32(0.5), "pq": float("nan"), "ids": (torch.tensor(7), np.int64(3)), "a": np.ones(2)}
    out = to_jsonable(value)
    assert out == {"1": 0.5, "pq": None, "ids": [7, 3], "a": [1.0, 1.0]}
    assert json.loads(json.dumps(out)) == out
