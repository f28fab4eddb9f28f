"""``tools/benchmark.py``: the tiny run works end to end on CPU and its parameter deltas are exact
(the paper-size counts of Table 9 are tests/test_param_counts.py)."""

import json
import os

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from repo_scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    module = load_script("tools/benchmark.py")
    return module


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_tiny_benchmark_runs_and_reports_exact_deltas(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--k",
        "2",
        "--image-size",
        "64",
        "96",
    ]
    result = bench.main(argv + ["--train-batch", "1", "--train-reps", "1", "--output", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["deltas"] == result["deltas"]

    # The two models, built here from the tiny config with the switches of each variant.
    llm = make_tiny_llm_dir(tmp_path / "llm")
    models = {}
    for name, on in (("baseline", False), ("flowseg", True)):
        cfg = get_cfg()
        add_flowseg_config(cfg)
        cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml"))
        cfg.merge_from_list(tiny_llm_cfg_overrides(llm))
        cfg.merge_from_list(
            ["MODEL.FLOWSEG.SEMANTIC_REFINEMENT", on, "MODEL.FLOWSEG.CONDITION_REFINEMENT", on]
            + ["MODEL.FLOWSEG.BAR.ENABLED", on]
        )
        models[name] = build_model(cfg)
    base, flow = models["baseline"], models["flowseg"]
    bsf = _count(flow.sem_seg_head.predictor) - _count(base.sem_seg_head.predictor)
    assert bsf > 0 and result["deltas"]["bsf_params"] == bsf
    # Table 9's total leaves BAR out (reported alone); the models differ by BSF + BAR
    assert _count(flow) - _count(base) == bsf + _count(flow.refiner)
    assert result["deltas"]["total_params"] == bsf and result["deltas"]["bar_params"] == _count(flow.refiner)
    assert f"+{bsf / 1e6:.2f}M ({bsf:,})" in printed and "| Latency (ms/sample) |" in printed

    for variant in ("baseline", "flowseg"):
        r = result[variant]
        assert r["inference"]["ms"] > 0 and r["inference"]["peak_memory_bytes"] is None  # CPU
        assert r["train"]["batch"] == 1 and r["train"]["ms"] > 0 and not r["train"].get("oom")
        flops = r["flops"]
        assert "error" not in flops, flops
        # attention is counted (fvcore has no rule for SDPA: the tool adds one) ...
        assert flops["by_operator"]["scaled_dot_product_attention"] > 0
        assert not {"aten::scaled_dot_product_attention", "aten::_convolution_mode"} & set(
            flops["not_counted_ops"]
        )
        comps = flops["by_component"]
        assert comps["segmentation encoder (SAM-ViT)"] > 0 and comps["LLM"] > 0
        assert sum(comps.values()) <= flops["gflops"] + 1e-9
        shared = r["shared_eval"]
        assert shared["k"] == 2
        for key in ("per_expression", "shared_encoders", "shared_encoders_and_llm_prefix"):
            assert shared[key]["ms_per_expression"] > 0
    # ... and BSF adds decoder compute, BAR a little more
    decoder = "transformer decoder (BSF)"
    assert (
        result["flowseg"]["flops"]["by_component"][decoder]
        > result["baseline"]["flops"]["by_component"][decoder]
    )
    assert (
        result["baseline"]["flops"]["by_component"]["BAR"]
        == 0
        < result["flowseg"]["flops"]["by_component"]["BAR"]
    )


def test_meta_flop_count_equals_the_count_of_a_real_run(bench, tmp_path):
    """Table 9's GFLOPs at paper size are counted on the meta device (``--flops-on-meta``); on the tiny
    model that count equals FlopCounterMode's over a real CPU forward, per component."""
    import argparse

    import torch
    from bench.flops import OUTSIDE, meta_flop_count
    from bench.measure import eval_inputs
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    args = argparse.Namespace(tiny=True, dtype="float32", device="cpu", sam_act_checkpoint=False)
    files = bench.write_model_files(str(tmp_path), True, "patch14-384")
    x = eval_inputs(1, (96, 128), (60, 80))
    outside = {}
    for variant in ("baseline", "flowseg"):
        cfg = bench.build_config(variant, args, files)
        real = bench.build(cfg, "cpu").eval()
        counter = FlopCounterMode(display=False)
        # the math backend: FlopCounterMode has no rule for the CPU's fused SDPA kernel (it would
        # count attention as 0); on meta, SDPA decomposes into the same matrix products
        with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
            real(x)
        cfg.MODEL.DEVICE = "meta"
        got = meta_flop_count(bench.build(cfg, "meta"), x)
        assert got["gflops"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9), variant
        counts = counter.get_flop_counts()
        for name, gflops in got["by_component"].items():
            if name != OUTSIDE and name != "LLM":  # the LLM is recorded through its layers
                module = {"transformer decoder (BSF)": "sem_seg_head.predictor"}.get(name)
                if module is not None:
                    assert gflops * 1e9 == sum(counts[f"FlowSeg.{module}"].values())
        assert got["by_component"]["LLM"] > 0 and got["llm_sequence_length"] > 16
        outside[variant] = got["by_component"][OUTSIDE]
        layers = got["decoder_layers_gflops"]
        assert len(layers) == cfg.MODEL.MASK_FORMER.DEC_LAYERS
        assert all((layer["bsf"] > 0) == (variant == "flowseg") for layer in layers)
    assert outside["flowseg"] > outside["baseline"]  # BAR's functional convolutions
