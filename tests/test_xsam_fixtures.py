"""The X-SAM fixtures made by tools/xsam_parity/make_xsam_fixture.py are self-consistent, and
the facts tools/xsam_parity/README.md states about X-SAM's referring inference (token ids,
condition spans, background column, query selection, mask resizing) reproduce the outputs X-SAM
itself computed and stored in them."""

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_TOKEN_INDEX = -200


def load(name: str) -> dict:
    return torch.load(FIXTURES / f"xsam_tiny_{name}.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_referring_token_ids_and_spans(name: str) -> None:
    fx = load(name)
    ids = fx["special_token_ids"]
    base = ids["base_vocab"]
    assert (ids["<SEG>"], ids["<p>"], ids["</p>"]) == (base, base + 1, base + 2)
    embed = fx["state_dict"]["llm.model.embed_tokens.weight"]
    assert embed.shape[0] == ids["len_tokenizer"] == base + 3 and embed.dtype == torch.float16
    input_ids = fx["inputs"]["input_ids"][0]
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    start = int((input_ids == ids["<p>"]).nonzero())
    end = int((input_ids == ids["</p>"]).nonzero())
    cond = fx["inputs"]["cond_ids"][0]
    # the span is marked from <p> to </p>, both markers included, and nothing else
    assert torch.equal((cond == 0).nonzero().flatten(), torch.arange(start, end + 1))
    assert (cond >= 0).sum() == end - start + 1
    seg = fx["inputs"]["seg_ids"][0]
    assert torch.equal((seg == 0).nonzero().flatten(), (input_ids == ids["<SEG>"]).nonzero().flatten())
    # SigLIP tokens (one per patch) and SAM tokens (the SAM grid pixel-shuffled by 0.5) replace <image>
    cfg = json.loads((FIXTURES / f"xsam_tiny_{name}.json").read_text())["configs"]
    siglip = (cfg["vision_encoder"]["image_size"] // cfg["vision_encoder"]["patch_size"]) ** 2
    sam = (cfg["sam_vision"]["image_size"] // cfg["sam_vision"]["patch_size"] // 2) ** 2
    assert fx["outputs"]["llm_seq_len"] == input_ids.numel() - 1 + siglip + sam


def test_prompt_templates() -> None:
    qwen, phi = load("qwen3"), load("phi3")
    assert qwen["prompt_text"].startswith("<|im_start|>user\n")
    assert qwen["prompt_text"].endswith(
        "<|im_end|>\n<|im_start|>assistant\n" + qwen["conversation"][0]["output"] + "\n"
    )
    assert phi["prompt_text"].startswith("<s><|user|>\n")
    assert phi["prompt_text"].endswith("<|end|>\n<|assistant|>\n" + phi["conversation"][0]["output"] + "\n")
    for fx in (qwen, phi):
        assert "<SEG>" in fx["conversation"][0]["output"]
        assert (
            "\n<image>" + fx["conversation"][0]["input"].split("<image>")[1][:1]
            in fx["conversation"][0]["input"]
        )


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_referring_selection_rule_reproduces_xsam(name: str) -> None:
    fx = load(name)
    out = fx["outputs"]
    logits = out["class_queries_logits"][0]  # [Q, condition + background]
    assert logits.shape[-1] == 2 and out["cond_embeds"].shape[1] == 2
    # background is the last condition the class head saw: X-SAM's bg_embeds
    assert torch.equal(out["cond_embeds"][0, -1], fx["state_dict"]["bg_embeds.weight"][0])
    probs = logits.softmax(-1)[:, 0]
    best = int(probs.argmax())
    assert round(float(probs[best]), 6) == pytest.approx(out["score"], abs=1e-6)
    height, width = fx["image_size"]
    scaled_h, scaled_w = fx["scaled_size"]
    mask = out["masks_queries_logits"][0, best : best + 1, :scaled_h, :scaled_w]
    mask = F.interpolate(mask[None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    expected = torch.where(mask.sigmoid() > 0.5, 1, 255)
    assert torch.equal(expected, out["segmentation"].long())
    # the 1/8 decoder logits upsampled to SAM's input size are the logits X-SAM post-processed
    side = out["masks_queries_logits"].shape[-1]
    up = F.interpolate(out["mask_logits_lowres"], size=(side, side), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, out["masks_queries_logits"], rtol=0, atol=1e-6)
    # trained far enough that Mask2Former's 0.5 attention-mask threshold is not on a knife edge:
    # 1e-6 relative weight noise moves the class logits by far less than a 1e-4 parity tolerance
    assert out["mask_logits_lowres"].abs().min() > 0.1
    sensitivity = fx["sensitivity_to_1e-6_weight_noise"]
    assert sensitivity["class_queries_logits"] < 1e-4 and sensitivity["segmentation_changed_pixels"] == 0


def test_stage1_fixture_holds_its_dataset_and_pq() -> None:
    fx = load("stage1")
    coco = json.loads(fx["dataset_files"]["panoptic_val.json"])
    assert coco == fx["coco_panoptic"]
    assert 0.0 < fx["xsam_pq"]["All"]["pq"] < 1.0
    sensitivity = fx["sensitivity_to_1e-6_weight_noise"]
    assert sensitivity["class_queries_logits"] < 1e-4 and sensitivity["category_changed_pixels"] == 0
    num_classes = len(coco["categories"])
    assert fx["state_dict"]["segmentor.class_predictor.predictor.weight"].shape[0] == num_classes + 1
    for image, result in zip(coco["images"], fx["outputs"]["per_image"]):
        assert result["image_id"] == image["id"]
        assert result["mask_logits_lowres"].shape[:2] == result["class_queries_logits"].shape[:2]
        assert list(result["segmentation"].shape) == [image["height"], image["width"]]
        picture = Image.open(io.BytesIO(fx["dataset_files"][f"images/{image['file_name']}"]))
        assert picture.size == (image["width"], image["height"])
        ids = set(result["segmentation"].unique().tolist()) - {0}
        assert ids == {s["id"] for s in result["segments_info"]}
