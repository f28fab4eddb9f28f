"""Whole-head parity with Hugging Face's Mask2Former: our pixel decoder + masked-attention decoder,
loaded through ``convert_hf_mask2former``, give HF's class and mask logits from HF's backbone features."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head
from flowseg import add_flowseg_config
from flowseg.checkpoint import convert_hf_mask2former, convert_mask2former_checkpoint
from hf_tiny import tiny_hf_mask2former

pytest.importorskip("transformers")

HIDDEN, HEADS, QUERIES, CLASSES, LAYERS = 32, 4, 6, 5, 3


@pytest.fixture(scope="module")
def hf_model_and_output():
    # HF: decoder_layers D -> D-1 layers
    model = tiny_hf_mask2former(
        hidden=HIDDEN,
        heads=HEADS,
        queries=QUERIES,
        classes=CLASSES,
        decoder_layers=LAYERS + 1,
        encoder_layers=2,
    )
    with torch.no_grad():
        for p in model.parameters():  # HF's init leaves some tensors at zero: randomise all
            p.add_(torch.randn_like(p) * 0.02)
        out = model(torch.randn(2, 3, 64, 96), output_hidden_states=True, output_auxiliary_logits=True)
    return model, out


def _our_head(channels):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = CLASSES
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = HIDDEN
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = HIDDEN
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = HEADS
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = HIDDEN
    cfg.MODEL.MASK_FORMER.NHEADS = HEADS
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = QUERIES
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = LAYERS
    shapes = {f"p{i + 2}": ShapeSpec(channels=c, stride=2 ** (i + 2)) for i, c in enumerate(channels)}
    return build_sem_seg_head(cfg, shapes).eval()


def test_full_head_matches_hf_class_and_mask_logits(hf_model_and_output):
    model, out = hf_model_and_output
    feats = out.encoder_hidden_states  # the Swin maps HF's pixel decoder consumes (1/4 .. 1/32)
    head = _our_head([f.shape[1] for f in feats])
    missing, unexpected = head.load_state_dict(
        {k[len("sem_seg_head.") :]: v for k, v in convert_hf_mask2former(model.state_dict()).items()},
        strict=True,
    )
    assert not missing and not unexpected
    with torch.no_grad():
        ours = head({f"p{i + 2}": f for i, f in enumerate(feats)})
    torch.testing.assert_close(ours["pred_logits"], out.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], out.masks_queries_logits, atol=1e-4, rtol=0)
    # deep supervision: HF's auxiliary predictions are our aux_outputs, layer by layer
    assert len(ours["aux_outputs"]) == len(out.auxiliary_logits) == LAYERS
    for a, b in zip(ours["aux_outputs"], out.auxiliary_logits):
        torch.testing.assert_close(a["pred_logits"], b["class_queries_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["pred_masks"], b["masks_queries_logits"], atol=1e-4, rtol=0)


def test_original_detectron2_checkpoint_names_load_into_flowseg(hf_model_and_output):
    """An original Mask2Former D2 checkpoint uses our names: rebuild one from the HF weights and
    check it loads with no missing / unexpected head keys (the Swin backbone is dropped)."""
    model, _ = hf_model_and_output
    ours = convert_hf_mask2former(model.state_dict())
    d2 = {**ours, "backbone.layers.0.blocks.0.attn.qkv.weight": torch.zeros(3)}
    converted = convert_mask2former_checkpoint(d2, num_classes=CLASSES)
    assert set(converted) == set(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
