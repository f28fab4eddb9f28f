"""The FlowSeg meta-architecture in its modes: generic (class head / LLM category conditions)
and referring (propose-then-select with BAR), on tiny random models."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from flowseg import add_flowseg_config
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

CLASSES = ["circle", "square", "background"]


@pytest.fixture(scope="module")
def llm_paths(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module", autouse=True)
def metadata():
    meta = MetadataCatalog.get("test_meta_arch_classes")
    if not hasattr(meta, "stuff_classes"):
        meta.set(
            stuff_classes=CLASSES, thing_classes=CLASSES[:2], thing_dataset_id_to_contiguous_id={1: 0, 2: 1}
        )
    return meta


def _cfg(config: str, *opts):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["DATASETS.TEST", '("test_meta_arch_classes",)', *opts])
    return cfg


def _sample(h: int, w: int, labels=(0, 1), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(labels), h, w, dtype=torch.bool)
    masks[0, 8:40, 10:50] = True
    if len(labels) > 1:
        masks[1, 50:80, 60:100] = True
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.tensor(labels)
    return {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g), "instances": inst}


def test_generic_mode_class_head_trains_and_infers():
    torch.manual_seed(0)
    cfg = _cfg("configs/tiny/flowseg_coco_panoptic_tiny.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3)
    model = build_model(cfg)
    assert model.condition_head is None and hasattr(model.sem_seg_head.predictor, "class_embed")
    model.train()
    losses = model([_sample(96, 128), _sample(128, 112, seed=1)])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    x = _sample(96, 128)
    x.update(height=192, width=256)  # results come back at the input's original size
    with torch.no_grad():
        out = model([x])[0]
    assert out["sem_seg"].shape == (3, 192, 256)
    pan, segments = out["panoptic_seg"]
    assert pan.shape == (192, 256)
    assert set(torch.unique(pan).tolist()) <= {0} | {s["id"] for s in segments}
    assert out["instances"].pred_masks.shape[-2:] == (192, 256)


def test_generic_mode_with_llm_uses_category_conditions(llm_paths):
    torch.manual_seed(0)
    cfg = _cfg(
        "configs/tiny/flowseg_coco_panoptic_tiny.yaml",
        *tiny_llm_cfg_overrides(llm_paths),
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        3,
    )
    model = build_model(cfg)
    assert model.condition_head is not None
    model.train()
    losses = model([_sample(96, 96)])
    assert "loss_llm" in losses and torch.isfinite(losses["loss_ce"])
    images = model.preprocess_image([_sample(96, 96)])
    model.eval()
    with torch.no_grad():
        outputs, cond = model.run_head([_sample(96, 96)], images)
    # one condition per category name, logits = K similarities + no-object
    assert cond["conditions"].shape[1] == len(CLASSES)
    assert outputs["pred_logits"].shape[-1] == len(CLASSES) + 1


def _referring_model(llm_paths, *opts):
    cfg = _cfg("configs/tiny/flowseg_refer_tiny.yaml", *tiny_llm_cfg_overrides(llm_paths), *opts)
    return build_model(cfg)


def test_referring_inference_returns_selected_mask_score_and_candidates(llm_paths):
    torch.manual_seed(0)
    model = _referring_model(llm_paths).eval()
    x = _sample(96, 128, labels=(0,))
    x.update(expression="the red circle", task="referring", height=150, width=200)
    y = dict(x, expression="segment <p>the circle</p> and <p>the square</p>", task="referring")
    y.pop("height")
    y.pop("width")
    with torch.no_grad():
        out = model([x, y])
        outputs, cond = model.run_head([x, y], model.preprocess_image([x, y]))
    ref = out[0]["ref_seg"]
    assert ref["mask"].shape == (150, 200) and ref["mask"].dtype == torch.bool
    assert ref["candidates"].shape == (model.num_queries, 150, 200)
    # the selected candidate is the output mask itself (BAR-refined): per sample, oracle IoU >= IoU
    assert torch.equal(ref["candidates"][ref["query"]], ref["mask"])
    # the selected query is the argmax of p(condition 0 | q) and its mask is that candidate's
    prob = outputs["pred_logits"][0].softmax(-1)[:, 0]
    assert ref["query"] == int(prob.argmax()) and abs(ref["score"] - float(prob.max())) < 1e-5
    # two <p> spans -> two conditions, each with its own selection; no height/width -> image size
    assert len(out[1]["ref_segs"]) == 2 and cond["condition_mask"][1].sum() == 2
    assert out[1]["ref_seg"]["mask"].shape == (96, 128)


def test_referring_training_loss_has_llm_and_refined_mask_terms(llm_paths):
    torch.manual_seed(0)
    model = _referring_model(llm_paths).train()
    x = _sample(96, 96, labels=(0,))
    x.update(expression="the small square", task="referring")
    losses = model([x, dict(x, expression="the leftmost star")])
    assert {"loss_llm", "loss_mask_refined", "loss_dice_refined", "loss_ce"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    # every part gets gradient: condition head, BSF modules, BAR
    bsf = model.sem_seg_head.predictor.semantic_cross_attention_layers[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bsf.parameters())
    assert model.refiner.alpha.grad is not None
    assert any(p.grad is not None for p in model.condition_head.parameters())


def test_expressions_of_one_image_share_its_encoding(llm_paths):
    """Consecutive inputs showing the same image run SAM-ViT and the pixel decoder once; the
    outputs, the losses and the gradients equal those of encoding the image per input."""
    torch.manual_seed(0)
    model = _referring_model(llm_paths).train()
    x = _sample(96, 96, labels=(0,), seed=1)
    x.update(expression="the small square", task="referring", image_id=7)
    y = dict(x, expression="the leftmost star")  # same image tensor
    z = _sample(80, 96, labels=(0,), seed=2)
    z.update(expression="the red circle", task="referring", image_id=8)
    shared = [x, y, z]
    separate = [x, dict(y, image_id=70), z]  # another image id: not grouped

    images, index = model.preprocess_shared_images(shared)
    assert index.tolist() == [0, 0, 1] and images.tensor.shape[0] == 2
    assert model.preprocess_shared_images(separate)[1] is None
    batch_sizes = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))

    def run(inputs):
        model.zero_grad()
        torch.manual_seed(1)  # the criterion samples points at random
        losses = model(inputs)
        sum(losses.values()).backward()
        grads = [p.grad.clone() for p in model.backbone.parameters() if p.grad is not None]
        return losses, grads

    (la, ga), (lb, gb) = run(shared), run(separate)
    hook.remove()
    assert batch_sizes == [2, 3]
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-5)
    assert len(ga) == len(gb) > 0
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_referring_mode_without_llm_is_a_clear_error():
    cfg = _cfg("configs/tiny/flowseg_refer_tiny.yaml")
    with pytest.raises(ValueError, match="MODEL.LLM.PATH"):
        build_model(cfg)


def test_segment_aux_classifier_trains_and_only_for_a_class_head(llm_paths):
    torch.manual_seed(0)
    opts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3, "MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT", 1.0]
    model = build_model(_cfg("configs/tiny/flowseg_coco_panoptic_tiny.yaml", *opts))
    assert model.sem_seg_head.aux_classifier.out_channels == 3
    batch = [_sample(96, 128)]
    opt = torch.optim.Adam(model.sem_seg_head.aux_classifier.parameters(), lr=0.05)
    model.train()
    first = None
    for _ in range(30):  # only the 1x1 classifier learns: the pixel features stay fixed
        loss = model(batch)["loss_segment_aux"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    with torch.no_grad():  # inference is unchanged: no aux output, no aux loss
        assert "sem_seg" in model([_sample(96, 128)])[0]
    with pytest.raises(ValueError, match="SEGMENT_AUX_WEIGHT"):
        build_model(
            _cfg("configs/tiny/flowseg_refer_tiny.yaml", *tiny_llm_cfg_overrides(llm_paths), *opts[2:])
        )
