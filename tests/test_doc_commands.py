"""The commands of README.md, docs/ and the config headers: scripts, flags, paths and config keys
exist (tools/check_doc_commands.py), and the documented CPU commands on synthetic data run."""

import os
import subprocess
import sys

import pytest
from repo_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def checker():
    return load_script("tools/check_doc_commands.py")


def test_every_documented_command_checks_out(checker, capsys):
    cmds = checker.collect_commands()
    sources = {c.source.split(":")[0] for c in cmds}
    assert {"README.md", "docs/getting_started.md", "configs/tiny/flowseg_refer_tiny.yaml"} <= sources
    assert len(cmds) > 80
    assert checker.main([]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    "line, problem",
    [
        ("python tools/no_such_tool.py --x 1", "tools/no_such_tool.py: no such file"),
        ("python tools/main_job.py --stage-1-iters 5", "tools/main_job.py has no option --stage-1-iters"),
        ("bash tools/run_main.sh --no-such-flag", "tools/main_job.py has no option --no-such-flag"),
        ("python tools/analysis/boundary_eval.py --config-file CFG --weightz W", "has no option --weightz"),
        (
            "python projects/FlowSeg/train_net.py --config-file configs/tiny/missing.yaml",
            "configs/tiny/missing.yaml: no such file",
        ),
        (
            "python projects/FlowSeg/train_net.py --config-file configs/tiny/stage1_tiny.yaml MODEL.NO_SUCH_KEY 1",
            "Non-existent key: MODEL.NO_SUCH_KEY",
        ),
        (
            "python tools/main_job.py --set MODEL.SAM_VIT.NO_STEM False",
            "config key MODEL.SAM_VIT.NO_STEM does not exist",
        ),
        (
            "python -c \"from flowseg.data.synthetic import make_everything as g; g('x')\"",
            "flowseg.data.synthetic has no make_everything",
        ),
    ],
)
def test_checker_names_what_is_wrong(checker, line, problem):
    (cmd,) = checker._commands_in_line(line, "doc.md:1")
    problems = checker.check_command(cmd)
    assert any(problem in p for p in problems), problems


def test_commands_are_read_from_code_blocks_spans_and_config_headers(checker, tmp_path):
    cmds = checker._commands_in_line("FOO=1 python tools/x.py --a 1 && bash tools/y.sh  # note", "f:3")
    assert [c.tokens for c in cmds] == [["python", "tools/x.py", "--a", "1"], ["bash", "tools/y.sh"]]
    (sub,) = checker._commands_in_line("python t.py --config-file c.yaml $(cat o/options.txt)", "f:1")
    assert sub.tokens[-1] == "$(cat o/options.txt)" and sub.shell().endswith(" $(cat o/options.txt)")


@pytest.mark.slow
def test_getting_started_cpu_commands_run(checker, tmp_path):
    """The CPU block of docs/getting_started.md, run as written in a folder laid out like a clone
    (training cut to 2 iterations without evaluation)."""
    cmds = [
        c
        for c in checker.collect_commands()
        if c.source.startswith("docs/getting_started.md")
        and ("configs/tiny/" in c.shell() or "make_tiny_llm" in c.shell() or c.tokens[1] == "-c")
    ]
    assert len(cmds) == 4, [c.shell() for c in cmds]
    for d in ("configs", "projects", "tools", "demo"):
        os.symlink(os.path.join(ROOT, d), tmp_path / d)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "projects", "FlowSeg"))
    env.pop("DETECTRON2_DATASETS", None)
    for cmd in cmds:
        line = cmd.shell().replace("python ", f"{sys.executable} ", 1)
        if "train_net.py" in line:
            line += " SOLVER.MAX_ITER 2 DATASETS.TEST '()'"
        proc = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{cmd.source}: {line}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "output" / "tiny_stage1" / "model_final.pth").is_file()
    assert (tmp_path / "output" / "flowseg_refer_tiny" / "loss_curve.png").is_file()
    assert (tmp_path / "datasets" / "synthetic").is_dir()
