"""The analysis tools of ``tools/analysis`` (paper Tables 5-8, 12, Figs. 6-7).

Table 5/6 tools on hand-made ``per_expression.json`` files with known numbers; the model-based
tools on a tiny untrained referring FlowSeg saved with ``DetectionCheckpointer`` and a few
synthetic samples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.utils.inference import build_cfg
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from repo_scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools", "analysis")
CONFIG = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")


def _load(name: str):
    return load_script(f"tools/analysis/{name}.py")


oracle = _load("oracle_vs_selected")
rescue = _load("failure_rescue")
drift = _load("condition_drift")
gates = _load("gate_distribution")
attention = _load("attention_maps")
bar = _load("boundary_eval")
common = _load("common")
probe = _load("attribute_probe")
picks = _load("wrong_picks")


# ------------------------------------------------------------------------------ hand-made records
def _rec(image_id, ref_id, sent_id, inter, union, o_inter=None, o_union=None, expression="x"):
    r = {
        "image_id": image_id,
        "ref_id": ref_id,
        "sentence_id": sent_id,
        "expression": expression,
        "intersection": inter,
        "union": union,
        "iou": inter / union if union else 1.0,
        "oracle_iou": None,
    }
    if o_inter is not None:
        r.update(
            oracle_intersection=o_inter,
            oracle_union=o_union,
            oracle_iou=o_inter / o_union if o_union else 1.0,
        )
    return r


def _write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


TABLE5_RECORDS = [
    _rec(1, 1, 1, 50, 100, 80, 100),  # success
    _rec(1, 2, 2, 10, 100, 60, 100),  # failure, good candidate existed: misaligned
    _rec(2, 3, 3, 0, 50, 20, 100),  # failure, no good candidate
    _rec(3, 4, 4, 0, 0, 0, 0),  # empty prediction and target: IoU 1
]


def test_oracle_vs_selected_exact_numbers(tmp_path):
    a = _write(tmp_path / "a" / "per_expression.json", TABLE5_RECORDS)
    _write(tmp_path / "b" / "per_expression.json", TABLE5_RECORDS[:2])
    out = oracle.oracle_vs_selected([a, str(tmp_path / "b")], ["A", "B"], output_dir=str(tmp_path / "out"))
    ra, rb = out["rows"]
    assert ra["label"] == "A" and ra["num_samples"] == 4
    assert ra["cIoU"] == pytest.approx(100 * 60 / 250)
    assert ra["gIoU"] == pytest.approx(100 * (0.5 + 0.1 + 0.0 + 1.0) / 4)
    assert ra["oracle_cIoU"] == pytest.approx(100 * 160 / 300)
    assert ra["oracle_gIoU"] == pytest.approx(100 * (0.8 + 0.6 + 0.2 + 1.0) / 4)
    assert ra["oracle_gap_cIoU"] == pytest.approx(100 * 160 / 300 - 24.0)
    assert (ra["num_failures"], ra["num_misaligned"]) == (2, 1)
    assert ra["misalignment_share"] == pytest.approx(50.0)
    assert rb["cIoU"] == pytest.approx(100 * 60 / 200) and rb["oracle_cIoU"] == pytest.approx(70.0)
    assert rb["misalignment_share"] == pytest.approx(100.0)
    with open(tmp_path / "out" / "oracle_vs_selected.json") as f:
        assert json.load(f)[0]["oracle_cIoU"] == pytest.approx(100 * 160 / 300)
    md = (tmp_path / "out" / "oracle_vs_selected.md").read_text()
    assert "| A | 4 | 24.00 | 40.00 | 53.33 | 65.00 | 29.33 | 2 | 50.00 |" in md


def test_oracle_vs_selected_by_synthetic_kind(tmp_path):
    recs = [
        _rec(1, 1, 1, 50, 100, 80, 100, expression="the red circle"),
        _rec(1, 2, 2, 10, 100, 60, 100, expression="the leftmost star"),
        _rec(2, 3, 3, 0, 50, 10, 50, expression="the star to the left of the blue circle"),
        _rec(2, 4, 4, 30, 50, 40, 50, expression="the small square"),
    ]
    f = _write(tmp_path / "per_expression.json", recs)
    rows = oracle.oracle_vs_selected([f], ["M"], by_synthetic_kind=True)["rows"]
    assert [r["label"] for r in rows] == ["M", "M [attribute]", "M [superlative]", "M [relation]"]
    assert [r["num_samples"] for r in rows] == [4, 2, 1, 1]
    assert rows[1]["cIoU"] == pytest.approx(100 * 80 / 150)
    assert rows[1]["oracle_cIoU"] == pytest.approx(100 * 120 / 150)
    assert rows[2]["cIoU"] == pytest.approx(10.0) and rows[3]["cIoU"] == pytest.approx(0.0)
    assert rows[0]["cIoU"] == pytest.approx(100 * 90 / 300)
    # a run's inference/ folder also holds the reasoning set: it keeps its one row, without kinds
    query = "Which shape has the colour of a ripe banana?"
    reason_rec = dict(_rec(3, 5, 5, 20, 40, expression=query), task="reasoning")
    reason = _write(tmp_path / "reason" / "per_expression.json", [reason_rec])
    rows = oracle.oracle_vs_selected([f, reason], ["M", "R"], by_synthetic_kind=True)["rows"]
    assert [r["label"] for r in rows][-2:] == ["M [relation]", "R"]


def test_oracle_vs_selected_without_candidates_and_bad_file(tmp_path):
    recs = [_rec(1, 1, 1, 30, 100), _rec(1, 2, 2, 70, 100, 90, 100)]
    row = oracle.summarize_records(recs)
    assert row["cIoU"] == pytest.approx(50.0) and row["num_with_oracle"] == 1
    assert row["oracle_cIoU"] == pytest.approx(90.0) and row["misalignment_share"] is None
    bad = _write(tmp_path / "bad.json", [{"iou": 0.3}])
    with pytest.raises(ValueError, match="lacks"):
        oracle.oracle_vs_selected([bad])


def _rescue_records():
    base = [(1, 10, 0.10, 100), (2, 20, 0.30, 100), (3, 30, 0.60, 100), (4, 40, 0.0, 50), (5, 50, 0.15, 100)]
    model = {1: 0.7, 2: 0.4, 3: 0.9, 4: 0.5, 5: 0.1}
    a = [_rec(i, r, i, round(iou * u), u) for i, r, iou, u in base]
    b = [_rec(i, r, i, round(model[i] * u), u) for i, r, _, u in base]
    return a, b


def test_failure_rescue_exact_numbers():
    a, b = _rescue_records()
    res = rescue.failure_rescue(a, b, thresholds=(0.5, 0.2))
    s5, s2 = res["subsets"]
    assert s5["num_failures"] == 4 and s2["num_failures"] == 3
    assert s5["baseline_cIoU"] == pytest.approx(100 * 55 / 350)
    assert s5["baseline_gIoU"] == pytest.approx(100 * (0.1 + 0.3 + 0.0 + 0.15) / 4)
    assert s5["model_cIoU"] == pytest.approx(100 * 145 / 350)
    assert s5["model_gIoU"] == pytest.approx(42.5)
    assert s5["delta_cIoU"] == pytest.approx(100 * 90 / 350)
    assert (s5["num_rescued"], s5["rescue_rate"]) == (2, pytest.approx(50.0))
    assert s2["baseline_cIoU"] == pytest.approx(10.0) and s2["model_cIoU"] == pytest.approx(42.0)
    assert s2["model_gIoU"] == pytest.approx(100 * 1.3 / 3)
    assert s2["rescue_rate"] == pytest.approx(100 * 2 / 3)
    # the model's own failures (IoU 0.4 and 0.1) are failures of the baseline too
    assert (s5["num_model_failures"], s5["reverse_rescue_rate"]) == (2, pytest.approx(0.0))
    swapped = rescue.failure_rescue(b, a, thresholds=(0.5, 0.2))["subsets"]
    assert swapped[0]["reverse_rescue_rate"] == pytest.approx(s5["rescue_rate"])
    assert swapped[1]["reverse_rescue_rate"] == pytest.approx(s2["rescue_rate"])


def test_failure_rescue_joins_on_expression_and_averages(tmp_path):
    a, b = _rescue_records()
    for r in a + b:  # no sentence ids: the expression disambiguates
        r["sentence_id"] = None
        r["expression"] = f"object {r['image_id']}"
    b = list(reversed(b))  # the join does not depend on order
    fa = _write(tmp_path / "a.json", a)
    fb = _write(tmp_path / "b.json", b)
    out = rescue.failure_rescue_files([fa, fa], [fb, fb], ["D1", "D2"], output_dir=str(tmp_path / "o"))
    avg = out["average"][0]
    assert avg["model_cIoU"] == pytest.approx(100 * 145 / 350) and avg["rescue_rate"] == pytest.approx(50.0)
    assert "| Baseline (IoU<0.5) cIoU | 15.7 | 15.7 | 15.7 |" in out["markdown"]
    assert (tmp_path / "o" / "failure_rescue.json").is_file()


def test_failure_rescue_names_missing_samples(tmp_path, capsys):
    a, b = _rescue_records()
    b = [r for r in b if r["ref_id"] != 30]
    with pytest.raises(
        ValueError, match=r"1 sample\(s\) of baseline are missing from model: \(image_id=3, ref_id=30"
    ):
        rescue.failure_rescue(a, b)
    fa, fb = _write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b)
    assert rescue.main(["--baseline", fa, "--model", fb]) == 1
    assert "ref_id=30" in capsys.readouterr().err
    dup = a + a[:1]
    with pytest.raises(ValueError, match="share the sample id"):
        rescue.failure_rescue(dup, dup)


def test_oracle_cli_smoke(tmp_path):
    f = _write(tmp_path / "r" / "per_expression.json", TABLE5_RECORDS)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(TOOLS, "oracle_vs_selected.py"),
            "--inputs",
            f,
            "--labels",
            "M",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| M | 4 | 24.00 |" in proc.stdout
    with open(tmp_path / "out" / "oracle_vs_selected.json") as f:
        assert json.load(f)[0]["misalignment_share"] == pytest.approx(50.0)


def test_wrong_picks_outcome_of_known_masks():
    """Three instances, two of category 7: the output is matched to the instance it overlaps
    best, if that IoU reaches the threshold."""
    masks = [np.zeros((10, 10), bool) for _ in range(3)]
    masks[0][0:4, 0:4] = True
    masks[1][5:9, 0:4] = True
    masks[2][0:4, 5:9] = True
    instances = [(11, 7, masks[0]), (12, 7, masks[1]), (13, 9, masks[2])]
    assert picks.pick_outcome(masks[0], 11, instances) == ("correct", 7)
    assert picks.pick_outcome(masks[1], 11, instances) == ("same category", 7)
    assert picks.pick_outcome(masks[2], 11, instances) == ("other category", 9)
    assert picks.pick_outcome(np.zeros((10, 10), bool), 11, instances) == ("no instance", None)
    half = np.zeros((10, 10), bool)
    half[0:4, 0:2] = True  # IoU 0.5 with instance 11
    half[9, 9] = True  # ... and one stray pixel: 8 / 17
    assert picks.pick_outcome(half, 11, instances) == ("no instance", None)
    assert picks.pick_outcome(half, 11, instances, min_iou=0.4) == ("correct", 7)
    with pytest.raises(ValueError, match="annotation 99"):
        picks.pick_outcome(masks[0], 99, instances)


def test_wrong_picks_summary_and_word_agreement():
    rec = [
        {"outcome": "correct", "target_name": "red circle", "picked_name": "red circle"},
        {"outcome": "other category", "target_name": "red circle", "picked_name": "red star"},
        {"outcome": "other category", "target_name": "red star", "picked_name": "red circle"},
        {"outcome": "other category", "target_name": "blue star", "picked_name": "green star"},
        {"outcome": "same category", "target_name": "red star", "picked_name": "red star"},
        {"outcome": "no instance", "target_name": "red star", "picked_name": None},
    ]
    out = picks.summarize_picks(rec, ["colour", "shape"])
    assert out["num_samples"] == 6
    assert out["counts"] == {"correct": 1, "same category": 1, "other category": 3, "no instance": 1}
    assert out["shares"]["other category"] == pytest.approx(50.0)
    assert out["wrong_pick_agreement"] == {"colour= shape≠": 2, "colour= shape=": 1, "colour≠ shape=": 1}
    assert "wrong_pick_agreement" not in picks.summarize_picks(rec)
    with pytest.raises(ValueError, match="2 words"):
        picks.summarize_picks([{**rec[1], "picked_name": "star"}], ["colour", "shape"])


# ------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny LLM files, 2+2+2 synthetic images registered under a temporary
    $DETECTRON2_DATASETS, and a saved untrained referring model (SR, CR and BAR on)."""
    tmp = tmp_path_factory.mktemp("analysis")
    llm = make_tiny_llm_dir(tmp / "llm")
    d2 = tmp / "datasets"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(d2))
        generate_synthetic_datasets(
            str(d2 / "synthetic"), {"train": 2, "val": 2, "test": 2}, seed=0, image_size=64
        )
        register_synthetic_datasets(str(d2 / "synthetic"))
        opts = [str(o) for o in tiny_llm_cfg_overrides(llm)]
        opts += ["MODEL.LLM.LORA.ENABLED", "False", "DATASETS.TEST", '("synthref_test",)']
        # random (xavier) CR weights stand in for trained ones: zero-init CR would not move C yet
        opts += ["MODEL.FLOWSEG.CR_ZERO_INIT", "False"]
        cfg = build_cfg(CONFIG, opts=opts)
        torch.manual_seed(0)
        model = build_model(cfg)
        DetectionCheckpointer(model, save_dir=str(tmp)).save("tiny_refer")
        yield {"tmp": tmp, "opts": opts, "weights": str(tmp / "tiny_refer.pth")}
    register_synthetic_datasets()  # back to the default root for the tests that follow


def _args(tool, setup, *extra, opts=()):
    return tool.parse_args(
        [
            "--config-file",
            CONFIG,
            "--weights",
            setup["weights"],
            "--max-samples",
            "3",
            *extra,
            "--opts",
            *setup["opts"],
            *opts,
        ]
    )


def test_condition_drift_is_one_without_refinement_and_moves_with_it(setup):
    off = drift.run(_args(drift, setup, opts=["MODEL.FLOWSEG.CONDITION_REFINEMENT", "False"]))
    assert off["condition_refinement"] is False and off["layers"] == [1, 2, 3]
    assert off["num_samples"] == 3 and off["num_conditions"] == 3
    for v in off["mean_cosine"] + off["min_cosine"]:
        assert abs(v - 1.0) < 1e-6
    out_dir = setup["tmp"] / "drift"
    on = drift.run(_args(drift, setup, "--output-dir", str(out_dir)))
    assert on["condition_refinement"] is True
    assert min(on["mean_cosine"]) < 1.0 - 1e-4
    assert all(-1.0 <= v <= 1.0 for v in on["mean_cosine"])
    assert all(m <= v + 1e-12 for m, v in zip(on["min_cosine"], on["mean_cosine"]))
    with open(out_dir / "condition_drift.json") as f:
        assert json.load(f)["mean_cosine"] == pytest.approx(on["mean_cosine"])


def test_gate_distribution_stats_and_png(setup):
    out_dir = setup["tmp"] / "gates"
    res = gates.run(_args(gates, setup, "--output-dir", str(out_dir)))
    assert (out_dir / "gate_distribution.png").stat().st_size > 1000
    assert len(res["layers"]) == 3 and res["num_samples"] == 3
    # exact mean over every gate value of the same 3 samples
    cfg = common.setup_cfg(CONFIG, setup["weights"], setup["opts"])
    model = common.load_model(cfg)
    inputs = [x for _, x in common.iterate_dataset(cfg, "synthref_test", 3)]
    direct = [[] for _ in range(3)]
    for x in inputs:
        outputs, _, _ = common.run_head_with_intermediates(model, [x])
        for i, g in enumerate(outputs["gates"]):
            direct[i].append(g.double().flatten())
    for layer, values in zip(res["layers"], direct):
        v = torch.cat(values)
        assert layer["count"] == v.numel() == 3 * 16 * 64
        assert layer["mean"] == pytest.approx(float(v.mean()), abs=1e-9)
        assert layer["std"] == pytest.approx(float(v.std(unbiased=False)), abs=1e-6)
        assert 0.0 < layer["min"] <= layer["max"] < 1.0
        q = layer["quantiles"]
        assert 0.0 < q["0.05"] <= q["0.25"] <= q["0.5"] <= q["0.75"] <= q["0.95"] < 1.0
        assert q["0.5"] == pytest.approx(float(v.median()), abs=2e-3)
        assert sum(layer["histogram"]["counts"]) == v.numel()
    with open(out_dir / "gate_distribution.json") as f:
        assert json.load(f)["layers"][0]["mean"] == pytest.approx(res["layers"][0]["mean"])


def test_attention_maps_pngs_and_normalised_heatmaps(setup):
    out_dir = setup["tmp"] / "attention"
    out = attention.run(_args(attention, setup, "--output-dir", str(out_dir)))
    assert len(out["samples"]) == 3
    for s in out["samples"]:
        assert os.path.getsize(s["png"]) > 1000
    cfg = common.setup_cfg(CONFIG, setup["weights"], setup["opts"])
    model = common.load_model(cfg)
    _, x = next(common.iterate_dataset(cfg, "synthref_test", 1))
    res = attention.attention_maps(model, x)
    assert res["seg_map"].shape == res["cond_map"].shape == (x["height"], x["width"])
    for w in (res["seg_weights"], res["cond_weights"]):
        assert w.shape == (16,) and w.sum() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
    for key in ("seg_map", "cond_map"):
        assert 0.0 <= res[key].min() and res[key].max() <= 1.0
    for key in ("seg_heatmap", "cond_heatmap"):
        assert res[key].min() == pytest.approx(0.0) and res[key].max() == pytest.approx(1.0)
    # last layer: the hooked query features are the decoder's own output features
    outputs, cond, _ = common.run_head_with_intermediates(model, [x])
    q, s = outputs["query_embeds"][0], cond["seg_embed"][0]
    expected = torch.softmax(q @ s / 8.0, dim=0).numpy()  # sqrt(hidden 64) = 8
    np.testing.assert_allclose(res["seg_weights"], expected, atol=1e-6)
    np.testing.assert_allclose(res["cond_weights"], outputs["cond_attn"][-1][0, 0].numpy(), atol=1e-7)
    first = attention.attention_maps(model, x, layer=1)
    np.testing.assert_allclose(first["cond_weights"], outputs["cond_attn"][0][0, 0].numpy(), atol=1e-7)
    with pytest.raises(ValueError, match="layer must be"):
        attention.attention_maps(model, x, layer=4)


def test_boundary_eval_eps_one_equals_bar_disabled(setup):
    out_dir = setup["tmp"] / "bar"
    on = bar.run(_args(bar, setup, "--epsilons", "1.0", "0.1", "--output-dir", str(out_dir)))["results"]
    assert list(on) == ["w/o BAR", "eps=1", "eps=0.1"]
    assert on["eps=1"] == on["w/o BAR"]
    for r in on.values():
        assert r["num_samples"] == 3
        for m in ("cIoU", "gIoU", "cBIoU", "gBIoU"):
            assert 0.0 <= r[m] <= 100.0
    assert (out_dir / "eps=0.1" / "per_expression.json").is_file()
    off = bar.run(_args(bar, setup, opts=["MODEL.FLOWSEG.BAR.ENABLED", "False"]))["results"]
    assert list(off) == ["w/o BAR"]
    assert off["w/o BAR"] == on["eps=1"]
    # the model's own settings are restored afterwards
    cfg = common.setup_cfg(CONFIG, setup["weights"], setup["opts"])
    model = common.load_model(cfg)
    inputs = [x for _, x in common.iterate_dataset(cfg, "synthref_test", 1)]
    bar.boundary_eval(model, inputs, "synthref_test", epsilons=[0.2])
    assert (
        model.refiner is not None and model.refiner.epsilon == pytest.approx(0.1) and model.return_candidates
    )


def test_tools_refuse_a_generic_config_and_a_missing_checkpoint(setup, tmp_path):
    generic = os.path.join(ROOT, "configs", "tiny", "flowseg_coco_panoptic_tiny.yaml")
    with pytest.raises(ValueError, match="not in referring mode"):
        drift.run(drift.parse_args(["--config-file", generic]))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        drift.run(
            drift.parse_args(
                ["--config-file", CONFIG, "--weights", str(tmp_path / "nope.pth"), "--opts", *setup["opts"]]
            )
        )


def test_attribute_probe_scores_known_predictions(setup, monkeypatch):
    """A segmentor that returns every ground-truth segment as a query mask, labelled right or with
    the shape word swapped: mask recall 1 and colour accuracy 1 in both; shape 1, then 0."""
    from detectron2.data import MetadataCatalog

    config = os.path.join(ROOT, "configs", "synthetic", "stage1_synthpan_cpu.yaml")
    cfg = build_cfg(config, None, ["INPUT.IMAGE_SIZE", 64, "MODEL.SAM_VIT.IMG_SIZE", 64])
    model = build_model(cfg).eval()
    meta = MetadataCatalog.get("synthpan_val")
    names = list(meta.stuff_classes)
    things = list(meta.thing_dataset_id_to_contiguous_id.values())
    samples = list(common.iterate_dataset(cfg, "synthpan_val"))

    def other_shape(cat):
        colour, shape = names[cat].split()
        return next(i for i, n in enumerate(names) if n.startswith(colour + " ") and not n.endswith(shape))

    def probe_with(relabel):
        queue = [probe.panoptic_segments(d) for d, _ in samples]

        def run_head(inputs, images, **kw):
            segments = queue.pop(0)
            q = model.num_queries
            masks = torch.full((1, q, *images.tensor.shape[-2:]), -10.0)
            logits = torch.zeros(1, q, len(names) + 1)
            for j, (gt, cat) in enumerate(segments):
                masks[0, j, : gt.shape[0], : gt.shape[1]][torch.from_numpy(gt)] = 10.0
                logits[0, j, relabel(cat) if cat in things else cat] = 10.0
            return {"pred_masks": masks, "pred_logits": logits}, {}

        monkeypatch.setattr(model, "run_head", run_head)
        return probe.attribute_probe(model, samples, names, things)

    right = probe_with(lambda c: c)
    assert right["num_segments"] == sum(
        1 for d, _ in samples for _, c in probe.panoptic_segments(d) if c in things
    )
    assert right["mask_recall"] == 1.0
    assert right["attributes"]["colour"]["accuracy"] == right["attributes"]["shape"]["accuracy"] == 1.0
    assert right["attributes"]["shape"]["chance"] == pytest.approx(1 / 5)
    assert right["attributes"]["colour"]["chance"] == pytest.approx(1 / 6)
    swapped = probe_with(other_shape)
    assert (
        swapped["attributes"]["colour"]["accuracy"] == 1.0
        and swapped["attributes"]["shape"]["accuracy"] == 0.0
    )
    with pytest.raises(ValueError, match="class head"):
        probe.attribute_probe(
            build_model(build_cfg(CONFIG, None, setup["opts"])).eval(), samples, names, things
        )


def test_wrong_picks_on_a_refer_set(setup, monkeypatch, tmp_path):
    """Outputs that are the referred object's own mask are all correct; empty outputs pick no
    instance; the untrained model's outcomes cover every sample."""
    args = _args(picks, setup, "--attribute-words", "colour", "shape", "--by-synthetic-kind")
    real = picks.run(args)["groups"]["all"]
    assert real["num_samples"] == 3 and sum(real["counts"].values()) == 3

    cfg, model, dataset, samples = common.model_and_dataset_from_args(args)
    truth = [(d, x) for d, x in samples]
    answers = iter([x["gt_mask"] for _, x in truth])
    monkeypatch.setattr(model, "forward", lambda inputs: [{"ref_seg": {"mask": next(answers)}}])
    records = picks.wrong_picks(model, truth, dataset)
    assert [r["outcome"] for r in records] == ["correct"] * 3
    assert all(r["picked_name"] == r["target_name"] and len(r["target_name"].split()) == 2 for r in records)
    monkeypatch.setattr(
        model, "forward", lambda inputs: [{"ref_seg": {"mask": np.zeros_like(inputs[0]["gt_mask"])}}]
    )
    assert {r["outcome"] for r in picks.wrong_picks(model, truth, dataset)} == {"no instance"}
    with pytest.raises(ValueError, match="not a single-target refer-format"):
        picks.wrong_picks(model, [], "synthpan_val")
