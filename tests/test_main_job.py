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


def test_several_refer_test_sets_are_summarised_in_one_table(tool):
    args = tool.parse_args(["--refer-test", "refcoco_unc_val", "refcoco_unc_testA", "refcoco_unc_testB"])
    assert args.refer_test == ["refcoco_unc_val", "refcoco_unc_testA", "refcoco_unc_testB"]
    assert tool.parse_args([]).refer_test == ["synthref_test"]
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
