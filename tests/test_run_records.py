"""Runs that can be compared: metrics files name their weights, evaluations of other weights are
never merged, log.txt carries no colour codes, and ``tools/compare_runs.py`` tabulates folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from flowseg.engine import write_metrics_json
from flowseg.engine.provenance import evaluation_record, file_sha256
from test_train_net import _args, _cfg, d2_root, train_net  # noqa: F401  (fixture re-used)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_file_sha256_is_cached_by_size_and_mtime(tmp_path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(b"weights one")
    assert file_sha256(str(f)) == _sha(str(f))
    cache = tmp_path / "w.pth.sha256"
    key = cache.read_text().rsplit(" ", 1)[0]
    cache.write_text(f"{key} {'0' * 64}")  # a cache entry for this size and mtime is trusted
    assert file_sha256(str(f)) == "0" * 64
    f.write_bytes(b"weights two, longer")  # another size: recomputed
    assert file_sha256(str(f)) == _sha(str(f))


def test_metrics_of_one_model_merge_and_of_another_are_kept_apart(tmp_path) -> None:
    cfg = _cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    w1, w2 = tmp_path / "a.pth", tmp_path / "b.pth"
    w1.write_bytes(b"a")
    w2.write_bytes(b"b")
    cfg.MODEL.WEIGHTS = str(w1)
    run1 = evaluation_record(cfg, None, {"x": 1.0})
    write_metrics_json(str(tmp_path), {"x": {"referring": {"cIoU": 10.0}}}, None, run1)
    write_metrics_json(
        str(tmp_path), {"y": {"referring": {"cIoU": 20.0}}}, None, evaluation_record(cfg, None)
    )
    merged = json.loads((tmp_path / "metrics_all.json").read_text())
    assert set(merged["metrics"]) == {"x", "y"}  # same weights, data sets one by one
    assert merged["run"]["seconds"] == {"x": 1.0}
    cfg.MODEL.WEIGHTS = str(w2)
    write_metrics_json(
        str(tmp_path), {"x": {"referring": {"cIoU": 30.0}}}, None, evaluation_record(cfg, None)
    )
    new = json.loads((tmp_path / "metrics_all.json").read_text())
    assert new["metrics"] == {"x": {"referring": {"cIoU": 30.0}}}
    assert new["run"]["weights_sha256"] == _sha(str(w2))
    kept = json.loads((tmp_path / f"metrics_all.{_sha(str(w1))[:12]}_eval.json").read_text())
    assert kept["run"]["weights"] == str(w1) and kept["metrics"]["x"]["referring"]["cIoU"] == 10.0
    old_x = json.loads((tmp_path / f"metrics_x.{_sha(str(w1))[:12]}_eval.json").read_text())
    assert old_x["metrics"]["referring"]["cIoU"] == 10.0


@pytest.mark.slow
def test_two_evaluations_into_one_folder_stay_apart_with_weights_named(d2_root: str, tmp_path) -> None:  # noqa: F811
    """``train_net.py --eval-only`` of two checkpoints into one OUTPUT_DIR: each metrics file names
    its weights and checksum; log.txt has no terminal escape codes."""
    out = str(tmp_path / "eval")
    opts = ["DATASETS.TRAIN", "('test_tn_train',)", "DATASETS.TEST", "('test_tn_train',)", "OUTPUT_DIR", out]
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = train_net.Trainer.build_model(train_net.setup(_args(opts)))
        weights.append(str(tmp_path / f"model_seed{seed}.pth"))
        torch.save({"model": model.state_dict()}, weights[-1])
    for w in weights:
        train_net.main(_args(opts + ["MODEL.WEIGHTS", w], eval_only=True))
    latest = json.load(open(os.path.join(out, "metrics_all.json")))
    first = json.load(open(os.path.join(out, f"metrics_all.{_sha(weights[0])[:12]}_eval.json")))
    for res, w in ((first, weights[0]), (latest, weights[1])):
        assert res["run"]["weights"] == w and res["run"]["weights_sha256"] == _sha(w)
        assert len(res["run"]["config_sha256"]) == 64 and res["run"]["iteration"] is None
        assert (
            res["run"]["seconds"]["test_tn_train"] > 0
            and "PQ" in res["metrics"]["test_tn_train"]["panoptic_seg"]
        )
    assert first["run"]["config_sha256"] == latest["run"]["config_sha256"]
    log = open(os.path.join(out, "log.txt")).read()
    assert "Running with full config" in log and "\x1b[" not in log


def _compare(*folders: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_runs.py"), *folders]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_compare_runs_prints_one_table_over_folders(tmp_path) -> None:
    cfg = _cfg()
    folders = [str(tmp_path / "run_a"), str(tmp_path / "run_b")]
    results = [
        {"refer_val": {"referring": {"cIoU": 48.71, "gIoU": 59.6, "oracle_cIoU": 86.1}}},
        {"refer_val": {"referring": {"cIoU": 51.25, "gIoU": 61.0}}, "pan": {"panoptic_seg": {"PQ": 63.94}}},
    ]
    for i, (folder, res) in enumerate(zip(folders, results)):
        os.makedirs(folder)
        cfg.OUTPUT_DIR = folder
        cfg.MODEL.WEIGHTS = os.path.join(folder, "model_final.pth")
        open(cfg.MODEL.WEIGHTS, "wb").write(bytes([i]) * 10)
        write_metrics_json(folder, res, None, evaluation_record(cfg, None, {k: 2.5 * (i + 1) for k in res}))
    proc = _compare(*folders)
    assert proc.returncode == 0, proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()[2:]]
    sha_b = _sha(os.path.join(folders[1], "model_final.pth"))[:10]
    assert rows == [
        ["pan", folders[1], "", "", "", "63.9", "5.0", f"model_final.pth {sha_b}", "", rows[0][-1]],
        ["refer_val", folders[0], "48.7", "59.6", "86.1", "", "2.5", rows[1][7], "", rows[1][-1]],
        ["refer_val", folders[1], "51.2", "61.0", "", "", "5.0", f"model_final.pth {sha_b}", "", rows[2][-1]],
    ]
    assert rows[1][7].endswith(_sha(os.path.join(folders[0], "model_final.pth"))[:10])
    bad = _compare(folders[0], str(tmp_path))
    assert bad.returncode == 2 and f"{tmp_path}: no metrics_all.json" in bad.stderr


def test_plot_loss_curve_reads_training_lines_only(tmp_path) -> None:
    import cv2
    from flowseg.engine.loss_curve import plot_loss_curve, read_training_log

    lines = [
        {"iteration": i, "total_loss": 10.0 / (i + 1), "loss_ce": 1.0, "loss_ce_0": 2.0, "lr": 0.1}
        for i in range(5)
    ]
    lines.insert(2, {"iteration": 3, "test/referring/cIoU": 12.0})  # an evaluation line
    lines.append({"iteration": 4, "total_loss": 0.5, "loss_ce": 0.25})  # resumed: repeated iteration
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 5, "tot')  # cut line
    assert read_training_log(str(path))[4]["total_loss"] == 0.5 and sorted(read_training_log(str(path))) == [
        0,
        1,
        2,
        3,
        4,
    ]
    keys = plot_loss_curve(str(path), str(tmp_path / "curve.png"))
    assert keys == ["total_loss", "loss_ce"]  # intermediate decoder layers (loss_ce_0) left out
    assert cv2.imread(str(tmp_path / "curve.png")).shape == (450, 800, 3)
    (tmp_path / "empty.json").write_text(json.dumps({"iteration": 0, "x/cIoU": 1.0}))
    assert plot_loss_curve(str(tmp_path / "empty.json"), str(tmp_path / "none.png")) == []
    assert not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_training_writes_loss_curve_and_plain_log(d2_root: str, tmp_path) -> None:  # noqa: F811
    out = str(tmp_path / "train")
    opts = [
        "DATASETS.TRAIN", "('test_tn_train',)", "DATASETS.TEST", "()", "OUTPUT_DIR", out,
        "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 0,
    ]  # fmt: skip
    train_net.main(_args(opts))
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 10_000
    log = open(os.path.join(out, "log.txt")).read()
    assert "Running with full config" in log and "\x1b[" not in log
    # --eval-only --resume evaluates OUTPUT_DIR's last checkpoint: that file is named
    train_net.main(_args(opts + ["DATASETS.TEST", "('test_tn_train',)"], eval_only=True, resume=True))
    run = json.load(open(os.path.join(out, "metrics_all.json")))["run"]
    final = os.path.join(out, "model_final.pth")
    assert run["weights"] == final and run["weights_sha256"] == _sha(final)
