"""Bidirectional Semantic Flow (FlowSeg eq. 1-5, Algorithm 1) on a tiny random decoder."""

import math

import torch
from flowseg.modeling.transformer_decoder import BSFTransformerDecoder
from hf_tiny import bsf_decoder, decoder_inputs
from torch import nn

HIDDEN, HEADS, LAYERS, QUERIES, K = 32, 4, 3, 6, 3


def _decoder(seed: int = 0, **kw) -> BSFTransformerDecoder:
    torch.manual_seed(seed)
    kw.setdefault("condition_logits", True)
    return bsf_decoder(
        hidden=HIDDEN, heads=HEADS, queries=QUERIES, classes=5, layers=LAYERS, feedforward=64, **kw
    )


def _inputs(b: int = 2, seed: int = 0):
    return decoder_inputs(b, HIDDEN, HIDDEN, seed, conditions=K)


def _mha_by_hand(attn: nn.MultiheadAttention, q, k, v, key_padding_mask=None):
    """MHA from the module's weights; inputs [L,B,E]. Returns (out [Lq,B,E], attn [B,Lq,Lk])."""
    e, h = attn.embed_dim, attn.num_heads
    d = e // h
    w, b = attn.in_proj_weight, attn.in_proj_bias
    qp, kp, vp = q @ w[:e].T + b[:e], k @ w[e : 2 * e].T + b[e : 2 * e], v @ w[2 * e :].T + b[2 * e :]

    def heads(t):  # [L,B,E] -> [B,H,L,d]
        return t.reshape(t.shape[0], t.shape[1], h, d).permute(1, 2, 0, 3)

    scores = heads(qp) @ heads(kp).transpose(-1, -2) / math.sqrt(d)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = (probs @ heads(vp)).permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], e)
    return attn.out_proj(out), probs.mean(1)


def _capture(module: nn.Module, store: list, with_input: bool = False):
    def hook(_mod, args, output):
        store.append((args, output) if with_input else output)

    return module.register_forward_hook(hook)


# ---------------------------------------------------------------------------- condition refinement
def test_cr_off_keeps_conditions_bitwise():
    dec = _decoder(semantic_refinement=True, condition_refinement=False)
    x, mf, cond = _inputs()
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, return_intermediates=True)
    assert len(out["conditions"]) == LAYERS + 1
    for c in out["conditions"]:
        assert torch.equal(c, cond)
    assert out["cond_attn"] == []


def test_cr_on_matches_eq5_by_hand():
    # xavier-initialised output projection, so that every layer's update is non-zero
    dec = _decoder(semantic_refinement=True, condition_refinement=True, cr_zero_init=False)
    x, mf, cond = _inputs()
    q_s = []
    hooks = [_capture(layer, q_s) for layer in dec.transformer_self_attention_layers]
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, return_intermediates=True)
    for hk in hooks:
        hk.remove()
    conds = out["conditions"]
    assert len(conds) == LAYERS + 1 and torch.equal(conds[0], cond)
    for layer in range(1, LAYERS + 1):
        assert not torch.allclose(conds[layer], conds[layer - 1], atol=1e-3)

    query_pos = dec.query_embed.weight[:, None, :].expand(-1, 2, -1)
    with torch.no_grad():
        for layer in range(LAYERS):
            cr = dec.condition_refinement_layers[layer]
            c_prev = conds[layer].transpose(0, 1)  # [K,B,h]
            delta, weights = _mha_by_hand(
                cr.multihead_attn, cr.norm(c_prev), q_s[layer] + query_pos, q_s[layer]
            )
            torch.testing.assert_close(
                conds[layer + 1] - conds[layer], delta.transpose(0, 1), atol=1e-5, rtol=1e-4
            )
            assert out["cond_attn"][layer].shape == (2, K, QUERIES)
            torch.testing.assert_close(out["cond_attn"][layer], weights, atol=1e-5, rtol=1e-4)


def test_cr_zero_init_starts_at_c0_and_learns():
    """Default init: C(l) = C(0) at every layer before training (Table 12's cosine 1), yet the
    output projection gets a gradient, so eq. 5's update can be learned."""
    dec = _decoder(semantic_refinement=True, condition_refinement=True).train()
    x, mf, cond = _inputs()
    out = dec(x, mf, conditions=cond, return_intermediates=True)
    for c in out["conditions"]:
        torch.testing.assert_close(c, cond, atol=0, rtol=0)
    out["pred_logits"][..., 0].sum().backward()
    grads = [layer.multihead_attn.out_proj.weight.grad for layer in dec.condition_refinement_layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gate_bias_init_sets_the_initial_gate():
    x, mf, cond = _inputs()
    for bias, lo, hi in ((0.0, 0.3, 0.7), (4.0, 0.9, 1.0)):
        dec = _decoder(semantic_refinement=True, gate_bias_init=bias)
        with torch.no_grad():
            gates = dec(x, mf, conditions=cond, return_intermediates=True)["gates"]
        mean = torch.stack([g.mean() for g in gates]).mean().item()
        assert lo < mean < hi, (bias, mean)


# ---------------------------------------------------------------------------- semantic refinement
def test_sr_gate_and_fusion_match_eq1_to_eq3():
    dec = _decoder(semantic_refinement=True, condition_refinement=True)
    x, mf, cond = _inputs()
    valid = torch.tensor([[True, True, True], [True, True, False]])
    sem, fused = [], []
    hooks = [_capture(m, sem, with_input=True) for m in dec.semantic_cross_attention_layers]
    hooks += [_capture(m, fused, with_input=True) for m in dec.transformer_self_attention_layers]
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, condition_mask=valid, return_intermediates=True)
    for hk in hooks:
        hk.remove()
    assert len(out["gates"]) == len(out["sem_attn"]) == LAYERS

    query_pos = dec.query_embed.weight[:, None, :].expand(-1, 2, -1)
    with torch.no_grad():
        for layer in range(LAYERS):
            (q_vis, c_layer), (q_sem, _) = sem[layer][0][:2], sem[layer][1]
            torch.testing.assert_close(c_layer.transpose(0, 1), out["conditions"][layer], atol=0, rtol=0)
            # eq. 1: Q_sem = LN(MHA(Q_vis + pos, C, C)) with padded conditions masked out
            sr = dec.semantic_cross_attention_layers[layer]
            attn_out, weights = _mha_by_hand(sr.multihead_attn, q_vis + query_pos, c_layer, c_layer, ~valid)
            torch.testing.assert_close(q_sem, sr.norm(attn_out), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out["sem_attn"][layer], weights, atol=1e-5, rtol=1e-4)
            assert torch.all(out["sem_attn"][layer][1, :, 2] == 0)  # padded condition gets no attention
            # eq. 2: g = sigmoid(W_g [Q_vis || Q_sem])
            gate = torch.sigmoid(dec.fusion_gates[layer](torch.cat([q_vis, q_sem], dim=-1)))
            torch.testing.assert_close(out["gates"][layer], gate.transpose(0, 1), atol=1e-6, rtol=0)
            assert out["gates"][layer].shape == (2, QUERIES, HIDDEN)
            # eq. 3: the self-attention (eq. 4) receives g*Q_vis + (1-g)*Q_sem
            q_fused = fused[layer][0][0]
            torch.testing.assert_close(q_fused, gate * q_vis + (1 - gate) * q_sem, atol=1e-6, rtol=0)
    gate_means = [g.mean().item() for g in out["gates"]]
    assert all(0.0 < m < 1.0 for m in gate_means)


def test_queries_depend_on_conditions_only_with_sr():
    x, mf, cond = _inputs()
    g = torch.Generator().manual_seed(123)
    draws = [torch.randn(2, K, HIDDEN, generator=g) for _ in range(5)]
    reference = torch.randn(2, K, HIDDEN, generator=g)  # fixed matching target: isolates query evolution

    def run(dec, c):
        with torch.no_grad():
            out = dec(x, mf, conditions=c)
            selected = dec.condition_class_logits(out["query_embeds"], reference)[..., 0].argmax(dim=1)
        return out, selected

    # SR off (CR on): C only flows into C, never into the queries.
    no_sr = _decoder(semantic_refinement=False, condition_refinement=True)
    base, base_sel = run(no_sr, cond)
    for c in draws:
        out, sel = run(no_sr, c)
        assert torch.equal(out["pred_masks"], base["pred_masks"])
        assert torch.equal(out["query_embeds"], base["query_embeds"])
        assert torch.equal(sel, base_sel)
    assert not torch.allclose(out["pred_logits"], base["pred_logits"])  # the matching still uses C

    # SR on: masks and query embeddings follow C, and so does the selected query.
    with_sr = _decoder(semantic_refinement=True, condition_refinement=True)
    base, base_sel = run(with_sr, cond)
    changed_selection = 0
    for c in draws:
        out, sel = run(with_sr, c)
        assert (out["pred_masks"] - base["pred_masks"]).abs().max() > 1e-3
        assert (out["query_embeds"] - base["query_embeds"]).abs().max() > 1e-3
        changed_selection += int(not torch.equal(sel, base_sel))
    assert changed_selection >= 1


def test_padded_conditions_do_not_influence_results():
    dec = _decoder(semantic_refinement=True, condition_refinement=True)
    x, mf, cond = _inputs()
    valid = torch.tensor([[True, True, True], [True, False, False]])
    altered = cond.clone()
    altered[1, 1:] = 100.0 * torch.randn(2, HIDDEN)
    with torch.no_grad():
        a = dec(x, mf, conditions=cond, condition_mask=valid, return_intermediates=True)
        b = dec(x, mf, conditions=altered, condition_mask=valid, return_intermediates=True)
        # sample 1 alone with only its valid condition (no padding at all)
        single = dec([t[1:] for t in x], mf[1:], conditions=cond[1:, :1])
    for key in ("pred_logits", "pred_masks", "query_embeds"):
        assert torch.equal(a[key], b[key]), key
    for aux_a, aux_b in zip(a["aux_outputs"], b["aux_outputs"]):
        assert torch.equal(aux_a["pred_logits"], aux_b["pred_logits"])
    for ca, cb in zip(a["conditions"], b["conditions"]):
        assert torch.equal(ca[:, :1], cb[:, :1]) and torch.equal(ca[0], cb[0])
    assert torch.all(a["pred_logits"][1, :, 1:K] == -1e4)
    torch.testing.assert_close(a["pred_masks"][1:], single["pred_masks"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["pred_logits"][1:, :, [0, K]], single["pred_logits"], atol=1e-5, rtol=1e-5)


def test_sample_without_valid_conditions_skips_sr_and_stays_finite():
    dec = _decoder(semantic_refinement=True, condition_refinement=True)
    x, mf, cond = _inputs()
    valid = torch.tensor([[True, True, False], [False, False, False]])
    fused = []
    hooks = [_capture(m, fused, with_input=True) for m in dec.transformer_self_attention_layers]
    vis = []
    hooks += [_capture(m, vis) for m in dec.transformer_cross_attention_layers]
    with torch.no_grad():
        out = dec(x, mf, conditions=cond, condition_mask=valid)
    for hk in hooks:
        hk.remove()
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()
    for layer in range(LAYERS):
        assert torch.equal(fused[layer][0][0][:, 1], vis[layer][:, 1])  # Q_fused = Q_vis for sample 1
        assert not torch.equal(fused[layer][0][0][:, 0], vis[layer][:, 0])


# ---------------------------------------------------------------------------- SEG embedding
def test_seg_embedding_enters_first_layer():
    dec = _decoder(semantic_refinement=True, condition_refinement=True)
    x, mf, cond = _inputs()
    seg = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(7))
    first = []
    hook = _capture(dec.transformer_cross_attention_layers[0], first, with_input=True)
    with torch.no_grad():
        with_s = dec(x, mf, conditions=cond, seg_embed=seg)
        zero_s = dec(x, mf, conditions=cond, seg_embed=torch.zeros_like(seg))
        no_s = dec(x, mf, conditions=cond)
    hook.remove()
    expected_q0 = dec.query_feat.weight[:, None, :] + seg[None]
    assert torch.equal(first[0][0][0], expected_q0)  # Q(0) + S is what layer 1 reads
    assert torch.equal(first[2][0][0], dec.query_feat.weight[:, None, :].expand(-1, 2, -1))
    for key in ("pred_logits", "pred_masks", "query_embeds"):
        assert torch.equal(zero_s[key], no_s[key])
        assert (with_s[key] - no_s[key]).abs().max() > 1e-3
    # the pre-layer prediction reads Q(0) + S as well
    assert not torch.equal(with_s["aux_outputs"][0]["pred_masks"], no_s["aux_outputs"][0]["pred_masks"])

    dec.add_seg_embed_to_queries = False  # ablation switch: S ignored
    with torch.no_grad():
        off = dec(x, mf, conditions=cond, seg_embed=seg)
    assert torch.equal(off["pred_masks"], no_s["pred_masks"])


# ---------------------------------------------------------------------------- visual control
def test_visual_cross_attn_control_reads_pixels_not_conditions():
    dec = _decoder(semantic_refinement=True, visual_cross_attn_control=True)
    assert not hasattr(dec, "condition_refinement_layers")
    x, mf, cond = _inputs()
    with torch.no_grad():
        a = dec(x, mf, conditions=cond, return_intermediates=True)
        b = dec(x, mf, conditions=torch.randn_like(cond), return_intermediates=True)
    assert torch.equal(a["pred_masks"], b["pred_masks"])  # C is only used for the final matching
    assert not torch.equal(a["pred_logits"], b["pred_logits"])
    hw = [2 * 3, 4 * 6, 8 * 12]
    assert [w.shape for w in a["sem_attn"]] == [(2, QUERIES, hw[i % 3]) for i in range(LAYERS)]
    assert all(torch.equal(c, cond) for c in a["conditions"])

    # no class head on conditions -> the control runs without any conditions
    plain = _decoder(semantic_refinement=True, visual_cross_attn_control=True, condition_logits=False)
    with torch.no_grad():
        assert plain(x, mf)["pred_masks"].shape == (2, QUERIES, 16, 24)


def test_intermediates_are_optional_and_do_not_change_outputs():
    dec = _decoder(semantic_refinement=True, condition_refinement=True)
    x, mf, cond = _inputs()
    with torch.no_grad():
        plain = dec(x, mf, conditions=cond)
        full = dec(x, mf, conditions=cond, return_intermediates=True)
    assert set(plain) == {"pred_logits", "pred_masks", "aux_outputs", "query_embeds"}
    assert set(full) == set(plain) | {"gates", "conditions", "cond_attn", "sem_attn"}
    for key in ("pred_logits", "pred_masks", "query_embeds"):
        torch.testing.assert_close(plain[key], full[key], atol=1e-5, rtol=1e-5)


def test_both_switches_off_is_the_baseline():
    base = _decoder(seed=3)
    off = _decoder(seed=3, semantic_refinement=False, condition_refinement=False)
    assert set(base.state_dict()) == set(off.state_dict())
    x, mf, cond = _inputs()
    with torch.no_grad():
        a, b = base(x, mf, conditions=cond), off(x, mf, conditions=torch.randn_like(cond))
    assert torch.equal(a["pred_masks"], b["pred_masks"])


def test_every_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs every parameter in the graph (incl. the last CR,
    # whose C(L) feeds the final matching logits).
    dec = _decoder(semantic_refinement=True, condition_refinement=True).train()
    x, mf, cond = _inputs()
    out = dec(x, mf, conditions=cond, seg_embed=torch.randn(2, HIDDEN))
    preds = [out] + out["aux_outputs"]
    loss = sum(p["pred_logits"].logsumexp(-1).mean() + p["pred_masks"].sigmoid().mean() for p in preds)
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


# ---------------------------------------------------------------------------- parameters (paper §4.1)
def _paper_decoder(**kw) -> BSFTransformerDecoder:
    return bsf_decoder(
        hidden=256, heads=8, queries=200, classes=133, layers=9, feedforward=2048, condition_logits=True, **kw
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_at_paper_sizes():
    torch.manual_seed(0)
    baseline = _count(_paper_decoder())
    bsf = _count(_paper_decoder(semantic_refinement=True, condition_refinement=True))
    sr_only = _count(_paper_decoder(semantic_refinement=True))
    visual = _count(_paper_decoder(semantic_refinement=True, visual_cross_attn_control=True))
    added = bsf - baseline
    print(
        f"\nBSF decoder parameters: baseline {baseline / 1e6:.3f}M, +SR+CR {bsf / 1e6:.3f}M, added {added:,} "
        f"({added / 1e6:.3f}M; paper: +5.93M)"
    )
    mha, gate, ln = 4 * 256 * 256 + 4 * 256, 2 * 256 * 256 + 256, 2 * 256
    assert added == 9 * (2 * mha + gate + 2 * ln) == 5_928_192
    assert abs(added / 1e6 - 5.93) <= 0.02
    assert sr_only - baseline == 9 * (mha + gate + ln)
    assert visual == sr_only  # Table 11: equal-parameter control


# ---------------------------------------------------------------------------- mask position in the logits
def test_mask_position_known_values():
    from flowseg.modeling.transformer_decoder.bsf_decoder import mask_position, mask_position_features

    logits = torch.full((1, 2, 8, 8), -30.0)
    logits[0, 0] = 30.0  # the whole map: centred, std of a uniform grid
    logits[0, 1, 0:2, 6:8] = 30.0  # a 2x2 block at the top right
    pos = mask_position(logits)[0]
    std = math.sqrt(sum(((i + 0.5) / 8 - 0.5) ** 2 for i in range(8)) / 8)
    torch.testing.assert_close(pos[0], torch.tensor([0.0, 0.0, std, std]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[1], torch.tensor([0.375, -0.375, 0.0625, 0.0625]), atol=1e-5, rtol=0)
    feats = mask_position_features(pos, num_frequencies=2, gain=1.0)[1]
    c = math.cos(math.pi * 0.375)
    s = math.sin(math.pi * 0.375)
    s2, c2 = math.sin(2 * math.pi * 0.375), math.cos(2 * math.pi * 0.375)
    # [sin(pi x), sin(2 pi x), cos(pi x), cos(2 pi x)] for x then y (= -x here), then 10 * sizes
    expected = [s, s2, c, c2, -s, -s2, c, c2, 0.625, 0.625]
    torch.testing.assert_close(feats, torch.tensor(expected), atol=1e-5, rtol=0)


def test_mask_position_logits_start_as_the_paper_and_follow_the_formula():
    plain = _decoder(semantic_refinement=True, condition_refinement=True)
    dec = _decoder(semantic_refinement=True, condition_refinement=True, mask_position_logits=True)
    missing = dec.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["mask_position_proj.bias", "mask_position_proj.weight"]
    x, mf, cond = _inputs()
    with torch.no_grad():  # zero-initialised projection: the paper's logits
        torch.testing.assert_close(
            dec(x, mf, conditions=cond)["pred_logits"], plain(x, mf, conditions=cond)["pred_logits"]
        )
    torch.manual_seed(1)
    nn.init.normal_(dec.mask_position_proj.weight)
    output = torch.randn(QUERIES, 2, HIDDEN)  # [Q,B,h] queries
    mask_features = torch.randn(2, HIDDEN, 16, 16)
    with torch.no_grad():
        logits, masks, _, _ = dec.forward_prediction_heads(output, mask_features, None, cond)
        query = dec.decoder_norm(output).transpose(0, 1)
        from flowseg.modeling.transformer_decoder.bsf_decoder import mask_position, mask_position_features

        position = mask_position_features(mask_position(masks))
        expected = dec.condition_class_logits(query + dec.mask_position_proj(position), cond)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, dec.condition_class_logits(query, cond))
    # the projection learns from the condition logits; the mask does not get this gradient
    dec.train()
    dec(x, mf, conditions=cond)["pred_logits"][..., 0].sum().backward()
    assert dec.mask_position_proj.weight.grad.abs().sum() > 0
