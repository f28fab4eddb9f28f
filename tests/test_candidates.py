"""``TEST.RETURN_CANDIDATES``: referring inference returns every query's mask only on request, the
selection does not depend on it, and ``tools/candidates_cost.py`` measures what it costs."""

import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from repo_scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(tmp_path, *opts):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/tiny/flowseg_refer_tiny.yaml"))
    cfg.merge_from_list([*tiny_llm_cfg_overrides(make_tiny_llm_dir(tmp_path / "llm")), *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _input(h, w, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
    return {"image": image, "expression": "the red circle", "task": "referring", **kw}


def test_paper_configs_default_off_and_selection_independent_of_candidates(tmp_path):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    assert cfg.TEST.RETURN_CANDIDATES is False
    model = _model(tmp_path, "TEST.RETURN_CANDIDATES", False)
    assert model.return_candidates is False
    x = _input(96, 128, height=150, width=200)
    with torch.no_grad():
        off = model([x])[0]["ref_seg"]
        model.return_candidates = True
        on = model([x])[0]["ref_seg"]
    assert "candidates" not in off
    assert on["candidates"].shape == (model.num_queries, 150, 200)
    assert torch.equal(on["mask"], off["mask"]) and on["query"] == off["query"]
    assert on["score"] == off["score"]
    assert torch.equal(on["candidates"][on["query"]], off["mask"])


def test_candidates_cost_tool_measures_the_candidate_memory(tmp_path):
    tool = load_script("tools/candidates_cost.py")
    model = _model(tmp_path, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 200)
    x = _input(96, 128, height=512, width=512)
    res = tool.measure_modes(model, [x], reps=1, device=torch.device("cpu"))
    assert model.return_candidates is True  # the tiny config's setting is restored
    assert res["off"]["reps"] == res["on"]["reps"] == 1
    # on: 200 x 512^2 float logits (200 MB) before thresholding; off: one mask
    extra = res["on"]["peak_extra_rss_bytes"] - res["off"]["peak_extra_rss_bytes"]
    assert extra > 150e6, res
