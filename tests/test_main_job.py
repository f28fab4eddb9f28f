"""tools/main_job.py: how the stages are launched (processes, threads, options of every stage)."""

import os

import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/main_job.py")


def test_cpu_runs_use_data_parallel_single_thread_processes(tool, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tool.os, "cpu_count", lambda: 8)
    args = tool.parse_args(["--cpu-processes", "2", "--set", "MODEL.SAM_VIT.CONV_STEM", "False", "SEED", "3"])
    train_net, common = tool.launcher(args)
    assert train_net[train_net.index("--num-gpus") + 1] == "2"
    assert os.environ["OMP_NUM_THREADS"] == "4"  # 8 cores / 2 processes
    assert common == ["MODEL.SAM_VIT.CONV_STEM", "False"]  # every stage; SEED stays stage 3's
    assert args.opts == ["SEED", "3"]


def test_gpu_runs_keep_the_thread_setting_and_add_the_device(tool, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    args = tool.parse_args(["--num-gpus", "4", "--cpu-processes", "2"])
    train_net, common = tool.launcher(args)
    assert train_net[train_net.index("--num-gpus") + 1] == "4"
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert common == ["MODEL.DEVICE", "cuda"]


def test_overlays_come_from_several_images(tool):
    dicts = [{"file_name": f"{img}.png", "expression": f"{img}{k}"} for img in "abc" for k in range(3)]
    picked = [d["expression"] for d in tool.overlay_samples(dicts, 5)]
    assert picked == ["a0", "b0", "c0", "a1", "b1"]


def test_stage_plan_and_progress_log_in_the_output_folder(tool, tmp_path, monkeypatch):
    args = tool.parse_args(["--output-dir", str(tmp_path), "--stage1-iters", "300", "--iters", "50"])
    assert tool.stage_plan(args) == {"stage1": 300, "stage2": 600, "stage3": 50}  # stage 2: its config
    args = tool.parse_args(["--output-dir", str(tmp_path), "--stage2-iters", "0", "SOLVER.MAX_ITER", "70"])
    assert tool.stage_plan(args) == {"stage1": 2400, "stage3": 70}
    monkeypatch.setattr(tool, "PROGRESS", None)
    tool.start_progress(args)
    tool.log("4a/6 stage 1")
    lines = (tmp_path / "main_job.log").read_text().splitlines()
    assert "training iterations per stage: {'stage1': 2400, 'stage3': 70}" in lines[1]
    assert lines[2].endswith("s] 4a/6 stage 1")


def test_several_refer_test_sets_are_summarised_in_one_table(tool):
    args = tool.parse_args(["--refer-test", "refcoco_unc_val", "refcoco_unc_testA", "refcoco_unc_testB"])
    assert args.refer_test == ["refcoco_unc_val", "refcoco_unc_testA", "refcoco_unc_testB"]
    assert tool.parse_args([]).refer_test == ["synthref_test"]
    # stage-3 KEY VALUE options may follow the names, as they followed the one name before
    tail = tool.parse_args(["--refer-test", "a_val", "a_testA", "SEED", "3", "SOLVER.BASE_LR", "0.1"])
    assert tail.refer_test == ["a_val", "a_testA"] and tail.opts == ["SEED", "3", "SOLVER.BASE_LR", "0.1"]
    with pytest.raises(SystemExit):
        tool.parse_args(["--refer-test", "SOLVER.BASE_LR", "0.1"])
    metrics = {
        "refcoco_unc_val": {"referring": {"cIoU": 30.14, "gIoU": 28.0, "oracle_cIoU": 72.66}},
        "refcoco_unc_testA": {"referring": {"cIoU": 33.0, "gIoU": 31.25, "oracle_cIoU": None}},
        "refcoco_unc_testB": {"referring": {"cIoU": 25.0, "gIoU": 24.0, "oracle_cIoU": 70.0}},
        "reasonseg_val": {"reasoning": {"cIoU": 12.0, "gIoU": 10.0}},
    }
    summary = tool.held_out_summary(metrics, args.refer_test, "reasonseg_val")
    assert summary["held_out_cIoU"] == 30.14 and summary["oracle_cIoU"] == 72.66  # the first set's
    assert list(summary["held_out"]) == args.refer_test
    assert tool.summary_table(summary) == "\n".join(
        [
            "| data set | cIoU | gIoU | oracle cIoU |",
            "|---|---:|---:|---:|",
            "| refcoco_unc_val | 30.1 | 28.0 | 72.7 |",
            "| refcoco_unc_testA | 33.0 | 31.2 | - |",
            "| refcoco_unc_testB | 25.0 | 24.0 | 70.0 |",
            "| reasonseg_val (reasoning) | 12.0 | 10.0 | - |",
        ]
    )


def test_unregistered_set_names_stop_before_training(tool, monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    args = tool.parse_args(["--refer-test", "refcoco_unc_val", "refcoco_unc_tesA", "--reason-test", ""])
    args.refer_train, args.panoptic_train = "refcoco_unc_train", "coco_2017_train_panoptic_with_sem_seg"
    with pytest.raises(SystemExit, match=r"\['refcoco_unc_tesA'\] are not registered"):
        tool.check_registered(args)
