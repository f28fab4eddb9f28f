"""GPU acceptance run (``tools/gpu_acceptance.py``): its CPU dry version at the tiny sizes."""

import json

from repo_scripts import load_script


def test_dry_acceptance_run_writes_one_json(tmp_path):
    out = tmp_path / "acceptance.json"
    res = load_script("tools/gpu_acceptance.py").main(["--dry", "--output", str(out)])
    assert json.loads(out.read_text())["ok"] is True and res["ok"]
    assert res["cuda_tests"]["returncode"] == 0 and "tests/test_pixel_decoder.py" in res["cuda_tests"]["files"]
    assert "collected" in res["cuda_tests"]["summary"]
    steps = res["train_steps"]
    assert set(steps) == {"configs/tiny/flowseg_refer_tiny.yaml", "configs/tiny/stage3_tiny.yaml"}
    assert all(s["finite"] and s["loss"] > 0 and s["trainable"] > 0 for s in steps.values())
    assert set(res["table9"]) == {"baseline", "flowseg"} and res["table9"]["flowseg"]["ms"] > 0


def test_sharded_engine_flag_trains_a_step_under_fsdp2(tmp_path):
    tool = load_script("tools/gpu_acceptance.py")
    res = tool.main(
        ["--dry", "--engine", "fsdp", "--skip-tests", "--skip-benchmark", "--configs",
         "configs/tiny/flowseg_refer_tiny.yaml", "--output", str(tmp_path / "a.json")]
    )  # fmt: skip
    step = res["train_steps"]["configs/tiny/flowseg_refer_tiny.yaml"]
    assert "error" not in step and step["finite"] and step["loss"] > 0 and res["ok"] is True
