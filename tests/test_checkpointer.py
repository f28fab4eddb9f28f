"""FlowSegCheckpointer: bit-identical round trip of a tiny referring FlowSeg with LoRA and new-token
rows, loading across peft layouts, SAM / Mask2Former (Detectron2 and Hugging Face) sources through
MODEL.WEIGHTS, and the load report grouped by component."""

from __future__ import annotations

import logging
import pickle
import re
from typing import Any, Dict, List

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import (
    FlowSegCheckpointer,
    canonical_key,
    convert_hf_mask2former,
    detect_checkpoint_format,
    group_keys_by_component,
)
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from hf_tiny import tiny_hf_mask2former

REFER_TINY = "configs/tiny/flowseg_refer_tiny.yaml"
PANOPTIC_TINY = "configs/tiny/flowseg_coco_panoptic_tiny.yaml"
# stage-1 segmentor as in configs/stages/stage1_segmentor.yaml (BAR arrives in stage 3)
SEGMENTOR = ("MODEL.FLOWSEG.BAR.ENABLED", False)
LOGGER = "flowseg.checkpoint.checkpointer"


@pytest.fixture(scope="module")
def llm_paths(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


def _cfg(config: str, *opts: Any):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    return cfg


def _build(config: str, *opts: Any, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(_cfg(config, *opts))


def _referring(llm_paths: Dict[str, str], *, lora: bool, freeze: bool, seed: int = 0) -> torch.nn.Module:
    opts = tiny_llm_cfg_overrides(llm_paths, lora=lora) + ["MODEL.LLM.FREEZE", freeze]
    return _build(REFER_TINY, *opts, seed=seed)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    # Random init leaves LoRA B at zero and the new-token rows at the mean row: move every tensor so
    # that a tensor that failed to load would change the outputs.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _samples() -> List[Dict[str, Any]]:
    out = []
    for i, text in enumerate(["the red circle", "segment <p>the square</p> and <p>the circle</p>"]):
        g = torch.Generator().manual_seed(i)
        out.append(
            {
                "image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=g),
                "expression": text,
                "task": "referring",
                "height": 96,
                "width": 128,
            }
        )
    return out


def _special_rows(model: torch.nn.Module) -> torch.Tensor:
    head = model.condition_head
    ids = torch.tensor([head.token_ids.p_start, head.token_ids.p_end, head.token_ids.seg])
    with torch.no_grad():
        return head.llm.get_input_embeddings()(ids)


# ----------------------------------------------------------------------------------- unit
def test_group_keys_by_component_and_format_detection() -> None:
    keys = [
        "backbone.net.blocks.0.attn.qkv.weight",
        "backbone.simfp_2.0.weight",
        "sem_seg_head.pixel_decoder.mask_features.weight",
        "sem_seg_head.predictor.transformer_cross_attention_layers.0.norm.weight",
        "sem_seg_head.predictor.semantic_cross_attention_layers.1.multihead_attn.in_proj_weight",
        "sem_seg_head.predictor.fusion_gates.0.weight",
        "sem_seg_head.predictor.condition_refinement_layers.2.norm.bias",
        "sem_seg_head.predictor.logit_scale",
        "sem_seg_head.predictor.cond_query_proj.weight",
        "sem_seg_head.predictor.class_embed.bias",
        "condition_head.llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "condition_head.llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "condition_head.llm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "condition_head.llm.model.norm.weight",
        "condition_head.vis_projector.0.weight",
        "condition_head.llm_projector.2.bias",
        "condition_head.vision_encoder.tower.post_layernorm.weight",
        "refiner.compress.weight",
        "criterion.empty_weight",
    ]
    groups = group_keys_by_component(keys)
    assert list(groups) == [  # COMPONENTS order, non-empty groups only
        "segmentation_encoder",
        "pixel_decoder",
        "transformer_decoder",
        "transformer_decoder.bsf",
        "transformer_decoder.condition_logits",
        "transformer_decoder.class_head",
        "condition_head.llm_base",
        "condition_head.lora",
        "condition_head.token_rows",
        "condition_head.projectors",
        "condition_head.vision_tower",
        "refiner",
        "other",
    ]
    assert len(groups["transformer_decoder.bsf"]) == 3 and len(groups["segmentation_encoder"]) == 2
    assert len(groups["condition_head.llm_base"]) == 2 and groups["other"] == ["criterion.empty_weight"]
    assert sum(map(len, groups.values())) == len(keys)

    # peft wrappers do not change the canonical name of a base tensor
    assert canonical_key(keys[10]) == canonical_key(
        "condition_head.llm.model.layers.0.self_attn.q_proj.weight"
    )
    assert canonical_key(keys[12]) == "condition_head.llm.model.embed_tokens.trainable_tokens_delta.default"

    assert detect_checkpoint_format(keys) == "flowseg"
    assert (
        detect_checkpoint_format(["image_encoder.pos_embed", "prompt_encoder.x", "mask_decoder.y"]) == "sam"
    )
    assert detect_checkpoint_format(["vision_encoder.patch_embed.projection.weight"]) == "sam"
    assert detect_checkpoint_format(["patch_embed.proj.weight", "blocks.0.norm1.weight"]) == "sam"
    assert detect_checkpoint_format(
        ["backbone.res2.0.conv1.weight", "sem_seg_head.predictor.query_feat.weight"]
    ) == ("mask2former_d2")
    assert detect_checkpoint_format(["model.transformer_module.queries_features.weight"]) == "mask2former_hf"


# ----------------------------------------------------------------------------------- round trip
def test_referring_round_trip_is_bit_identical(llm_paths: Dict[str, str], tmp_path) -> None:
    model = _referring(llm_paths, lora=True, freeze=True, seed=0).eval()
    _perturb(model, seed=1)
    FlowSegCheckpointer(model, str(tmp_path)).save("roundtrip")
    path = tmp_path / "roundtrip.pth"
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    groups = group_keys_by_component(saved)
    # the full state dict: LLM base, LoRA, new-token rows, projectors, vision tower, BSF, BAR
    for component in (
        "condition_head.llm_base",
        "condition_head.lora",
        "condition_head.token_rows",
        "condition_head.projectors",
        "condition_head.vision_tower",
        "transformer_decoder.bsf",
        "refiner",
    ):
        assert component in groups, component

    fresh = _referring(llm_paths, lora=True, freeze=True, seed=5).eval()
    inputs = _samples()
    with torch.no_grad():
        before = fresh(inputs)
    rows_before = _special_rows(fresh)
    ckpt = FlowSegCheckpointer(fresh)
    ckpt.load(str(path))
    report = ckpt.last_report
    assert report is not None and report.source_format == "flowseg"
    assert report.clean and not report.missing and not report.dropped
    assert report.num_loaded == report.num_model_keys == len(saved)

    ref_sd, new_sd = model.state_dict(), fresh.state_dict()
    assert list(ref_sd) == list(new_sd)
    for k, v in ref_sd.items():
        assert v.dtype == new_sd[k].dtype and torch.equal(v, new_sd[k]), k

    rows = _special_rows(model)
    assert torch.equal(_special_rows(fresh), rows) and not torch.equal(rows_before, rows)
    with torch.no_grad():
        out_ref, out_new = model(inputs), fresh(inputs)
        images = model.preprocess_image(inputs)
        head_ref, cond_ref = model.run_head(inputs, images)
        head_new, cond_new = fresh.run_head(inputs, images)
    assert torch.equal(head_ref["pred_logits"], head_new["pred_logits"])
    assert torch.equal(head_ref["pred_masks"], head_new["pred_masks"])
    assert torch.equal(cond_ref["conditions"], cond_new["conditions"])
    for a, b in zip(out_ref, out_new):
        assert len(a["ref_segs"]) == len(b["ref_segs"])
        for x, y in zip(a["ref_segs"], b["ref_segs"]):
            assert torch.equal(x["mask"], y["mask"]) and x["score"] == y["score"] and x["query"] == y["query"]
        assert torch.equal(a["ref_seg"]["candidates"], b["ref_seg"]["candidates"])
    # ... and the fresh model really was different before loading
    assert any(
        not torch.equal(c["ref_seg"]["candidates"], a["ref_seg"]["candidates"])
        for a, c in zip(out_ref, before)
    )


def test_load_across_peft_layouts_keeps_token_rows(llm_paths: Dict[str, str], tmp_path, caplog) -> None:
    # plain LLM (no LoRA, not frozen: new-token rows live in the full embedding matrix) -> LoRA model
    plain = _referring(llm_paths, lora=False, freeze=False, seed=0).eval()
    _perturb(plain, seed=2)
    FlowSegCheckpointer(plain, str(tmp_path)).save("plain")
    lora = _referring(llm_paths, lora=True, freeze=True, seed=3).eval()
    ckpt = FlowSegCheckpointer(lora)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ckpt.load(str(tmp_path / "plain.pth"))
    report = ckpt.last_report
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    assert set(report.missing_expected) == {"condition_head.lora"}  # LoRA starts at B = 0
    assert any("renamed between peft layouts" in n for n in report.notes)
    assert any("new-token rows" in n for n in report.notes)
    assert torch.equal(_special_rows(lora), _special_rows(plain))
    plain_sd = {canonical_key(k): v for k, v in plain.state_dict().items()}
    for k, v in lora.state_dict().items():
        if "lora_" not in k and "trainable_tokens" not in k:
            assert torch.equal(v, plain_sd[canonical_key(k)]), k
    # with LoRA B = 0 the function is the plain model's
    inputs = _samples()[:1]
    with torch.no_grad():
        a = plain.run_head(inputs, plain.preprocess_image(inputs))[0]["pred_logits"]
        b = lora.run_head(inputs, lora.preprocess_image(inputs))[0]["pred_logits"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]

    # LoRA model -> plain model: the token rows are merged into the matrix; LoRA has no place (WARNING)
    _perturb(lora, seed=4)
    FlowSegCheckpointer(lora, str(tmp_path)).save("lora")
    plain2 = _referring(llm_paths, lora=False, freeze=False, seed=6)
    ckpt = FlowSegCheckpointer(plain2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ckpt.load(str(tmp_path / "lora.pth"))
    assert torch.equal(_special_rows(plain2), _special_rows(lora))
    assert set(ckpt.last_report.unexpected) == {"condition_head.lora"} and not ckpt.last_report.missing
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "condition head / LoRA: 16 keys" in warnings[0]


# ----------------------------------------------------------------------------------- other sources
def _to_official_sam(backbone_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our tiny backbone's tensors under segment_anything's names (its image_encoder.py), plus the
    prompt encoder / mask decoder a full SAM file has."""
    neck = {"simfp_4.0.weight": "neck.0.weight", "simfp_4.1.weight": "neck.2.weight"}
    neck.update({f"simfp_4.0.norm.{s}": f"neck.1.{s}" for s in ("weight", "bias")})
    neck.update({f"simfp_4.1.norm.{s}": f"neck.3.{s}" for s in ("weight", "bias")})
    out = {}
    for k, v in backbone_sd.items():
        if k in neck:
            out["image_encoder." + neck[k]] = v
        elif k.startswith("net."):
            name = k[4:].replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2")
            if name == "pos_embed":  # SAM: (1, H, W, C)
                side = int(v.shape[1] ** 0.5)
                v = v.reshape(1, side, side, -1)
            out["image_encoder." + name] = v
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    out["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_sam_checkpoint_through_model_weights(tmp_path, suffix: str) -> None:
    source = _build(PANOPTIC_TINY, *SEGMENTOR, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6, seed=0)
    _perturb(source, seed=7)
    sam = _to_official_sam({k: v.clone().contiguous() for k, v in source.backbone.state_dict().items()})
    path = str(tmp_path / f"sam_vit_tiny{suffix}")
    if suffix == ".pth":
        torch.save(sam, path)
    else:
        from safetensors.torch import save_file

        save_file(sam, path)
    model = _build(PANOPTIC_TINY, *SEGMENTOR, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6, seed=1)
    ckpt = FlowSegCheckpointer(model)
    ckpt.load(path)
    report = ckpt.last_report
    assert report.source_format == "sam" and report.clean
    # SAM has the ViT and the neck (= the stride-16 pyramid stage); the rest is expected to be missing
    not_in_sam = [k for k in model.state_dict() if not k.startswith(("backbone.net.", "backbone.simfp_4."))]
    assert report.missing_expected == group_keys_by_component(not_in_sam)
    assert set(report.missing_expected) == {
        "segmentation_encoder",
        "pixel_decoder",
        "transformer_decoder",
        "transformer_decoder.class_head",
    }
    assert all(
        re.match(r"backbone\.simfp_[235]\.", k) for k in report.missing_expected["segmentation_encoder"]
    )
    for k, v in source.backbone.state_dict().items():
        if k.startswith(("net.", "simfp_4.")):
            assert torch.equal(model.backbone.state_dict()[k], v), k


def test_sam_position_tables_resampled(tmp_path) -> None:
    big = _build(PANOPTIC_TINY, "MODEL.SAM_VIT.IMG_SIZE", 256, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6)
    torch.save(_to_official_sam(big.backbone.state_dict()), tmp_path / "sam256.pth")
    model = _build(PANOPTIC_TINY, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6)
    ckpt = FlowSegCheckpointer(model)
    ckpt.load(str(tmp_path / "sam256.pth"))
    assert ckpt.last_report.clean
    assert any(
        "resampled backbone.net.pos_embed from (1, 256, 64) to (1, 64, 64)" in n
        for n in ckpt.last_report.notes
    )


def test_mask2former_d2_pkl_and_class_count_mismatch(tmp_path, caplog) -> None:
    source = _build(PANOPTIC_TINY, *SEGMENTOR, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6, seed=0)
    _perturb(source, seed=8)
    model_zoo = {k: v.numpy().copy() for k, v in source.state_dict().items() if k.startswith("sem_seg_head.")}
    model_zoo["backbone.res2.0.conv1.weight"] = torch.randn(8, 8, 1, 1).numpy()  # a ResNet: not FlowSeg's
    with open(tmp_path / "model_final_m2f.pkl", "wb") as f:
        pickle.dump({"model": model_zoo, "__author__": "Mask2Former"}, f)

    model = _build(
        PANOPTIC_TINY, *SEGMENTOR, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3, seed=1
    )  # another class count
    ckpt = FlowSegCheckpointer(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ckpt.load(str(tmp_path / "model_final_m2f.pkl"))
    report = ckpt.last_report
    assert report.source_format == "mask2former_d2"
    assert sorted(report.incorrect_shapes) == [
        ("sem_seg_head.predictor.class_embed.bias", (7,), (4,)),
        ("sem_seg_head.predictor.class_embed.weight", (7, 64), (4, 64)),
    ]
    assert set(report.missing_expected) == {"segmentation_encoder"} and not report.missing_unexpected
    assert not report.unexpected  # the ResNet backbone is dropped by the converter
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "sem_seg_head.predictor.class_embed.weight: checkpoint (7, 64) vs model (4, 64)" in warning
    for k, v in source.state_dict().items():
        if k.startswith("sem_seg_head.") and "class_embed" not in k:
            assert torch.equal(model.state_dict()[k], v), k


def test_hugging_face_mask2former_state_dict(tmp_path) -> None:
    pytest.importorskip("transformers")
    # the tiny FlowSeg head's sizes; HF: decoder_layers D -> D - 1 = 3 layers
    hf = tiny_hf_mask2former(hidden=64, heads=4, queries=16, classes=6, decoder_layers=4, encoder_layers=1)
    hf.save_pretrained(tmp_path / "m2f_hf")  # a Hugging Face model folder (model.safetensors)
    converted = convert_hf_mask2former(hf.state_dict())
    for source in (tmp_path / "m2f_hf", tmp_path / "m2f_hf" / "model.safetensors"):
        model = _build(PANOPTIC_TINY, *SEGMENTOR, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6)
        ckpt = FlowSegCheckpointer(model)
        ckpt.load(str(source))
        report = ckpt.last_report
        assert report.source_format == "mask2former_hf" and not report.unexpected
        assert set(report.missing_expected) == {"segmentation_encoder"} and not report.missing_unexpected
        # Swin's feature widths (16..128) differ from the SAM pyramid's 64: exactly those inputs are skipped
        skipped = {k for k, _, _ in report.incorrect_shapes}
        assert skipped and all(
            re.search(r"pixel_decoder\.(input_proj\.\d\.0|adapter_1)\.weight$", k) for k in skipped
        )
        sd = model.state_dict()
        loaded = [k for k in converted if k not in skipped]
        assert len(loaded) > 100 and all(torch.equal(sd[k], converted[k]) for k in loaded)
    with pytest.raises(FileNotFoundError, match="sharded"):
        FlowSegCheckpointer(model).load(str(tmp_path))


def test_from_checkpointer_keeps_save_dir_and_checkpointables(tmp_path) -> None:
    from detectron2.checkpoint import DetectionCheckpointer

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ours = FlowSegCheckpointer.from_checkpointer(DetectionCheckpointer(model, str(tmp_path), optimizer=opt))
    assert (
        ours.model is model and ours.save_dir == str(tmp_path) and ours.checkpointables == {"optimizer": opt}
    )
    ours.save("m")
    assert ours.get_checkpoint_file().endswith("m.pth")
