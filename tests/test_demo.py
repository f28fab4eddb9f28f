"""``demo/demo.py`` on a tiny untrained referring model: pictures for a file and for a folder,
the "no target" warning, and a clear error (exit status 1) for each bad input."""

import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from flowseg.utils.inference import build_cfg
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from repo_scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")
GENERIC_CONFIG = os.path.join(ROOT, "configs", "tiny", "flowseg_coco_panoptic_tiny.yaml")

demo = load_script("demo/demo.py")


def _image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)  # one coloured box
    cv2.imwrite(str(path), img)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    opts = [str(o) for o in tiny_llm_cfg_overrides(make_tiny_llm_dir(tmp / "llm"))]
    opts += ["MODEL.LLM.LORA.ENABLED", "False"]
    cfg = build_cfg(CONFIG, opts=opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp)).save("tiny")
    # A model whose mask embeddings are all zero: every mask logit is 0, so nothing is selected.
    with torch.no_grad():
        last = model.sem_seg_head.predictor.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
    DetectionCheckpointer(model, save_dir=str(tmp)).save("empty_masks")
    folder = tmp / "images"
    folder.mkdir()
    _image(folder / "a.jpg", 48, 64, 0)
    _image(folder / "b.png", 80, 60, 1)
    (folder / "notes.txt").write_text("not an image")
    return {
        "tmp": tmp,
        "opts": opts,
        "weights": str(tmp / "tiny.pth"),
        "empty_weights": str(tmp / "empty_masks.pth"),
        "folder": folder,
    }


def _main(env, *, inp, out, expression="the red box", weights=None, config=CONFIG):
    argv = [
        "--config-file",
        config,
        "--weights",
        weights or env["weights"],
        "--input",
        str(inp),
        "--expression",
        expression,
        "--output",
        str(out),
        "--opts",
        *env["opts"],
    ]
    return demo.main(argv)


def test_demo_single_image_and_folder(env, capsys):
    out = env["tmp"] / "out_single"
    assert _main(env, inp=env["folder"] / "a.jpg", out=out) == 0
    pic = cv2.imread(str(out / "a.png"))
    # the overlay keeps the image's width and adds a caption strip below it
    assert pic is not None and pic.shape[1] == 64 and pic.shape[0] > 48
    assert "score" in capsys.readouterr().out

    out = env["tmp"] / "out_folder"
    assert _main(env, inp=env["folder"], out=out) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]  # the .txt file is skipped
    assert cv2.imread(str(out / "b.png")).shape[1] == 60


def test_demo_warns_when_no_target_but_writes_the_picture(env, capsys):
    out = env["tmp"] / "out_empty"
    assert _main(env, inp=env["folder"] / "a.jpg", out=out, weights=env["empty_weights"]) == 0
    assert "no target found for 'the red box'" in capsys.readouterr().err
    assert (out / "a.png").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "input image not found"),
        ("unreadable_image", "cannot read image"),
        ("empty_folder", "no image files"),
        ("missing_checkpoint", "checkpoint file not found"),
        ("empty_expression", "the expression is empty"),
        ("seg_expression", "--expression: expression '<SEG>' contains the special token(s) <SEG> "),
        ("image_expression", "expression 'the <image> red circle' contains the special token(s) <image> "),
        ("generic_config", "not in referring mode"),
    ],
)
def test_demo_errors_name_the_problem(env, tmp_path, capsys, case, message):
    kwargs = {"inp": env["folder"] / "a.jpg", "out": tmp_path / "out"}
    if case == "missing_image":
        kwargs["inp"] = tmp_path / "nope.jpg"
    elif case == "unreadable_image":
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"this is not a jpeg")
        kwargs["inp"] = bad
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        kwargs["inp"] = tmp_path / "empty"
    elif case == "missing_checkpoint":
        kwargs["weights"] = str(tmp_path / "missing.pth")
    elif case == "empty_expression":
        kwargs["expression"] = "   "
    elif case == "seg_expression":
        kwargs["expression"] = "<SEG>"
    elif case == "image_expression":
        kwargs["expression"] = "the <image> red circle"
    elif case == "generic_config":
        kwargs["config"] = GENERIC_CONFIG
    assert _main(env, **kwargs) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    if case in ("missing_image", "unreadable_image"):
        assert str(kwargs["inp"]) in err
    if case == "missing_checkpoint":
        assert "missing.pth" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
