"""Per-GPU memory plan (``tools/memory_plan.py``, ``tools/bench/memplan.py``): the sharding
arithmetic, and the plan's extrapolation by depth against a measured CPU step."""

import pytest
import torch
from repo_scripts import ROOT, load_script

load_script("tools/memory_plan.py")  # puts tools/ on the path
from bench import memplan  # noqa: E402

IMAGE = 512


def test_sharding_divides_gradients_and_adamw_state_and_full_sharding_the_weights():
    static = {"trainable": 1_000_000_000, "weights_bytes": 4e9, "largest_param_bytes": 1e8}
    kw = dict(gpus=8, batch=2, checkpointing=False, autocast_copies=False)
    ddp = memplan.plan_row(static, 1e9, engine="ddp", **kw)
    zero2 = memplan.plan_row(static, 1e9, engine="zero2", **kw)
    full = memplan.plan_row(static, 1e9, engine="full", **kw)
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.activations) == (4e9, 8e9, 8e9, 2e9)
    assert (zero2.grads, zero2.optimizer) == (0.5e9, 1e9) and zero2.weights == 4e9
    assert full.weights == 0.5e9 + 1e8
    assert ddp.peak == 4e9 + 8e9 + 8e9  # the optimizer step outweighs activations + gradients here
    assert not memplan.plan_row(static, 40e9, engine="ddp", **kw).fits(80)
    with pytest.raises(ValueError, match="engine must be ddp, zero2 or full, got 'deepspeed'"):
        memplan.plan_row(static, 1e9, engine="deepspeed", **kw)


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block():
    acts = memplan.SavedActivations(
        per_block={"llm_layer": 100.0, "sam_window": 50.0},
        inputs={"llm_layer": 10.0, "sam_window": 5.0},
        measured_depths={"llm_layer": 1, "sam_window": 2},
        other=7,
    )
    depths = {"llm_layer": 36, "sam_window": 20}
    assert acts.total() == 7 + 100 + 100
    assert memplan.activation_bytes(acts, depths, ()) == 7 + 3600 + 1000
    assert memplan.activation_bytes(acts, depths, ("llm_layer",)) == 7 + 360 + 1000 + 100


def _tiny_cfg(paths, sam_depth):
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.utils.tiny_models import tiny_llm_cfg_overrides

    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(f"{ROOT}/configs/tiny/stage3_tiny.yaml")
    cfg.merge_from_list(
        tiny_llm_cfg_overrides(paths)
        + ["MODEL.WEIGHTS", "", "MODEL.SAM_VIT.IMG_SIZE", IMAGE, "INPUT.IMAGE_SIZE", IMAGE]
        # a wider SAM-ViT than the tiny preset: its blocks, the part extrapolated by depth, dominate
        + ["MODEL.SAM_VIT.EMBED_DIM", 192, "MODEL.SAM_VIT.NUM_HEADS", 4, "MODEL.SAM_VIT.DEPTH", sam_depth]
        + ["MODEL.SAM_VIT.GLOBAL_ATTN_INDEXES", list(range(1, sam_depth, 2))]
    )
    return cfg


def _step(paths, sam_depth):
    import bench.dry_checks as dry
    from detectron2.modeling import build_model
    from flowseg.engine.freezing import apply_stage_freezing

    cfg = _tiny_cfg(paths, sam_depth)
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_stage_freezing(model, cfg)
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.randint(0, 256, (3, IMAGE, IMAGE), dtype=torch.uint8, generator=g), "image_id": 0}
    x.update(task="referring", expression="the man in the red shirt on the left")
    batch = [dry._with_instances(dict(x, height=IMAGE, width=IMAGE), 1, IMAGE)]
    acts, extra = memplan.measure_step(model, cfg, batch)
    return model, acts, extra


def test_plan_from_a_cut_depth_step_predicts_the_measured_peak_of_a_deeper_one(tmp_path):
    from flowseg.utils.memory import reset_peak_rss
    from flowseg.utils.tiny_models import make_tiny_llm_dir

    if not reset_peak_rss():
        pytest.skip("the kernel does not allow resetting the peak RSS here")
    paths = make_tiny_llm_dir(str(tmp_path))
    cut, acts, extra = _step(paths, sam_depth=2)
    static_cut = memplan.static_bytes(cut)
    working = memplan.working_set(acts, static_cut, extra)
    del cut
    deep, deep_acts, measured = _step(paths, sam_depth=8)
    depths = memplan.depths(deep)
    assert depths["sam_window"] == 4 and depths["sam_global"] == 4
    static = memplan.static_bytes(deep)
    predicted_acts = memplan.activation_bytes(acts, depths, ())
    # saved bytes extrapolate exactly by depth (same widths and tokens per block)
    assert predicted_acts == pytest.approx(deep_acts.total(), rel=0.01)
    row = memplan.plan_row(
        static, predicted_acts, engine="zero2", gpus=1, batch=1, checkpointing=False,
        autocast_copies=False, working_set=working,
    )  # fmt: skip
    predicted = row.peak - row.weights  # the RSS measurement starts with the model built
    print(f"predicted {predicted / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    assert predicted_acts > 1.5 * acts.total()  # depth matters in this case
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 1e6, measured / 1e6)


def test_workers_needed_for_eight_gpus():
    from bench import loader

    # 8 GPUs x 8 samples every 1.2 s = 53.3 samples/s; 5 samples/s per worker -> 11 workers
    assert loader.workers_needed(5.0, 8, 8, 1.2) == 11
    with pytest.raises(ValueError, match=r"step time \(0\) must be positive"):
        loader.workers_needed(5.0, 8, 8, 0)


def test_loader_throughput_of_every_paper_mapper_on_real_format_data(capsys):
    tool = load_script("tools/memory_plan.py")
    args = tool.parse_args(["--configs", "--loader", "--loader-images", "2", "--loader-image-size", "96"])
    args.loader_seconds = 0.3
    rows = tool.loader_report(args)
    assert [r["mapper"] for r in rows] == ["referring", "coco_panoptic_lsj", "reasoning", "conversation"]
    assert all(r["samples"] >= 1 and r["samples_per_s"] > 0 and r["workers_for_8_gpus"] >= 1 for r in rows)
    assert rows[1]["image"] == [3, 1024, 1024]  # LSJ pads to 1024²
    assert "| COCO-panoptic, LSJ 1024² | configs/flowseg_coco_panoptic.yaml |" in capsys.readouterr().out
