"""``demo/demo.py`` on a tiny untrained referring model: pictures for a file and for a folder,
several expressions in their own colours with a legend, output names that do not collide, the
"no target" warning, and a clear error (exit status 1) for each bad input."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from flowseg.utils.inference import build_cfg
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from flowseg.utils.visualize import FILL_ALPHA
from pycocotools import mask as mask_utils
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


def _main(env, *, inp, out, expression="the red box", weights=None, config=CONFIG, extra=()):
    expressions = [expression] if isinstance(expression, str) else list(expression)
    argv = [
        "--config-file",
        config,
        "--weights",
        weights or env["weights"],
        "--input",
        str(inp),
        *[a for e in expressions for a in ("--expression", e)],
        "--output",
        str(out),
        *extra,
        "--opts",
        *env["opts"],
    ]
    return demo.main(argv)


def _outputs(folder, ext=".png"):
    return sorted(f for f in os.listdir(folder) if f.endswith(ext) and ".mask" not in f)


def test_demo_single_image_and_folder(env, capsys):
    out = env["tmp"] / "out_single"
    assert _main(env, inp=env["folder"] / "a.jpg", out=out, extra=["--scale", "1"]) == 0
    (name,) = _outputs(out)
    assert name.startswith("a-jpg-")
    pic = cv2.imread(str(out / name))
    # at --scale 1 the overlay keeps the image's width and adds the legend below it
    assert pic is not None and pic.shape[1] == 64 and pic.shape[0] > 48
    assert "score" in capsys.readouterr().out

    out = env["tmp"] / "out_folder"
    assert _main(env, inp=env["folder"], out=out) == 0
    names = _outputs(out)
    assert [n.split("-")[0] for n in names] == ["a", "b"]  # the .txt file is skipped
    # a small picture is enlarged: 640 px on its long side (b.png is 80 x 60)
    assert cv2.imread(str(out / names[1])).shape[1] == 480


def _answers(folder):
    (name,) = _outputs(folder, ".json")
    with open(folder / name, encoding="utf-8") as f:
        return name, json.load(f)["answers"]


def test_demo_draws_every_expression_and_span_in_its_own_colour(env):
    out = env["tmp"] / "out_two"
    spans = "<p>the red box</p> and <p>the grey floor</p>"
    assert _main(env, inp=env["folder"] / "a.jpg", out=out, expression=[spans, "the top left corner"]) == 0
    name, answers = _answers(out)
    assert [a["expression"] for a in answers] == ["the red box", "the grey floor", "the top left corner"]
    assert len({tuple(a["color_rgb"]) for a in answers}) == 3
    image = cv2.cvtColor(cv2.imread(str(env["folder"] / "a.jpg")), cv2.COLOR_BGR2RGB).astype(float)
    pic = cv2.cvtColor(cv2.imread(str(out / name.replace(".json", ".png"))), cv2.COLOR_BGR2RGB)
    scale = pic.shape[1] / image.shape[1]
    big = cv2.resize(
        image, (pic.shape[1], int(round(image.shape[0] * scale))), interpolation=cv2.INTER_LINEAR
    )
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in answers]
    legend = pic[big.shape[0] :].reshape(-1, 3).astype(int)
    for i, (a, m) in enumerate(zip(answers, masks)):
        # the legend (below the picture) shows each answer's colour
        assert (np.abs(legend - a["color_rgb"]).max(axis=1) == 0).sum() > 20
        only = m & ~np.any([masks[j] for j in range(len(masks)) if j > i] or [np.zeros_like(m)], axis=0)
        if not only.any():
            continue
        # the untrained model's masks are specks: each drawn speck is its colour (outline) or the
        # colour blended into the image (fill), nowhere the plain image
        big_mask = cv2.resize(
            only.astype(np.uint8), (pic.shape[1], big.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        drawn = pic[: big.shape[0]][big_mask.astype(bool)].astype(float)
        plain = big[big_mask.astype(bool)]
        fill = (1 - FILL_ALPHA) * plain + FILL_ALPHA * np.array(a["color_rgb"], float)
        is_fill = np.abs(drawn - fill).max(axis=1) <= 3
        is_line = np.abs(drawn - a["color_rgb"]).max(axis=1) <= 1
        assert (is_fill | is_line).sum() > 0.3 * len(drawn)
        assert (np.abs(drawn - plain).max(axis=1) > 10).mean() > 0.9


def test_demo_output_names_do_not_collide(env, tmp_path):
    folder = tmp_path / "same_stem"
    folder.mkdir()
    _image(folder / "a.jpg", 48, 64, 0)
    _image(folder / "a.png", 48, 64, 1)
    out = tmp_path / "out"
    assert _main(env, inp=folder, out=out) == 0
    first = _outputs(out)
    assert len(first) == 2 and {n.split("-")[1] for n in first} == {"jpg", "png"}
    assert _main(env, inp=folder / "a.jpg", out=out, expression="the grey floor") == 0
    assert len(_outputs(out)) == 3 and set(first) <= set(_outputs(out))  # other expressions: a new file


def test_demo_rejects_an_empty_image_array(env):
    cfg = demo.setup_cfg(CONFIG, env["weights"], env["opts"])
    model = demo.ReferringDemo(cfg)
    for bad, message in [
        (np.zeros((0, 0, 3), np.uint8), "the image is empty (0x0 pixels)"),
        (np.zeros((5, 0, 3), np.uint8), "the image is empty (5x0 pixels)"),
        (np.zeros((8, 8), np.uint8), "HxWx3 uint8 array, got a uint8 array of shape (8, 8)"),
    ]:
        with pytest.raises(demo.DemoError) as e:
            model(bad, "the red box")
        assert message in str(e.value)


def test_demo_warns_when_no_target_but_writes_the_picture(env, capsys):
    out = env["tmp"] / "out_empty"
    assert _main(env, inp=env["folder"] / "a.jpg", out=out, weights=env["empty_weights"]) == 0
    assert "no target found for 'the red box'" in capsys.readouterr().err
    assert len(_outputs(out)) == 1


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "input image not found"),
        ("unreadable_image", "cannot read image"),
        ("empty_folder", "no image files"),
        ("missing_checkpoint", "checkpoint file not found"),
        ("empty_expression", "the expression is empty"),
        ("seg_expression", "expression '<SEG>' contains the special token(s) <SEG> "),
        ("image_expression", "expression 'the <image> red circle' contains the special token(s) <image> "),
        ("generic_config", "not in referring mode"),
        ("config_without_llm", "needs a language model: set MODEL.LLM.PATH"),
        ("unbalanced_span", "unbalanced phrase markers"),
        ("not_yaml", "is not a YAML config"),
        ("unknown_key", "Non-existent config key: MODEL.NOT_A_KEY"),
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
    elif case == "config_without_llm":  # a config whose LLM files are not given: no traceback
        kwargs["config"] = os.path.join(ROOT, "configs", "synthetic", "flowseg_synthref_cpu.yaml")
    elif case == "not_yaml":
        kwargs["config"] = os.path.join(ROOT, "README.md")
    elif case == "unknown_key":
        kwargs["config"] = str(tmp_path / "bad.yaml")
        (tmp_path / "bad.yaml").write_text("MODEL:\n  NOT_A_KEY: 3\n")
    elif case == "unbalanced_span":
        kwargs["expression"] = ["the red box", "<p>the grey floor"]
    if case == "config_without_llm":
        assert (
            demo.main(
                [
                    "--config-file",
                    kwargs["config"],
                    "--input",
                    str(kwargs["inp"]),
                    "--expression",
                    "x",
                    "--output",
                    str(kwargs["out"]),
                ]
            )
            == 1
        )
    else:
        assert _main(env, **kwargs) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    if case in ("missing_image", "unreadable_image"):
        assert str(kwargs["inp"]) in err
    if case == "missing_checkpoint":
        assert "missing.pth" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_demo_gres_and_generic_tasks(env, tmp_path):
    out = tmp_path / "gres"
    assert (
        _main(
            env,
            inp=env["folder"] / "a.jpg",
            out=out,
            expression=["the red box", "a unicorn"],
            extra=["--task", "gres"],
        )
        == 0
    )
    _, answers = _answers(out)
    assert [a["expression"] for a in answers] == ["the red box", "a unicorn"]
    assert all(isinstance(a["no_target"], bool) for a in answers)
    assert all(a["area"] == 0 for a in answers if a["no_target"])  # "no target": an empty mask

    cfg = demo.setup_cfg(CONFIG, env["weights"], env["opts"])
    model = demo.ReferringDemo(cfg)
    image = cv2.imread(str(env["folder"] / "a.jpg"))[..., ::-1].copy()
    results = model.predict(image, ["the red box", "<p>the floor</p> and <p>the wall</p>"])
    assert [r.text for r in results] == ["the red box", "the floor", "the wall"]
    assert (model.inference.images_encoded, model.inference.expressions) == (1, 2)  # one image encoding

    names = ["box", "floor", "circle"]
    found = model.predict(image, names, "generic")
    assert all(r.text in names and r.mask.any() and r.score >= 0.5 for r in found)
    with pytest.raises(demo.DemoError, match="take no <p></p> markers"):
        model.predict(image, ["<p>box</p>"], "generic")
