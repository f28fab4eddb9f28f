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
    monkeypatch.setattr(tool, "PROGRESS", tool.JobProgress({}))
    tool.start_progress(args)
    tool.log("4a/6 stage 1")
    lines = (tmp_path / "main_job.log").read_text().splitlines()
    assert "training iterations per stage: {'stage1': 2400, 'stage3': 70}" in lines[1]
    assert lines[2].endswith("s] 4a/6 stage 1")
