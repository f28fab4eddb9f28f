"""Tests of the LLM condition head (flowseg.modeling.language) on tiny random models."""

from __future__ import annotations

import warnings

import pytest
import torch
from detectron2.config import get_cfg
from flowseg import add_flowseg_config
from flowseg.modeling.language import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    LLMConditionHead,
    VanillaEncoder,
    build_condition_head,
    build_instruction,
    build_turns,
    build_vision_tower,
    encode_sample,
    find_spans,
    load_tokenizer,
    pool_spans,
    shift_position,
)
from flowseg.modeling.language.prompts import dialogue_pieces
from tiny_llm import TINY_IMAGE_SIZE, make_tiny_llm_dir, tiny_llm_cfg_overrides, tiny_qwen3_config
from transformers import AutoModelForCausalLM, SiglipVisionModel

N_IMG = (TINY_IMAGE_SIZE // 8) ** 2  # tiny SigLIP: 32 px, patch 8


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny_llm"))


def make_cfg(paths, *extra, **kw):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_list(tiny_llm_cfg_overrides(paths, **kw) + list(extra))
    return cfg


def build_head(paths, *extra, **kw) -> LLMConditionHead:
    torch.manual_seed(0)
    return build_condition_head(make_cfg(paths, *extra, **kw))


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def batch():
    return [
        {"image": image(40, 56, 1), "task": "referring", "expression": "the red car"},
        {"image": image(64, 48, 2), "task": "generic", "class_names": ["person", "dog", "cat"]},
        {
            "image": image(33, 33, 3),
            "task": "reasoning",
            "expression": "the <p>big dog</p> next to the <p>man</p>",
        },
    ]


def expanded_tokens(tokenizer, ids, n_img):
    """Token list of the LLM sequence computed independently: <image> becomes n_img IMG entries."""
    out = []
    for tok, i in zip(tokenizer.convert_ids_to_tokens(ids), ids):
        out += [("IMG", -1)] * n_img if tok == "<image>" else [(tok, i)]
    return out


# --------------------------------------------------------------------------- tokens / embeddings
@pytest.mark.parametrize("tie", [False, True])
def test_special_tokens_single_ids_and_mean_initialised_rows(tiny_paths, tie):
    tok = load_tokenizer(tiny_paths["tokenizer"])
    n0 = len(tok)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(tiny_qwen3_config(n0, tie))
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    head = LLMConditionHead(llm=llm, tokenizer=tok, hidden_dim=16, lora=None, freeze_llm=True)

    assert len(tok) == n0 + 4
    new_ids = []
    for t in SPECIAL_TOKENS:
        ids = tok(f"segment{t}the dog", add_special_tokens=False)["input_ids"]
        tid = tok.convert_tokens_to_ids(t)
        assert tid >= n0 and ids.count(tid) == 1 and tok.convert_ids_to_tokens(tid) == t
        new_ids.append(tid)
    assert sorted(new_ids) == list(range(n0, n0 + 4))

    emb = head.llm.get_input_embeddings()
    rows = emb(torch.arange(n0 + 4)).detach()
    assert rows.shape == (n0 + 4, 64)
    torch.testing.assert_close(rows[:n0], old_in)
    for tid in new_ids:
        torch.testing.assert_close(rows[tid], old_in.mean(0))
    # Effective output matrix: the (wrapped) lm_head applied to the identity gives W^T.
    w_out = head.llm.get_output_embeddings()(torch.eye(64)).detach().T
    assert w_out.shape == (n0 + 4, 64)
    if tie:
        torch.testing.assert_close(w_out, rows)
    else:
        torch.testing.assert_close(w_out[:n0], old_out)
        for tid in new_ids:
            torch.testing.assert_close(w_out[tid], old_out.mean(0))


# --------------------------------------------------------------------------- prompts
def test_instruction_templates_and_fallback_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the template paths must not warn
        assert (
            build_instruction({"task": "referring", "expression": "the red car"})
            == "Please segment <p>the red car</p> in this image."
        )
        assert build_instruction({"task": "reasoning", "expression": "what can hold water?"}).startswith(
            "<p>what can hold water?</p> "
        )
        generic = build_instruction({"task": "generic", "class_names": ["person", "traffic light"]})
        assert "<p>person</p>, <p>traffic light</p>" in generic
        marked = "find the <p>dog</p> left of the <p>tree</p>"
        assert build_instruction({"task": "referring", "expression": marked}) == marked
    with pytest.warns(UserWarning, match="phrase markers"):
        text = build_instruction({"task": "referring", "prompt": "find the dog near the tree"})
    assert text == "<p>find the dog near the tree</p>"


def test_no_marker_prompt_uses_whole_expression_as_span(tiny_paths):
    head = build_head(tiny_paths)
    tok = head.tokenizer
    with pytest.warns(UserWarning, match="whole text is used as the phrase"):
        enc = encode_sample(
            tok, {"task": "referring", "prompt": "find the dog near the tree"}, head.token_ids
        )
    assert len(enc.spans) == 1
    s, e = enc.spans[0]
    assert tok.decode(enc.input_ids[s : e + 1]) == "<p>find the dog near the tree</p>"


@pytest.mark.parametrize(
    "sample",
    [
        {"task": "referring", "prompt": "segment <p>the car in the image"},
        {"task": "referring", "expression": "the car</p> and <p>dog"},
        {"task": "reasoning", "expression": "<p>a <p>b</p></p>"},
        {"task": "conversation", "expression": "what is </p> this", "answer": "a dog"},
    ],
)
def test_unbalanced_markers_raise(sample):
    text = sample.get("prompt") or sample["expression"]
    with pytest.raises(ValueError, match="unbalanced") as err:
        build_instruction(sample)
    assert repr(text) in str(err.value)


_Q = "<image>\nwhat is <SEG> here?"


@pytest.mark.parametrize(
    "sample, what, tokens",
    [
        ({"task": "referring", "expression": "the <SEG> red circle"}, "expression", "<SEG>"),
        ({"task": "referring", "expression": "<SEG>"}, "expression", "<SEG>"),
        ({"task": "referring", "expression": "the <image> red circle"}, "expression", "<image>"),
        ({"task": "reasoning", "expression": "<p>what holds water</p> <SEG>"}, "expression", "<SEG>"),
        ({"task": "referring", "prompt": "Segment <p>the box</p> <image>"}, "prompt", "<image>"),
        ({"task": "referring", "expressions": ["a box", "the <image> disc"]}, "packed expression", "<image>"),
        ({"task": "referring", "expressions": ["a box", "the <p>disc</p>"]}, "packed expression", "<p> </p>"),
        ({"task": "generic", "class_names": ["cat", "<SEG>"]}, "class name", "<SEG>"),
        (
            {
                "task": "conversation",
                "conversations": [{"from": "human", "value": _Q}, {"from": "gpt", "value": "a"}],
            },
            "question 0",
            "<SEG>",
        ),
    ],
)
@pytest.mark.parametrize("style", ["flowseg", "xsam"])
def test_special_tokens_typed_in_user_text_are_refused(sample, what, tokens, style):
    with pytest.raises(ValueError, match=f"^{what} .* contains the special token\\(s\\) {tokens} ") as err:
        dialogue_pieces(None, sample, True, style)  # refused before any rendering
    assert "remove them" in str(err.value)


def test_marked_instructions_and_llava_placeholders_still_accepted():
    marked = "find the <p>red</p> circle"
    assert build_turns({"task": "referring", "expression": marked})[0][0] == marked
    conv = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a dog"}]
    assert build_turns({"task": "conversation", "conversations": conv}) == [("what is this?", "a dog")]


def test_bad_samples_raise():
    with pytest.raises(ValueError, match="class name"):
        build_instruction({"task": "generic", "class_names": ["<p>dog</p>"]})
    with pytest.raises(ValueError, match="class_names"):
        build_instruction({"task": "generic"})
    with pytest.raises(ValueError, match="unknown task"):
        build_instruction({"task": "detection", "expression": "x"})
    with pytest.raises(ValueError, match="unbalanced"):
        find_spans([1, 7, 2, 7, 3], 7, 8, "truncated text")  # two <p> (id 7), no </p>


def test_max_length(tiny_paths):
    tok = load_tokenizer(tiny_paths["tokenizer"])
    head = build_head(tiny_paths, vision="none")
    with pytest.raises(ValueError, match="MAX_LENGTH"):
        encode_sample(tok, {"task": "referring", "expression": "dog " * 50}, head.token_ids, max_length=20)
    conv = {"task": "conversation", "expression": "describe " * 50, "answer": "a dog"}
    enc = encode_sample(tok, conv, head.token_ids, with_image=False, max_length=20)
    assert len(enc.input_ids) == len(enc.labels) == 20


# --------------------------------------------------------------------------- positions
def test_span_and_seg_positions_with_image_tokens(tiny_paths):
    head = build_head(tiny_paths).eval()
    tok = head.tokenizer
    samples = batch()
    with torch.no_grad():
        out = head(samples, return_hidden_states=True)
        img_tokens = head.vis_projector(head.vision_encoder([x["image"] for x in samples]))
    assert img_tokens.shape[1] == N_IMG
    emb = head.llm.get_input_embeddings()
    expected_texts = [
        ["<p>the red car</p>"],
        ["<p>person</p>", "<p>dog</p>", "<p>cat</p>"],
        ["<p>big dog</p>", "<p>man</p>"],
    ]
    for b, enc in enumerate(head.encode(samples)):
        seq = expanded_tokens(tok, enc.input_ids, N_IMG)
        assert int(out["attention_mask"][b].sum()) == len(seq)
        starts = [i for i, (t, _) in enumerate(seq) if t == "<p>"]
        ends = [i for i, (t, _) in enumerate(seq) if t == "</p>"]
        assert out["span_positions"][b] == list(zip(starts, ends))
        assert out["seg_positions"][b] == [i for i, (t, _) in enumerate(seq) if t == "<SEG>"][0]
        assert [tok.decode([i for _, i in seq[s : e + 1]]) for s, e in zip(starts, ends)] == expected_texts[b]
        # the sequence really holds those tokens there, and the image tokens where IMG is
        for s, e in out["span_positions"][b]:
            torch.testing.assert_close(out["inputs_embeds"][b, s], emb(torch.tensor(head.token_ids.p_start)))
            torch.testing.assert_close(out["inputs_embeds"][b, e], emb(torch.tensor(head.token_ids.p_end)))
        img = [i for i, (t, _) in enumerate(seq) if t == "IMG"]
        assert img == list(range(img[0], img[0] + N_IMG))
        torch.testing.assert_close(out["inputs_embeds"][b, img[0] : img[-1] + 1], img_tokens[b])
        # shifting rule: positions after the placeholder move by N - 1
        assert out["span_positions"][b][0][0] == enc.spans[0][0] + N_IMG - 1
    assert out["condition_mask"].tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert shift_position(3, 5, 16) == 3 and shift_position(7, 5, 16) == 22


def test_vision_disabled_drops_image_placeholder(tiny_paths):
    head = build_head(tiny_paths, vision="none").eval()
    assert head.vision_encoder is None and head.vis_projector is None
    samples = [{"task": "referring", "expression": "the dog"}]
    enc = head.encode(samples)[0]
    assert head.token_ids.image not in enc.input_ids and enc.image_position is None
    with torch.no_grad():
        out = head(samples)
    assert out["span_positions"] == [enc.spans] and out["seg_positions"] == [enc.seg_position]
    assert out["seg_mask"].tolist() == [True]


# --------------------------------------------------------------------------- conditions, SEG, loss
def test_conditions_and_seg_match_hand_computation(tiny_paths):
    head = build_head(tiny_paths).eval()
    samples = batch()
    with torch.no_grad():
        out = head(samples, compute_loss=True, return_hidden_states=True)
        # independent path: the full causal LM (PEFT forward, all hidden states, HF loss)
        full = head.llm(
            inputs_embeds=out["inputs_embeds"],
            attention_mask=out["attention_mask"],
            labels=out["labels"],
            output_hidden_states=True,
        )
    hidden = full.hidden_states[-1]
    valid = out["attention_mask"].bool()
    torch.testing.assert_close(out["hidden_states"][valid], hidden[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["loss_llm"], full.loss, atol=1e-5, rtol=1e-4)

    phi = head.llm_projector
    assert out["conditions"].shape == (3, 3, 256) and out["seg_embed"].shape == (3, 256)
    with torch.no_grad():
        for b in range(3):
            spans = out["span_positions"][b]
            for k, (s, e) in enumerate(spans):
                expected = phi(hidden[b, s : e + 1]).mean(0)  # mean of projected states, markers included
                torch.testing.assert_close(out["conditions"][b, k], expected, atol=1e-5, rtol=1e-4)
            assert torch.all(out["conditions"][b, len(spans) :] == 0)
            seg = out["seg_positions"][b]
            torch.testing.assert_close(out["seg_embed"][b], phi(hidden[b, seg]), atol=1e-5, rtol=1e-4)
    assert out["seg_mask"].all()
    # the output of pool_spans is what the conditions use
    h = torch.arange(12.0).view(6, 2)
    torch.testing.assert_close(pool_spans(h, [(0, 1), (2, 5)]), torch.tensor([[1.0, 2.0], [7.0, 8.0]]))
    assert pool_spans(h, []).shape == (0, 2)


def test_labels_cover_answer_tokens_only(tiny_paths):
    head = build_head(tiny_paths).eval()
    tok = head.tokenizer
    samples = batch()[:2]
    samples[1]["answer"] = "Here: <SEG> for all of them."
    with torch.no_grad():
        out = head(samples, compute_loss=True, return_hidden_states=True)
    answers = [" Sure, it is <SEG>.<|endoftext|>", " Here: <SEG> for all of them.<|endoftext|>"]
    for b, enc in enumerate(head.encode(samples)):
        labels = out["labels"][b]
        n = int(out["attention_mask"][b].sum())
        answer_ids = tok(answers[b], add_special_tokens=False)["input_ids"]
        assert labels[: n - len(answer_ids)].eq(IGNORE_INDEX).all()  # prompt + image tokens
        assert labels[n - len(answer_ids) : n].tolist() == answer_ids
        assert labels[n:].eq(IGNORE_INDEX).all()  # padding
        assert enc.input_ids[-len(answer_ids) :] == answer_ids
    assert out["labels"].shape[1] > int(out["attention_mask"][0].sum())  # sample 0 is padded


def test_chat_template_prompt_and_labels(tiny_paths):
    head = build_head(tiny_paths, "MODEL.LLM.TOKENIZER_PATH", tiny_paths["tokenizer_chat"]).eval()
    tok = head.tokenizer
    enc = head.encode([{"image": image(32, 32), "task": "referring", "expression": "the dog"}])[0]
    assert enc.text.startswith("<|im_start|>user\n<image>\nPlease segment <p>the dog</p>")
    answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer) == "Sure, it is <SEG>.<|im_end|>\n"
    assert enc.labels[: len(enc.labels) - len(answer)] == [IGNORE_INDEX] * (len(enc.labels) - len(answer))
    # multi-turn LLaVA-style conversation: both gpt turns are supervised, no SEG, no spans
    conv = {
        "image": image(32, 32),
        "task": "conversation",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is this?"},
            {"from": "gpt", "value": "a dog"},
            {"from": "human", "value": "what color?"},
            {"from": "gpt", "value": "brown"},
        ],
    }
    enc = head.encode([conv])[0]
    assert enc.text.count("<image>") == 1 and not enc.spans and enc.seg_position is None
    supervised = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert supervised == "a dog<|im_end|>\nbrown<|im_end|>\n"
    with torch.no_grad():
        out = head([conv, {"image": image(40, 40), "task": "referring", "expression": "the cat"}])
    assert out["seg_mask"].tolist() == [False, True] and out["condition_mask"].tolist() == [[False], [True]]
    assert torch.all(out["seg_embed"][0] == 0) and torch.all(out["conditions"][0] == 0)


# --------------------------------------------------------------------------- training
def test_lora_trainable_parameters_and_loss_decreases(tiny_paths):
    head = build_head(tiny_paths).train()
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens_delta" in n for n in trainable)
    for n in trainable:
        assert (
            "lora_" in n
            or "trainable_tokens_delta" in n
            or n.startswith(("llm_projector.", "vis_projector."))
        ), n
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert {t for t in targets if any(f"{t}.lora_A" in n for n in trainable)} == set(targets)
    assert not any(p.requires_grad for p in head.vision_encoder.parameters())

    embed_before = head.llm.get_input_embeddings()(torch.arange(len(head.tokenizer))).detach().clone()
    base_q = next(
        p for n, p in head.named_parameters() if n.endswith("layers.0.self_attn.q_proj.base_layer.weight")
    )
    base_q_before = base_q.detach().clone()

    samples = batch()[:2]
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(20):
        out = head(samples)
        loss = out["loss_llm"]
        if step == 0:  # conditions / SEG are differentiable w.r.t. projector and LoRA
            (out["conditions"].sum() + out["seg_embed"].sum()).backward(retain_graph=True)
            assert head.llm_projector[0].weight.grad.abs().sum() > 0
            lora_b = [p for n, p in head.named_parameters() if "lora_B" in n]  # lora_A gets 0: B starts at 0
            assert all(p.grad is not None for p in lora_b) and sum(p.grad.abs().sum() for p in lora_b) > 0
            opt.zero_grad()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # ln(vocab) ≈ 6.2 at the start; a steady fall of > 1 nat over 20 steps (≈ 6.2 → 4.8 here)
    assert losses[-1] < losses[0] - 1.0 and max(losses[10:]) < losses[0] - 0.5, losses

    embed_after = head.llm.get_input_embeddings()(torch.arange(len(head.tokenizer))).detach()
    new_rows = [head.token_ids.p_start, head.token_ids.p_end, head.token_ids.seg]
    old_rows = [i for i in range(len(head.tokenizer)) if i not in new_rows + [head.token_ids.image]]
    torch.testing.assert_close(embed_after[old_rows], embed_before[old_rows])  # base rows frozen
    assert not torch.allclose(embed_after[new_rows], embed_before[new_rows])  # new token rows train
    torch.testing.assert_close(base_q, base_q_before)


@pytest.mark.parametrize("freeze", [True, False])
def test_no_lora_trainable_sets(tiny_paths, freeze):
    head = build_head(tiny_paths, "MODEL.LLM.FREEZE", freeze, vision="none", lora=False)
    llm_trainable = [n for n, p in head.llm.named_parameters() if p.requires_grad]
    if freeze:  # only the new token rows (input + untied output embedding)
        assert len(llm_trainable) == 2 and all("trainable_tokens_delta" in n for n in llm_trainable)
    else:
        assert all(p.requires_grad for p in head.llm.parameters())


# --------------------------------------------------------------------------- loading / vision
def test_build_from_saved_weights_through_config_keys(tiny_paths):
    head = build_head(tiny_paths, from_weights=True).eval()
    saved_llm = AutoModelForCausalLM.from_pretrained(tiny_paths["llm"])
    saved_vis = SiglipVisionModel.from_pretrained(tiny_paths["vision"])
    q = next(
        p for n, p in head.named_parameters() if n.endswith("layers.1.self_attn.q_proj.base_layer.weight")
    )
    torch.testing.assert_close(q, saved_llm.model.layers[1].self_attn.q_proj.weight)
    torch.testing.assert_close(
        head.vision_encoder.tower.embeddings.patch_embedding.weight,
        saved_vis.embeddings.patch_embedding.weight,
    )
    samples = [
        {"image": image(48, 80, 5), "task": "referring", "expression": "the man on the left"},
        {
            "image": image(96, 64, 6),
            "task": "reasoning",
            "expression": "what could keep you dry in the rain?",
        },
    ]
    with torch.no_grad():
        out = head(samples, compute_loss=True)
    assert out["conditions"].shape == (2, 1, 256) and out["seg_embed"].shape == (2, 256)
    assert out["condition_mask"].all() and out["seg_mask"].all()
    assert torch.isfinite(out["conditions"]).all() and torch.isfinite(out["loss_llm"])


def test_vanilla_encoder_preprocessing_and_bgr(tiny_paths):
    tower = build_vision_tower(config=tiny_paths["vision_config"])
    rgb = VanillaEncoder(tower, image_size=32, input_format="RGB")
    bgr = VanillaEncoder(tower, image_size=32, input_format="BGR")
    img = image(50, 70, 7)
    x = rgb.preprocess([img])
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    flat = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    torch.testing.assert_close(rgb.preprocess([flat]), torch.ones(1, 3, 32, 32))
    torch.testing.assert_close(bgr.preprocess([img.flip(0)]), x)
    with torch.no_grad():
        assert rgb([img, image(20, 20)]).shape == (2, N_IMG, 32)


def test_siglip2_naflex_tower(tiny_paths):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    tower = build_vision_tower(config=tiny_paths["siglip2_vision_config"]).eval()
    assert type(tower).__name__ == "Siglip2VisionModel"
    enc = VanillaEncoder(tower, image_size=32, input_format="RGB")
    assert enc.naflex and enc.num_tokens == 16
    imgs = [image(40, 60, 8), image(32, 32, 9)]
    with torch.no_grad():
        feats = enc(imgs)
        x = enc.preprocess(imgs)
        patches = torch.stack([convert_image_to_patches(xi, 8) for xi in x])  # the HF processor's layout
        ref = tower(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
        ).last_hidden_state
    torch.testing.assert_close(feats, ref)
    # the whole head with a SigLIP2 tower
    head = build_head(tiny_paths, vision="siglip2").eval()
    with torch.no_grad():
        out = head(batch()[:1], return_hidden_states=True)
    assert out["hidden_states"].shape[1] == len(head.encode(batch()[:1])[0].input_ids) + 16 - 1
    assert out["seg_mask"].all()


def test_bf16_llm_with_gradient_checkpointing(tiny_paths):
    head = build_head(
        tiny_paths, "MODEL.LLM.TORCH_DTYPE", "bfloat16", "MODEL.LLM.GRADIENT_CHECKPOINTING", True
    ).train()
    base = head.llm.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert next(head.vision_encoder.tower.parameters()).dtype == torch.bfloat16
    assert head.llm_projector[0].weight.dtype == torch.float32  # projectors train in fp32
    out = head(batch())
    assert out["conditions"].dtype == torch.float32 and torch.isfinite(out["loss_llm"])
    (out["loss_llm"] + out["conditions"].sum() + out["seg_embed"].sum()).backward()
    assert head.vis_projector[0].weight.grad is not None
    assert all(p.grad is not None for n, p in head.named_parameters() if "lora_B" in n)
