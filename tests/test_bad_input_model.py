"""Bad input that reaches a tiny referring model: empty expressions from Python, an expression
longer than ``MODEL.LLM.MAX_LENGTH`` in an evaluation (``DATALOADER.ON_BAD_SAMPLE``), and the
demo's ``error:`` line for bad markers, checkpoints and devices, its warning for 16-bit images."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from flowseg.data.datasets.refcoco import register_refer_dataset
from flowseg.utils.bad_samples import BadSampleError
from flowseg.utils.inference import build_cfg, load_model
from test_demo import CONFIG, _main, env  # noqa: F401  (env: the demo's tiny model fixture)
from test_refer_data import _write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "FlowSeg"))
import train_net  # noqa: E402


@pytest.fixture(scope="module")
def model(env):  # noqa: F811
    cfg = build_cfg(CONFIG, env["weights"], env["opts"])
    return cfg, load_model(cfg)


@pytest.mark.parametrize("expression", ["", "   ", "<p></p>", "Please segment <p> </p> in this image."])
def test_empty_expression_from_python_is_an_error(model, expression) -> None:
    _, m = model
    x = {"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "height": 32, "width": 32, "ref_id": 7}
    with pytest.raises(BadSampleError, match=r"sample \(ref_id=7\): .*empty"):
        with torch.no_grad():
            m([{**x, "expression": expression, "task": "referring"}])


def _long_sentence_dataset(tmp_path) -> str:
    paths = _write(tmp_path)
    with open(paths["refs"], "rb") as f:
        refs = pickle.load(f)
    refs[0]["sentences"][1]["sent"] = " ".join(["box"] * 700)  # > MODEL.LLM.MAX_LENGTH (512) tokens
    with open(paths["refs"], "wb") as f:
        pickle.dump(refs, f)
    name = f"test_long_{uuid.uuid4().hex[:8]}"
    register_refer_dataset(name, str(tmp_path), "refcoco", "unc", "train")
    return name


def test_too_long_expression_in_evaluation_error_or_skip(model, tmp_path) -> None:
    cfg, m = model
    name = _long_sentence_dataset(tmp_path)
    long_id = DatasetCatalog.get(name)[1]["sent_id"]
    cfg = cfg.clone()
    cfg.DATASETS.TEST = (name,)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    with pytest.raises(BadSampleError, match=rf"ref_id=0.*sent_id={long_id}.*MAX_LENGTH") as e:
        train_net.Trainer.test(cfg, m)
    assert "DATALOADER.ON_BAD_SAMPLE skip" in "".join(getattr(e.value, "__notes__", []))

    cfg.DATALOADER.ON_BAD_SAMPLE = "skip"
    res = train_net.Trainer.test(cfg, m)
    assert res["bad_samples"] == {"skipped": 1}
    assert res["referring"]["num_samples"] == len(DatasetCatalog.get(name)) - 1  # the others are scored
    (skipped,) = json.load(open(tmp_path / "out" / f"skipped_samples_{name}.json"))
    assert skipped["ref_id"] == 0 and skipped["sent_id"] == long_id and "MAX_LENGTH" in skipped["cause"]
    saved = json.load(open(tmp_path / "out" / f"metrics_{name}.json"))["metrics"]
    assert saved["bad_samples"] == {"skipped": 1}


# ------------------------------------------------------------------ the demo
def test_demo_bad_markers_checkpoints_device(env, tmp_path, capsys) -> None:  # noqa: F811
    img = env["folder"] / "a.jpg"
    assert _main(env, inp=img, out=tmp_path / "o", expression="the <p>red box") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unbalanced phrase markers") and "Traceback" not in err

    other = tmp_path / "other.pth"
    other.write_text("MODEL:\n  WEIGHTS: ''\n")
    assert _main(env, inp=img, out=tmp_path / "o", weights=str(other)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{other} is not a checkpoint" in err

    env2 = {**env, "opts": env["opts"] + ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8"]}
    assert _main(env2, inp=img, out=tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "tensors have other shapes" in err and "MODEL.WEIGHTS_PARTIAL_LOAD" in err

    if not torch.cuda.is_available():
        env3 = {**env, "opts": env["opts"] + ["MODEL.DEVICE", "cuda"]}
        assert _main(env3, inp=img, out=tmp_path / "o") == 1
        assert "MODEL.DEVICE is 'cuda'" in capsys.readouterr().err


def test_demo_16_bit_png_is_scaled_with_a_warning(env, tmp_path, caplog) -> None:  # noqa: F811
    png = str(tmp_path / "deep.png")
    cv2.imwrite(png, np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16))
    with caplog.at_level(logging.WARNING):
        assert _main(env, inp=png, out=tmp_path / "o") == 0
    assert any("16-bit image" in r.getMessage() and png in r.getMessage() for r in caplog.records)
