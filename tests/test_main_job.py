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
