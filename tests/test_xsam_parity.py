"""X-SAM's checkpoints load into FlowSeg, and FlowSeg with SR, CR and BAR off computes what X-SAM's own
code computed (fixtures made by tools/xsam_parity/make_xsam_fixture.py from X-SAM's source).

Inputs are X-SAM's exact tensors (its SAM and SigLIP inputs); the prompt is re-tokenised by FlowSeg
and its ids are asserted equal to X-SAM's. Tolerance 1e-4 (absolute) on the conditions, the class
logits and the 1/8 mask logits (measured: 8e-7, 3e-5 on mask logits up to 95 in size; the fixtures
record changes of 8e-6 and 1.6e-4 under 1e-6 relative weight noise, so 1e-4 separates rounding
from a real difference); the selected query and the output mask must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer, detect_checkpoint_format, group_keys_by_component
from flowseg.checkpoint.xsam import to_older_generation, xsam_key_generation

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PAPER = ROOT / "configs" / "Base-FlowSeg-Referring.yaml"
KINDS = ["qwen3", "phi3"]


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"xsam_tiny_{name}.pt", map_location="cpu", weights_only=True)


def _write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def xsam_tiny_cfg(name: str, folder: Path, bsf: bool = False, bar: bool = False):
    """The paper config at the sizes of fixture ``name`` (its json records X-SAM's configs)."""
    meta = json.loads((FIXTURES / f"xsam_tiny_{name}.json").read_text())["configs"]
    fx = load_fixture(name)
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for fname, text in fx["tokenizer_files"].items():
        (tok / fname).write_text(text)
    llm_json = _write_json(folder / "llm.json", meta["llm"])
    vis_json = _write_json(folder / "vision.json", meta["vision_encoder"])
    sam, m2f = meta["sam_vision"], meta["mask2former"]
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(str(PAPER))
    # fmt: off
    cfg.merge_from_list([
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
        "MODEL.SAM_VIT.CONNECTOR.HIDDEN_DIM", sam["hidden_size"],
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
        "MODEL.FLOWSEG.SEMANTIC_REFINEMENT", bsf,
        "MODEL.FLOWSEG.CONDITION_REFINEMENT", bsf,
        "MODEL.FLOWSEG.BAR.ENABLED", bar,
        "MODEL.LLM.PATH", "",
        "MODEL.LLM.CONFIG", llm_json,
        "MODEL.LLM.TOKENIZER_PATH", str(tok),
        "MODEL.LLM.TORCH_DTYPE", "float32",
        "MODEL.LLM.GRADIENT_CHECKPOINTING", False,
        "MODEL.LLM.LORA.ENABLED", False,
        "MODEL.LLM.PROJ_HIDDEN_DIM", m2f["hidden_dim"],
        "MODEL.LLM.CHAT_FORMAT", "phi3" if name == "phi3" else "chatml",
        "MODEL.VANILLA_ENCODER.PATH", "",
        "MODEL.VANILLA_ENCODER.CONFIG", vis_json,
        "MODEL.VANILLA_ENCODER.IMAGE_SIZE", meta["vision_encoder"]["image_size"],
    ])
    # fmt: on
    return cfg


def build_xsam_tiny(name: str, folder: Path, **kw):
    cfg = xsam_tiny_cfg(name, folder, **kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    return cfg, model


def save_state_dict(state_dict: dict, folder: Path) -> str:
    path = folder / "pytorch_model.bin"
    torch.save(state_dict, path)
    return str(path)


def question_and_answer(fx: dict) -> tuple[str, str]:
    """X-SAM's question (between ``<image>`` and the end of the user turn) and answer text."""
    turn = fx["conversation"][0]
    end = "<|im_end|>" if "<|im_end|>" in turn["input"] else "<|end|>"
    question = turn["input"].split("<image>", 1)[1].split(end, 1)[0]
    return question, turn["output"][: -len(end)]


def run_flowseg(model, fx: dict) -> dict:
    """FlowSeg's referring forward on X-SAM's exact input tensors."""
    height, width = fx["image_size"]
    question, answer = question_and_answer(fx)
    sample = {
        "image": torch.zeros(3, height, width, dtype=torch.uint8),  # replaced by X-SAM's tensors
        "task": "referring",
        "prompt": question,
        "answer": answer,
        "height": height,
        "width": width,
    }
    inputs = fx["inputs"]
    vision = model.condition_head.vision_encoder
    vision.preprocess = lambda images: inputs["pixel_values"]  # X-SAM's SigLIP input
    images = ImageList(inputs["extra_pixel_values"], [tuple(fx["scaled_size"])])  # SAM's input
    with torch.no_grad():
        encoded = model.condition_head.encode([sample])[0]
        outputs, cond = model.run_head([sample], images)
        result = model.referring_inference(outputs, cond, [sample], images)[0]["ref_seg"]
    return {"encoded": encoded, "outputs": outputs, "cond": cond, "result": result}


@pytest.fixture(scope="module", params=KINDS)
def loaded(request, tmp_path_factory):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    fx = load_fixture(name)
    cfg, model = build_xsam_tiny(name, folder)
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.load(save_state_dict(fx["state_dict"], folder))
    return name, fx, cfg, model, ckpt.last_report, folder


def test_xsam_fixture_loads_completely(loaded):
    name, fx, _, model, report, _ = loaded
    assert report.source_format == "xsam (current key names)"
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    assert report.dropped == {"other": ["segmentor.shared_image_embedding.positional_embedding"]}
    # SR, CR and BAR off: every model tensor comes from X-SAM's state dict
    assert not report.missing_expected and not report.newly_initialised
    assert report.num_loaded == report.num_model_keys == len(model.state_dict())
    # every loaded tensor was converted from X-SAM's names, except the trainable new-token rows
    # (<SEG>, <p>, </p>) that the checkpointer cuts out of the converted embedding matrices
    rows = group_keys_by_component(model.state_dict()).get("condition_head.token_rows", [])
    assert sum(len(v) for v in report.converted.values()) == report.num_loaded - len(rows)
    sd = model.state_dict()
    assert torch.equal(
        sd["sem_seg_head.predictor.logit_scale"],
        fx["state_dict"]["segmentor.class_predictor.logit_scale"][0].float(),
    )
    assert torch.equal(
        sd["backbone.connector.2.4.weight"], fx["state_dict"]["seg_connector.model.2.model.4.weight"].float()
    )
    assert torch.equal(
        sd["condition_head.sam_projector.0.weight"], fx["state_dict"]["seg_projector.model.0.weight"].float()
    )


def test_prompt_ids_equal_xsam(loaded):
    name, fx, _, model, _, _ = loaded
    encoded = model.condition_head.encode(
        [{**dict(zip(("prompt", "answer"), question_and_answer(fx))), "task": "referring"}]
    )[0]
    xsam_ids = fx["inputs"]["input_ids"][0].tolist()
    # X-SAM closes the last turn with its separator "\n" after the answer; the LLM is causal, so
    # that last token changes no hidden state at or before <SEG> (FlowSeg leaves it out)
    newline = model.condition_head.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert xsam_ids[-len(newline) :] == newline
    assert encoded.input_ids == xsam_ids[: -len(newline)]
    cond = fx["inputs"]["cond_ids"][0]
    span = (cond == 0).nonzero().flatten()
    assert encoded.spans == [(int(span[0]), int(span[-1]))]
    assert encoded.seg_position == int((fx["inputs"]["seg_ids"][0] == 0).nonzero())


def test_outputs_equal_xsam(loaded):
    name, fx, _, model, _, _ = loaded
    got = run_flowseg(model, fx)
    out = fx["outputs"]
    torch.testing.assert_close(got["cond"]["conditions"][0], out["cond_embeds"][0, :1], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["cond"]["seg_embed"], out["seg_embeds"][:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["outputs"]["pred_logits"], out["class_queries_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["outputs"]["pred_masks"], out["mask_logits_lowres"], rtol=0, atol=1e-4)
    probs = out["class_queries_logits"][0].softmax(-1)[:, 0]
    assert got["result"]["query"] == int(probs.argmax())
    assert got["result"]["score"] == pytest.approx(out["score"], abs=1e-5)
    assert torch.equal(got["result"]["mask"], out["segmentation"] == 1)


def test_semantic_flow_changes_the_outputs(loaded, tmp_path):
    name, fx, cfg, model, _, _ = loaded
    ref = run_flowseg(model, fx)
    _, bsf_model = build_xsam_tiny(name, tmp_path, bsf=True)
    ckpt = FlowSegCheckpointer(bsf_model)
    ckpt.load(save_state_dict(fx["state_dict"], tmp_path))
    new = ckpt.last_report.newly_initialised
    assert set(new) == {"transformer_decoder.bsf"}
    # as loaded (SR's gates half open, CR zero-initialised: an identity) the flow already acts
    got = run_flowseg(bsf_model, fx)
    assert not torch.allclose(got["outputs"]["pred_logits"], ref["outputs"]["pred_logits"], atol=1e-3)
    assert not torch.allclose(got["outputs"]["pred_masks"], ref["outputs"]["pred_masks"], atol=1e-3)
    # and with every new weight moved (CR acting too), as after fine-tuning
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for key in new["transformer_decoder.bsf"]:
            p = bsf_model.get_parameter(key)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    got = run_flowseg(bsf_model, fx)
    assert not torch.allclose(got["outputs"]["pred_logits"], ref["outputs"]["pred_logits"], atol=1e-3)
    assert not torch.allclose(got["outputs"]["pred_masks"], ref["outputs"]["pred_masks"], atol=1e-3)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("generation", ["current", "older"])
def test_released_key_names_load_and_report_bsf_bar_as_new(generation, name, tmp_path):
    """Both key generations (the released files use the older one) load with no unexpected key; with
    SR, CR and BAR on, exactly their parameters are reported newly initialised."""
    fx = load_fixture(name)
    state_dict = fx["state_dict"] if generation == "current" else to_older_generation(fx["state_dict"])
    assert xsam_key_generation(state_dict) == generation
    assert detect_checkpoint_format(state_dict) == "xsam"
    cfg, model = build_xsam_tiny(name, tmp_path, bsf=True, bar=True)
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.load(save_state_dict(state_dict, tmp_path))
    report = ckpt.last_report
    assert report.source_format == f"xsam ({generation} key names)"
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    new_keys = {
        k
        for k in model.state_dict()
        if k.startswith("refiner.")
        or any(
            f".{m}." in k
            for m in ("semantic_cross_attention_layers", "fusion_gates", "condition_refinement_layers")
        )
    }
    assert new_keys
    assert set(report.newly_initialised) == {"transformer_decoder.bsf", "refiner"}
    assert {k for v in report.newly_initialised.values() for k in v} == new_keys
    assert {k for v in report.missing_expected.values() for k in v} == new_keys
    assert "newly initialised" in report.info_text()


@pytest.mark.parametrize(
    "targets, adapted",
    [
        (["q_proj", "k_proj", "v_proj", "o_proj"], {"qkv_proj", "o_proj"}),
        (["qkv_proj", "o_proj", "gate_up_proj"], {"qkv_proj", "o_proj", "gate_up_proj"}),
    ],
)
def test_phi3_with_lora_loads_and_keeps_parity(targets, adapted, tmp_path):
    """Phi-3 fuses q/k/v and gate/up: LoRA targets name either the separate projections (resolved to
    the fused modules) or the fused ones. X-SAM's plain LLM weights land under peft's ``base_layer``
    names; LoRA starts at B = 0, so the outputs still equal X-SAM's."""
    fx = load_fixture("phi3")
    cfg = xsam_tiny_cfg("phi3", tmp_path)
    cfg.merge_from_list(["MODEL.LLM.LORA.ENABLED", True, "MODEL.LLM.LORA.TARGET_MODULES", targets])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lora = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in model.state_dict() if ".lora_A." in k}
    assert lora == adapted
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.load(save_state_dict(fx["state_dict"], tmp_path))
    report = ckpt.last_report
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    assert set(report.missing_expected) == {"condition_head.lora"}
    sd = model.state_dict()
    fused = "condition_head.llm.base_model.model.model.layers.1.self_attn.qkv_proj.base_layer.weight"
    assert torch.equal(sd[fused], fx["state_dict"]["llm.model.layers.1.self_attn.qkv_proj.weight"].float())
    got = run_flowseg(model, fx)
    out = fx["outputs"]
    torch.testing.assert_close(got["outputs"]["pred_logits"], out["class_queries_logits"], rtol=0, atol=1e-4)
    assert torch.equal(got["result"]["mask"], out["segmentation"] == 1)


def test_phi3_chat_format_and_lora_target_names(caplog):
    from flowseg.modeling.language.llm import resolve_lora_targets
    from flowseg.modeling.language.templates import chatml_pieces
    from torch import nn

    turns = [("Segment <p>a</p>.", "Sure, <SEG>."), ("And <p>b</p>?", "<SEG>.")]
    phi3 = chatml_pieces(turns, True, "phi3", "<s>")
    assert "".join(t for t, _ in phi3) == (
        "<s><|user|>\n<image>Segment <p>a</p>.<|end|>\n<|assistant|>\nSure, <SEG>.<|end|>"
        "\n<|user|>\nAnd <p>b</p>?<|end|>\n<|assistant|>\n<SEG>.<|end|>"
    )
    assert [a for _, a in phi3] == [False, True, False, True]
    # ChatML (Qwen) has no BOS even when one is given
    assert chatml_pieces(turns[:1], False, "chatml", "<s>")[0][0].startswith("<|im_start|>user\nSegment")
    with pytest.raises(ValueError, match="CHAT_FORMAT"):
        chatml_pieces(turns, True, "llama3")

    class Attn(nn.Module):
        def __init__(self, fused: bool):
            super().__init__()
            names = ["qkv_proj", "o_proj"] if fused else ["q_proj", "k_proj", "v_proj", "o_proj"]
            for n in names:
                self.add_module(n, nn.Linear(2, 2))

    default = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_lora_targets(Attn(fused=False), default) == default
    assert resolve_lora_targets(Attn(fused=True), default) == ["qkv_proj", "o_proj"]
    with caplog.at_level("WARNING"):
        assert resolve_lora_targets(Attn(fused=True), ["o_proj", "w_in"]) == ["o_proj", "w_in"]
    assert "'w_in' matches no module" in caplog.text


def test_converter_keeps_unknown_keys_and_drops_the_prompt_table():
    from flowseg.checkpoint.xsam import convert_xsam_checkpoint

    sd = dict(load_fixture("stage1")["state_dict"])
    sd["segmentor.prompt_head.weight"] = torch.zeros(2)
    out, info = convert_xsam_checkpoint(sd)
    assert torch.equal(out["segmentor.prompt_head.weight"], torch.zeros(2))  # reported as unexpected on load
    assert info.dropped == ["segmentor.shared_image_embedding.positional_embedding"]
    assert info.generation == "current" and "segmentor.prompt_head.weight" not in info.converted
    assert out["sem_seg_head.predictor.class_embed.weight"].shape[0] == 6  # the stage-1 linear head
    assert info.converted["backbone.sam_neck.0.weight"] == "segmentor.encoder.neck.conv1.weight"
