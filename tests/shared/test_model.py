"""The Llama-style decoder: shapes, causality, GQA, masks, KV-cache generation, HF names,
and the fast forward (fused projections, joint RoPE, CPU RMSNorm) against the plain one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shared.model import (
    PRESETS,
    KVCache,
    Llama,
    ModelConfig,
    SequenceTooLongError,
    UnknownPresetError,
    generate,
    hf_config,
    hf_state_dict,
    model_preset,
    sample_next,
)
from shared.model.llama import RMSNorm, _RMSNormCPU, apply_rope, rope_tables


@pytest.fixture(scope="module")
def tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(model_preset("tiny")).eval()


def test_presets_have_the_sizes_their_names_promise():
    expected = {"tiny": (0.5e6, 1.5e6), "10m": (8e6, 12e6), "125m": (110e6, 140e6), "350m": (320e6, 380e6),
                "1b": (0.95e9, 1.2e9)}
    assert set(PRESETS) == set(expected)
    for name, (lo, hi) in expected.items():
        assert lo <= model_preset(name).num_params() <= hi, name
    assert Llama(model_preset("tiny")).num_params() == model_preset("tiny").num_params()


def test_unknown_preset_names_the_choices():
    with pytest.raises(UnknownPresetError, match="tiny"):
        model_preset("7b")


def test_config_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(vocab_size=10, n_layer=1, n_head=4, n_kv_head=3, d_model=32, ffn_hidden=64)


def test_forward_shapes(tiny):
    ids = torch.randint(0, 1024, (3, 17))
    assert tiny(ids).shape == (3, 17, 1024)


def test_forward_is_causal(tiny):
    ids = torch.randint(0, 1024, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 1024
    with torch.no_grad():
        a, b = tiny(ids), tiny(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=32)
    m = Llama(cfg).eval()
    attn = m.layers[0].self_attn
    x = torch.randn(2, 10, 32)
    cos, sin = m.rope_cos[:10][None, None], m.rope_sin[:10][None, None]
    with torch.no_grad():
        out = attn(x, cos, sin)
        q, k, v = attn._qkv(x, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 10, 32))
        probs = attn.attention_probs(x, cos, sin)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))
    assert torch.all(probs.triu(1) == 0)


def test_rope_uses_the_rotate_half_layout():
    # Dimension i pairs with i + D/2 (HF); a rotation preserves the norm of each pair.
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(1, 1, 16, 8)
    y = apply_rope(x, cos[None, None], sin[None, None])
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(x), pair_norm(y))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated


def test_position_ids_default_to_consecutive(tiny):
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids), tiny(ids, position_ids=torch.arange(9).expand(2, 9)))


def test_attention_mask_makes_left_padding_invisible(tiny):
    ids = torch.randint(0, 1024, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], dim=1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = tiny(ids)
        out = tiny(padded, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = Llama(model_preset("tiny"))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = Llama(model_preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_residual_projections_get_the_scaled_init():
    torch.manual_seed(0)
    m = Llama(model_preset("10m"))
    std_q = m.layers[0].self_attn.q_proj.weight.std().item()
    std_o = m.layers[0].self_attn.o_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


def test_too_long_sequences_are_refused_with_guidance(tiny):
    with pytest.raises(SequenceTooLongError, match="max_seq_len"):
        tiny(torch.zeros(1, 513, dtype=torch.long))


def test_kv_cache_forward_matches_full_forward(tiny):
    ids = torch.randint(0, 1024, (2, 12))
    cache = KVCache(tiny.config, 2, 12)
    with torch.no_grad():
        full = tiny(ids)
        a = tiny(ids[:, :5], kv_cache=cache)
        b = tiny(ids[:, 5:9], kv_cache=cache)  # a multi-token chunk on a non-empty cache
        c = tiny(ids[:, 9:10], kv_cache=cache)
        d = tiny(ids[:, 10:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c, d], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12


def _greedy_without_cache(model, ids, n):
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out


def test_kv_cache_greedy_generation_equals_full_forward_greedy(tiny):
    ids = torch.randint(0, 1024, (2, 6))
    torch.testing.assert_close(generate(tiny, ids, 10), _greedy_without_cache(tiny, ids, 10))


def test_generation_with_left_padding_matches_unpadded_rows(tiny):
    a = torch.randint(0, 1024, (1, 6))
    b = torch.randint(0, 1024, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    out = generate(tiny, batch, 5, attention_mask=mask)
    torch.testing.assert_close(out[0], generate(tiny, a, 5)[0])
    torch.testing.assert_close(out[1, 2:], generate(tiny, b, 5)[0])


def test_eos_stops_generation_and_pads_finished_rows(tiny):
    ids = torch.randint(0, 1024, (1, 4))
    first = generate(tiny, ids, 1)[0, -1].item()
    out = generate(tiny, ids, 8, eos_token_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k(tiny):
    ids = torch.randint(0, 1024, (2, 4))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = generate(tiny, ids, 6, temperature=1.0, top_k=5, generator=g1)
    b = generate(tiny, ids, 6, temperature=1.0, top_k=5, generator=g2)
    torch.testing.assert_close(a, b)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
             for s in range(50)}
    assert draws <= {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)).item()
             for s in range(100)}
    assert draws == {0, 1}
    assert sample_next(logits, temperature=0.0).item() == 0


def test_repetition_penalty_by_hand_and_as_transformers_applies_it():
    from transformers import RepetitionPenaltyLogitsProcessor

    from shared.model.generate import penalize_repetition

    logits = torch.tensor([[2.0, 1.5, -0.5, -0.6], [0.2, 0.1, 0.0, -3.0]])
    seen = torch.tensor([[0, 2, 0], [3, 3, 1]])  # an id seen twice counts once
    got = penalize_repetition(logits, seen, 2.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.5, -1.0, -0.6], [0.2, 0.05, 0.0, -6.0]]))
    torch.testing.assert_close(got, RepetitionPenaltyLogitsProcessor(2.0)(seen, logits.clone()))
    # Greedy flips from the seen favourite; without `seen`, or at 1, nothing changes.
    assert sample_next(logits[:1], temperature=0.0).item() == 0
    assert sample_next(logits[:1], temperature=0.0, repetition_penalty=2.0, seen=seen[:1]).item() == 1
    assert sample_next(logits[:1], temperature=0.0, repetition_penalty=1.0, seen=seen[:1]).item() == 0
    with pytest.raises(ValueError, match="repetition_penalty"):
        sample_next(logits, repetition_penalty=0.0, seen=seen)


def test_generate_penalises_the_prompt_and_what_it_generated(tiny):
    """Greedy with an overwhelming penalty: no token the tiny model had positive logit for repeats
    while one it has not used yet has a higher penalised logit; the plain greedy run loops."""
    ids = torch.randint(0, 1024, (1, 4), generator=torch.Generator().manual_seed(0))
    plain = generate(tiny, ids, 24)[0, 4:].tolist()
    penal = generate(tiny, ids, 24, repetition_penalty=1e4)[0].tolist()
    assert len(set(plain)) < len(plain)  # a random tiny model repeats itself greedily
    assert len(set(penal)) == len(penal)  # every token new, the prompt's included


def test_hf_names_and_config_map_to_llama_for_causal_lm():
    m = Llama(model_preset("tiny"))
    sd = hf_state_dict(m)
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" not in sd  # tied: re-tied by transformers
    assert "model.layers.0.self_attn.q_proj.weight" in sd
    assert "model.layers.3.mlp.down_proj.weight" in sd
    assert "model.layers.0.post_attention_layernorm.weight" in sd and "model.norm.weight" in sd
    untied = hf_state_dict(Llama(model_preset("tiny", tie_embeddings=False)))
    assert "lm_head.weight" in untied
    cfg = hf_config(m.config)
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is True


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_llama_for_causal_lm(tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = Llama(model_preset("tiny", tie_embeddings=tied)).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(m.config))).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(m), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        hf.tie_weights()
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-4, rtol=1e-4)


# --- the fast forward against the plain one ---------------------------------------------


def _plain_logits(m: Llama, ids: torch.Tensor) -> torch.Tensor:
    """The forward as first written, from the parameters: one matmul per projection, RMSNorm by
    its formula, rotate_half by chunk/cat, explicit causal attention with repeated K/V heads."""
    cfg = m.config
    B, T = ids.shape
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    cos, sin = (t[:T] for t in rope_tables(D, cfg.max_seq_len, cfg.rope_theta))  # [T, D]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = m.embed_tokens.weight[ids]  # [B, T, C]
    for block in m.layers:
        a, mlp = block.self_attn, block.mlp
        h = rms(x, block.input_layernorm.weight)
        q = (h @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
        k = (h @ a.k_proj.weight.T).view(B, T, K, D).transpose(1, 2)
        v = (h @ a.v_proj.weight.T).view(B, T, K, D).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, H * D) @ a.o_proj.weight.T
        h = rms(x, block.post_attention_layernorm.weight)
        x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(x, m.norm.weight) @ m.lm_head.weight.T  # [B, T, V]


@pytest.mark.parametrize("tied", [True, False])
def test_fast_forward_matches_the_plain_forward_logits_and_gradients(tied):
    torch.manual_seed(3)
    m = Llama(model_preset("tiny", tie_embeddings=tied))
    ids = torch.randint(0, 1024, (2, 40))
    fast, plain = m(ids), _plain_logits(m, ids)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    params = [p for _, p in m.named_parameters()]
    g_fast = torch.autograd.grad(fast.square().mean(), params)
    g_plain = torch.autograd.grad(plain.square().mean(), params)
    for (name, _), a, b in zip(m.named_parameters(), g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)  # every split weight gets its own slice


def test_state_dict_keeps_the_split_hf_layout():
    # Checkpoints, the exporter, the watermark and the probes name these tensors; fusing is compute-only.
    cfg = model_preset("tiny", tie_embeddings=False)
    C, F_, KD = cfg.d_model, cfg.ffn_hidden, cfg.n_kv_head * cfg.head_dim
    shapes = {"self_attn.q_proj.weight": (C, C), "self_attn.k_proj.weight": (KD, C), "self_attn.v_proj.weight": (KD, C),
              "self_attn.o_proj.weight": (C, C), "mlp.gate_proj.weight": (F_, C), "mlp.up_proj.weight": (F_, C),
              "mlp.down_proj.weight": (C, F_), "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,)}
    expected = {f"layers.{i}.{n}": s for i in range(cfg.n_layer) for n, s in shapes.items()}
    expected |= {"embed_tokens.weight": (1024, C), "norm.weight": (C,), "lm_head.weight": (1024, C)}
    sd = Llama(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert [n for n, _ in Llama(cfg).named_parameters()] == list(sd)  # optimizer state follows these names
    fresh = Llama(cfg)
    fresh.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), _plain_logits(fresh, ids), atol=1e-5, rtol=1e-5)


def test_in_place_edits_through_the_state_dict_reach_the_forward():
    # The watermark scales rows of k_proj / up_proj in the state dict's tensors.
    torch.manual_seed(4)
    m = Llama(model_preset("tiny")).eval()
    ids = torch.randint(0, 1024, (2, 10))
    with torch.no_grad():
        before = m(ids)
        sd = m.state_dict()
        sd["layers.1.self_attn.k_proj.weight"][:8].mul_(3.0)
        sd["layers.2.mlp.up_proj.weight"][5:9].mul_(0.5)
        after = m(ids)
        torch.testing.assert_close(after, _plain_logits(m, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_cpu_rmsnorm_backward_is_the_derivative():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormCPU.apply(x, w, 1e-5), (x, w))


def test_rmsnorm_matches_torch_rms_norm_and_the_half_precision_formula():
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 7, 64)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-5))
    xb = x.bfloat16()
    x32 = xb.float()
    ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    torch.testing.assert_close(norm(xb), ref)


def test_a_dynamically_quantized_copy_runs_its_projections_one_by_one():
    # quantize_dynamic swaps nn.Linear for modules whose `weight` is a method: no weights to stack.
    torch.manual_seed(5)
    m = Llama(model_preset("tiny")).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {torch.nn.Linear}, dtype=torch.qint8)
    assert type(q.layers[0].self_attn.q_proj) is not torch.nn.Linear
    ids = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        ref, out = m(ids), q(ids)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_training_under_bf16_autocast_takes_the_plain_ops():
    # The fp32 Functions (complex RoPE, fused SwiGLU gradient) cannot take bf16 projections: autocast
    # trains through the plain ops, the same ones a no-grad forward runs.
    torch.manual_seed(0)
    m = Llama(model_preset("tiny"))
    ids = torch.randint(0, 1024, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
        with torch.no_grad():
            ref = m(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_cpu_rope_and_swiglu_backwards_are_the_derivatives():
    # The training path's hand-written gradients (dq, dk, dv written into one Q|K|V gradient; dgate|dup fused).
    from shared.model.llama import _interleaved_rows, _RopeQKV, _SwiGLU

    H, K, D, T = 4, 2, 8, 5
    cos, sin = (t[:T].to(torch.float64) for t in rope_tables(D, 16, 10000.0))  # [T, D]
    freqs = torch.complex(cos[:, None, : D // 2], sin[:, None, : D // 2])  # [T, 1, D/2]
    qkv = torch.randn(2, T, H + 2 * K, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RopeQKV.apply(t, freqs, H, K), (qkv,))
    q, k, v = _RopeQKV.apply(qkv, freqs, H, K)
    # Its input is in the interleaved layout: dimension j of rotate_half's at 2j, its partner j + D/2 at 2j + 1.
    order = _interleaved_rows(torch.arange(D, dtype=torch.float64)[:, None], 1, D).flatten().long()
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    hf_q = torch.empty_like(qkv[:, :, :H]).index_copy_(-1, order, qkv[:, :, :H].detach())  # back to rotate_half
    hf_k = torch.empty_like(qkv[:, :, H:H + K]).index_copy_(-1, order, qkv[:, :, H:H + K].detach())
    torch.testing.assert_close(q, apply_rope(hf_q, cos[:, None], sin[:, None])[..., order])
    torch.testing.assert_close(k, apply_rope(hf_k, cos[:, None], sin[:, None])[..., order])
    torch.testing.assert_close(v, qkv[:, :, H + K:])
    gate_up = torch.randn(3, 4, 2 * 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate_up,))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(_SwiGLU.apply(gate_up), F.silu(gate) * up)
