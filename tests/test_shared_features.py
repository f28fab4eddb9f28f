"""Evaluation with image features shared across the expressions of an image
(:mod:`flowseg.engine.shared_features` grouping, the model's own sharing in ``FlowSeg.run_head`` and
``LLMConditionHead.forward``): same outputs as the per-expression path, one encoder pass per image
pass, correct grouping and sharding."""

import time

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.data.build import build_test_mapper
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.engine.shared_features import (
    GroupedInferenceSampler,
    SharedImageFeatureInference,
    build_grouped_test_loader,
    evaluate_with_shared_features,
    group_consecutive_inputs,
)
from flowseg.evaluation import ReferringEvaluator
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

CONFIG = "configs/tiny/flowseg_refer_tiny.yaml"
DATASET = "synthref_test"
SMALL = "synthref_test_first_images"  # the first expressions of the test split
PER_IMAGE = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    data = root / "synthetic"
    generate_synthetic_datasets(str(data), {"train": 0, "val": 0, "test": 3}, seed=3)
    register_synthetic_datasets(str(data))  # (re-)points the synthref_* names at this folder
    yield {"llm": make_tiny_llm_dir(root / "llm")}
    register_synthetic_datasets()  # back to the default root for the tests that follow


def _cfg(paths, *opts):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [*tiny_llm_cfg_overrides(paths, lora=False), "DATASETS.TEST", f"('{DATASET}',)", *opts]
    )
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


class _Calls:
    """Counts forward calls of a module and keeps what it returned."""

    def __init__(self, module):
        self.outputs = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.outputs.append(o))

    def __len__(self):
        return len(self.outputs)


def _assert_same_outputs(ref, got):
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        ra, rb = a["ref_seg"], b["ref_seg"]
        assert ra["query"] == rb["query"]
        assert abs(ra["score"] - rb["score"]) < 1e-5
        assert ra["mask"].shape == rb["mask"].shape
        # batch K vs 1 changes float reduction order: allow a pixel whose logit sits at ~0
        assert (ra["mask"] != rb["mask"]).float().mean() < 1e-3
        assert (ra["candidates"] != rb["candidates"]).float().mean() < 1e-3
        assert [s["query"] for s in a["ref_segs"]] == [s["query"] for s in b["ref_segs"]]


@pytest.fixture(scope="module")
def reference(setup):
    """2 images x 6 expressions, their grouped batches and the per-expression outputs."""
    cfg = _cfg(setup["llm"])
    model = _model(cfg)
    batches = [b[:PER_IMAGE] for b in list(build_grouped_test_loader(cfg, DATASET))[:2]]
    assert all(len(b) == PER_IMAGE and len({x["image_id"] for x in b}) == 1 for b in batches)
    inputs = [x for b in batches for x in b]
    predictor = _Calls(model.sem_seg_head.predictor)
    with torch.no_grad():
        t0 = time.perf_counter()
        outputs = [model([x])[0] for x in inputs]
        seconds = time.perf_counter() - t0
    predictor.handle.remove()
    decoder = [(o["pred_logits"][0], o["pred_masks"][0]) for o in predictor.outputs]
    return {"model": model, "batches": batches, "outputs": outputs, "decoder": decoder, "seconds": seconds}


@pytest.mark.parametrize("share_llm_prefix", [True, False])
def test_grouped_outputs_equal_per_expression_and_encode_each_image_once(reference, share_llm_prefix):
    model, batches = reference["model"], reference["batches"]
    n = sum(len(b) for b in batches)
    backbone = _Calls(model.backbone)
    vision = _Calls(model.condition_head.vision_encoder)
    predictor = _Calls(model.sem_seg_head.predictor)
    # 4 per pass: each image's expressions are decoded in two passes over one encoding
    wrapper = SharedImageFeatureInference(
        model, max_expressions_per_pass=4, share_llm_prefix=share_llm_prefix
    )
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            got = [o for b in batches for o in wrapper(b)]
            seconds = time.perf_counter() - t0
    finally:
        for c in (backbone, vision, predictor):
            c.handle.remove()
    assert len(backbone) == len(vision) == 2 * len(batches)  # once per pass (two per image)
    assert len(predictor) == 2 * len(batches)  # one decoder call per pass, batch = expressions
    assert all(o.shape[0] == 1 for o in vision.outputs)  # the tower sees the image once per pass
    assert wrapper.images_encoded == 2 * len(batches) and wrapper.expressions == n
    _assert_same_outputs(reference["outputs"], got)
    got_dec = [
        (o["pred_logits"][i], o["pred_masks"][i])
        for o in predictor.outputs
        for i in range(len(o["pred_logits"]))
    ]
    assert len(got_dec) == len(reference["decoder"])
    for (la, ma), (lb, mb) in zip(reference["decoder"], got_dec):
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mb, ma, atol=1e-5, rtol=1e-5)
    print(
        f"\n{n} expressions on {len(batches)} images, tiny model, CPU: per expression "
        f"{1e3 * reference['seconds'] / n:.1f} ms -> {1e3 * seconds / n:.1f} ms shared "
        f"(share_llm_prefix={share_llm_prefix}; timing only, the machine may be busy)"
    )


def test_interleaved_images_keep_input_order(reference):
    model, (a, b) = reference["model"], reference["batches"]
    ref = reference["outputs"]
    mixed = [a[0], a[1], b[0], a[2], b[1]]  # runs: [a a] [b] [a] [b]
    expected = [ref[0], ref[1], ref[PER_IMAGE], ref[2], ref[PER_IMAGE + 1]]
    assert group_consecutive_inputs(mixed) == [[0, 1], [2], [3], [4]]
    backbone = _Calls(model.backbone)
    with torch.no_grad():
        got = SharedImageFeatureInference(model)(mixed)
    backbone.handle.remove()
    assert len(backbone) == 4
    _assert_same_outputs(expected, got)


@pytest.mark.parametrize("opts", [("tokenizer_chat",), ("none",), ("siglip2",), ("lora",)])
def test_prefix_shared_conditions_equal_the_heads(setup, opts):
    paths = setup["llm"]
    extra = []
    if opts[0] == "tokenizer_chat":  # chat template: a longer common prefix before <image>
        extra = ["MODEL.LLM.TOKENIZER_PATH", paths["tokenizer_chat"]]
    cfg = _cfg(paths, *extra)
    if opts[0] in ("none", "siglip2"):
        cfg.merge_from_list(tiny_llm_cfg_overrides(paths, lora=False, vision=opts[0]))
    if opts[0] == "lora":  # peft-wrapped LLM: the decoder stack is reached through the base model
        cfg.merge_from_list(["MODEL.LLM.LORA.ENABLED", True, "MODEL.LLM.FREEZE", True])
    head = _model(cfg).condition_head
    image = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    texts = ["the red circle", "the blue square on the left", "<p>the dog</p> and <p>the cat</p>"]
    inputs = [{"image": image, "expression": t, "task": "referring"} for t in texts]
    index = torch.zeros(len(inputs), dtype=torch.long)
    decoder = head._decoder()
    lengths = []
    hook = decoder.register_forward_hook(
        lambda m, a, kw, o: lengths.append(kw["inputs_embeds"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ref = head(inputs)
            got = head(inputs, image_index=index, share_prefix=True)
    finally:
        hook.remove()
    full = lengths.pop(0)  # [3, T]: the plain pass
    if opts[0] != "none":
        # then the LLM ran twice: over the shared prefix (batch 1, through the image tokens), then
        # over the three rests on top of its cache, which together make the full sequences
        assert len(lengths) == 2 and lengths[0][0] == 1 and lengths[1][0] == 3
        assert lengths[0][1] > head.vision_encoder.num_tokens
        assert lengths[0][1] + lengths[1][1] == full[1]
    for key in ("condition_mask", "seg_mask"):
        assert torch.equal(got[key], ref[key])
    assert got["span_positions"] == ref["span_positions"] and got["seg_positions"] == ref["seg_positions"]
    torch.testing.assert_close(got["conditions"], ref["conditions"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["seg_embed"], ref["seg_embed"], atol=1e-5, rtol=1e-5)


def test_sampler_groups_by_image_and_shards_every_sample_once():
    keys = ["a", "a", "b", "b", "b", "c", "d", "d", None, None, "e"]
    single = list(GroupedInferenceSampler(keys, rank=0, world_size=1))
    assert single == [[0, 1], [2, 3, 4], [5], [6, 7], [8], [9], [10]]
    assert list(GroupedInferenceSampler(keys, 2, rank=0, world_size=1))[1:3] == [[2, 3], [4]]
    for world in (2, 3, 4):
        shards = [list(GroupedInferenceSampler(keys, rank=r, world_size=world)) for r in range(world)]
        flat = [i for shard in shards for g in shard for i in g]
        assert flat == list(range(len(keys)))  # each once, contiguous in rank order
        assert [g for shard in shards for g in shard] == single  # runs are never split
    with pytest.raises(ValueError):
        GroupedInferenceSampler(keys, rank=2, world_size=2)


def test_evaluation_metrics_match_the_per_expression_loop(reference, setup):
    if SMALL not in DatasetCatalog.list():
        DatasetCatalog.register(SMALL, lambda: DatasetCatalog.get(DATASET)[:16])  # 2 images
        MetadataCatalog.get(SMALL).set(evaluator_type="refer")
    cfg = _cfg(setup["llm"])
    model = reference["model"]
    loader = build_detection_test_loader(DatasetCatalog.get(SMALL), mapper=build_test_mapper(cfg, SMALL))
    ref = inference_on_dataset(model, loader, ReferringEvaluator(SMALL, distributed=False))["referring"]
    got = evaluate_with_shared_features(cfg, model, SMALL, ReferringEvaluator(SMALL, distributed=False))
    got = got["referring"]
    assert got["num_samples"] == ref["num_samples"] == 16
    for key, value in ref.items():
        assert abs(got[key] - value) < 0.05, (key, got[key], value)  # percent; see _assert_same_outputs


def test_training_mode_and_generic_mode_call_the_model(setup):
    cfg = _cfg(setup["llm"])
    model = _model(cfg)
    wrapper = SharedImageFeatureInference(model).train()
    mapper = build_test_mapper(cfg, DATASET)
    x = mapper(DatasetCatalog.get(DATASET)[0])
    calls = []
    model.forward = lambda batch: calls.append(len(batch)) or ["plain"]  # instance attr: nn.Module calls it
    assert wrapper([x, x]) == ["plain"] and calls == [2]
    wrapper.eval()
    model.mode = "generic"  # nothing per expression to share: the model's own forward
    assert wrapper([x]) == ["plain"] and calls == [2, 1]


def test_head_image_index_runs_the_tower_once_per_unique_image(setup):
    head = _model(_cfg(setup["llm"])).condition_head
    a = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    b = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    texts = ["the red circle", "the blue square", "the dog", "the cat"]
    inputs = [{"image": img, "expression": t, "task": "referring"} for img, t in zip([a, a, b, b], texts)]
    vision = _Calls(head.vision_encoder)
    with torch.no_grad():
        ref = head(inputs)
        got = head(inputs, image_index=torch.tensor([0, 0, 1, 1]))
    vision.handle.remove()
    assert [o.shape[0] for o in vision.outputs] == [4, 2]  # per input, then per unique image
    torch.testing.assert_close(got["conditions"], ref["conditions"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["seg_embed"], ref["seg_embed"], atol=1e-5, rtol=1e-5)
