"""X-SAM's stage-1 segmentor checkpoint (tiny, X-SAM's names; fixture made by X-SAM's own code) gives
FlowSeg's stage-1 model X-SAM's outputs, and through ``train_net.py --eval-only`` on the fixture's
3-image COCO-panoptic folder X-SAM's PQ (13.70)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer
from flowseg.checkpoint.xsam import to_older_generation
from flowseg.data.build import build_test_mapper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DATASET = "xsam_tiny_coco_panoptic_val"


def load_stage1() -> dict:
    return torch.load(FIXTURES / "xsam_tiny_stage1.pt", map_location="cpu", weights_only=True)


def stage1_opts() -> list:
    """Config overrides: the paper's stage-1 config at the fixture's sizes."""
    meta = json.loads((FIXTURES / "xsam_tiny_stage1.json").read_text())["configs"]
    sam, m2f = meta["sam_vision"], meta["mask2former"]
    num_classes = len(load_stage1()["coco_panoptic"]["categories"])
    # fmt: off
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.SAM_VIT.PRESET", "tiny",
        "MODEL.SAM_VIT.IMG_SIZE", sam["image_size"],
        "MODEL.SAM_VIT.PATCH_SIZE", sam["patch_size"],
        "MODEL.SAM_VIT.EMBED_DIM", sam["hidden_size"],
        "MODEL.SAM_VIT.DEPTH", sam["num_hidden_layers"],
        "MODEL.SAM_VIT.NUM_HEADS", sam["num_attention_heads"],
        "MODEL.SAM_VIT.GLOBAL_ATTN_INDEXES", list(sam["global_attn_indexes"]),
        "MODEL.SAM_VIT.WINDOW_SIZE", sam["window_size"],
        "MODEL.SAM_VIT.MLP_RATIO", sam["mlp_dim"] / sam["hidden_size"],
        "MODEL.SAM_VIT.OUT_CHANNELS", sam["output_channels"],
        "MODEL.SAM_VIT.SQUARE_PAD", sam["image_size"],
        "MODEL.SAM_VIT.CONNECTOR.HIDDEN_DIM", meta["seg_connector"]["hidden_channels"],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", m2f["feature_size"],
        "MODEL.SEM_SEG_HEAD.MASK_DIM", m2f["mask_feature_size"],
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", m2f["encoder_layers"],
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", m2f["num_attention_heads"],
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD", m2f["encoder_feedforward_dim"],
        "MODEL.MASK_FORMER.HIDDEN_DIM", m2f["hidden_dim"],
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", m2f["num_queries"],
        "MODEL.MASK_FORMER.NHEADS", m2f["num_attention_heads"],
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", m2f["dim_feedforward"],
        "MODEL.MASK_FORMER.DEC_LAYERS", m2f["decoder_layers"] - 1,
        "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
        "MODEL.FLOWSEG.BAR.ENABLED", False,
        "INPUT.IMAGE_SIZE", sam["image_size"],
        "DATASETS.TEST", f"('{DATASET}',)",
        "DATALOADER.NUM_WORKERS", 0,
    ]
    # fmt: on


def write_coco_layout(fx: dict, root: Path) -> Path:
    """The fixture's folder in COCO's layout under ``root`` (a ``$DETECTRON2_DATASETS``)."""
    coco = root / "coco"
    for rel, data in fx["dataset_files"].items():
        folder, name = rel.split("/", 1) if "/" in rel else ("", rel)
        target = {
            "images": coco / "val2017",
            "panoptic": coco / "panoptic_val2017",
            "": coco / "annotations",
        }[folder]
        target.mkdir(parents=True, exist_ok=True)
        path = target / ("panoptic_val2017.json" if name == "panoptic_val.json" else name)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return coco


REGISTER = """
import json, os, runpy, sys
from flowseg.data.datasets.coco_panoptic import coco_panoptic_metadata, register_coco_panoptic_dataset
coco = os.path.join(os.environ["DETECTRON2_DATASETS"], "coco")
pan_json = os.path.join(coco, "annotations", "panoptic_val2017.json")
categories = json.load(open(pan_json))["categories"]
register_coco_panoptic_dataset(
    sys.argv[1], coco_panoptic_metadata(categories), os.path.join(coco, "val2017"),
    os.path.join(coco, "panoptic_val2017"), pan_json,
)
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("generation", ["current", "older"])
def test_stage1_checkpoint_gives_xsam_outputs(generation, tmp_path):
    fx = load_stage1()
    state_dict = fx["state_dict"] if generation == "current" else to_older_generation(fx["state_dict"])
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "flowseg_coco_panoptic.yaml"))
    cfg.merge_from_list(stage1_opts())
    model = build_model(cfg).eval()
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.load(str(tmp_path / "pytorch_model.bin"))
    report = ckpt.last_report
    assert report.source_format == f"xsam ({generation} key names)"
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    assert not report.missing_expected and report.num_loaded == report.num_model_keys
    for image in fx["outputs"]["per_image"]:
        pixels = image["extra_pixel_values"].reshape(1, 3, *image["extra_pixel_values"].shape[-2:])
        with torch.no_grad():
            outputs = model.sem_seg_head(model.backbone(pixels))
        torch.testing.assert_close(outputs["pred_logits"], image["class_queries_logits"], rtol=0, atol=1e-4)
        torch.testing.assert_close(outputs["pred_masks"], image["mask_logits_lowres"], rtol=0, atol=1e-4)


def test_stage1_panoptic_segments_equal_xsam(tmp_path):
    """FlowSeg's test mapper and panoptic merge (``PANOPTIC_MERGE "xsam"``) on the fixture's images
    give X-SAM's SAM input and X-SAM's segments, pixel for pixel; Mask2Former's own merge does not."""
    fx = load_stage1()
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "flowseg_coco_panoptic.yaml"))
    cfg.merge_from_list(stage1_opts())
    test = cfg.MODEL.MASK_FORMER.TEST  # the paper config evaluates with X-SAM's post-processing
    assert (test.OBJECT_MASK_THRESHOLD, test.OVERLAP_THRESHOLD, test.PANOPTIC_MERGE) == (0.5, 0.8, "xsam")
    model = build_model(cfg).eval()
    torch.save(fx["state_dict"], tmp_path / "pytorch_model.bin")
    FlowSegCheckpointer(model, cfg=cfg).load(str(tmp_path / "pytorch_model.bin"))
    coco = write_coco_layout(fx, tmp_path)
    mapper = build_test_mapper(cfg, DATASET)
    differing = {}
    for merge in ("xsam", "mask2former"):
        model.panoptic_merge = merge
        differing[merge] = 0
        for image, xsam in zip(fx["coco_panoptic"]["images"], fx["outputs"]["per_image"]):
            x = mapper({"file_name": str(coco / "val2017" / image["file_name"]), "image_id": image["id"],
                        "height": image["height"], "width": image["width"]})  # fmt: skip
            sam_input = model.preprocess_image([x]).tensor
            torch.testing.assert_close(
                sam_input, xsam["extra_pixel_values"].reshape(sam_input.shape), rtol=0, atol=1e-5
            )
            with torch.no_grad():
                seg, segments = model([x])[0]["panoptic_seg"]
            ours = _category_map(seg, segments)
            theirs = _category_map(torch.as_tensor(xsam["segmentation"]), xsam["segments_info"])
            differing[merge] += int((ours != theirs).sum())
            if merge == "xsam":
                assert sorted((s["category_id"], int((seg == s["id"]).sum())) for s in segments) == sorted(
                    (s["category_id"], s["area"]) for s in xsam["segments_info"]
                )
    assert differing["xsam"] == 0 and differing["mask2former"] > 0


def _category_map(seg: torch.Tensor, segments: list) -> torch.Tensor:
    out = torch.full(seg.shape, -1, dtype=torch.long)
    for s in segments:
        out[seg == s["id"]] = s["category_id"]
    return out


@pytest.mark.slow
def test_stage1_eval_only_gives_xsam_pq(tmp_path):
    fx = load_stage1()
    root = tmp_path / "datasets"
    write_coco_layout(fx, root)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(to_older_generation(fx["state_dict"]), weights)  # the released files' key names
    launcher = tmp_path / "register_and_run.py"
    launcher.write_text(REGISTER)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(launcher), DATASET, str(ROOT / "projects" / "FlowSeg" / "train_net.py"),
        "--eval-only", "--config-file", str(ROOT / "configs" / "flowseg_coco_panoptic.yaml"),
        *map(str, stage1_opts()), "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    env = {**os.environ, "DETECTRON2_DATASETS": str(root)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / f"metrics_{DATASET}.json").read_text())
    pq = metrics["metrics"]["panoptic_seg"]
    xsam = fx["xsam_pq"]
    assert pq["PQ"] == pytest.approx(100 * xsam["All"]["pq"], abs=1e-6)
    assert pq["SQ"] == pytest.approx(100 * xsam["All"]["sq"], abs=1e-6)
    assert pq["RQ"] == pytest.approx(100 * xsam["All"]["rq"], abs=1e-6)
    assert pq["PQ_th"] == pytest.approx(100 * xsam["Things"]["pq"], abs=1e-6)
    assert pq["PQ_st"] == pytest.approx(100 * xsam["Stuff"]["pq"], abs=1e-6)
