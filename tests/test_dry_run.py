"""Paper-scale dry run (``tools/dry_run.py``): the longest prompt of every paper config fits
``MODEL.LLM.MAX_LENGTH`` (and the old limit is caught), true-size counts on the meta device, and,
in the ``paper_scale`` tier (``pytest -m paper_scale``), one CPU training step and one inference
per paper config at the true widths, token lengths, image size, query and class counts."""

import pytest
from repo_scripts import load_script

STAGE3 = "configs/stages/stage3_joint.yaml"


def _tool():
    return load_script("tools/dry_run.py")


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def files(tool, tmp_path_factory):
    import flowseg  # noqa: F401  (registers the data sets whose class names the prompts list)

    return tool.model_files(str(tmp_path_factory.mktemp("dry")), 0, 0, tool.corpus_texts())


def test_stage3_class_list_prompt_fits_and_the_old_limit_is_caught(tool, files):
    cfg = tool.paper_cfg(STAGE3, files)
    samples = tool.task_samples(cfg)
    assert set(samples) == {"referring", "reasoning", "generic", "conversation"}
    assert len(samples["generic"]["class_names"]) == 133  # COCO-panoptic, all in one prompt
    tokens = tool.check_prompts(cfg, samples)
    assert 4 * 133 < tokens["generic"] <= cfg.MODEL.LLM.MAX_LENGTH, tokens  # >= <p> name </p> , per class
    cfg.MODEL.LLM.MAX_LENGTH = 512  # the value the configs had: stage 3 stops at its first panoptic batch
    with pytest.raises(ValueError, match=r"text tokens > MODEL.LLM.MAX_LENGTH=512"):
        tool.check_prompts(cfg, samples)


def test_every_paper_config_prompt_fits(tool, files):
    for config in tool.PAPER_CONFIGS:
        cfg = tool.paper_cfg(config, files)
        tool.check_prompts(cfg, tool.task_samples(cfg))  # raises with the prompt's length


def test_sam_depth_cut_keeps_relative_block_positions(tool, files):
    cfg = tool.paper_cfg("configs/flowseg_refcoco.yaml", files, sam_depth=2)
    assert cfg.MODEL.SAM_VIT.DEPTH == 2 and list(cfg.MODEL.SAM_VIT.GLOBAL_ATTN_INDEXES) == [1]
    assert list(cfg.MODEL.SAM_VIT.CONNECTOR.LAYERS) == [1, 1, 2]  # blocks 12 / 18 / 24 of 24, 1-indexed
    assert tool._cut_indexes([5, 11, 17, 23], 4, 24) == [0, 1, 2, 3]
    assert tool._cut_indexes([11, 17, 23], 8, 24) == [3, 5, 7]


@pytest.mark.paper_scale
@pytest.mark.parametrize("config", _tool().PAPER_CONFIGS)
def test_paper_config_dry_run(tool, config, tmp_path):
    # float32: a bf16 step takes ~1 hour on CPUs without native bf16 (PyTorch's reference matmul)
    res = tool.dry_run(config, workdir=str(tmp_path), llm_dtype="float32")
    meta, cpu = res["meta"], res["cpu"]
    assert meta["params"]["total"] > 3e8  # true sizes: SAM-L segmentor (+ Qwen3-4B, SigLIP2)
    assert meta["checkpoint_bytes"]["trainable_only"] <= meta["checkpoint_bytes"]["full"]
    assert cpu["train"]["loss"] == cpu["train"]["loss"]  # finite, not NaN
    assert cpu["llm_dtype"] == "float32"
    print(f"\n{config}: {res}")
