"""Multi-head Latent Attention (SPEC 1.1): the expanded path against a per-head float64 reference written from
the equations, the absorbed path against the expanded one, and cached (prefill + decode) forwards against one
full forward. All in float64, where the paths can only differ by reassociated sums (~1e-15 relative)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.model.attention import attend
from dsv3.model.cache import StaticLatentCache
from dsv3.model.rope import rope_frequencies
from tests.conftest import SHAPES

# float64 paths differ by summation order only: ~1e-15 relative per op. 1e-10 of the output scale is far above
# that and far below any real error (a wrong mask or scale changes outputs by >1e-3 relative).
REL_TOL = 1e-10


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def expected_softmax_scale(cfg) -> float:
    """1/sqrt(nope + rope), times (0.1 * mscale_all_dim * ln s + 1)^2 under YaRN (SPEC 1.1, 1.3)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        scale *= (0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1) ** 2
    return scale


def attention_reference(attn, cfg, q_nope, q_pe, c_kv, k_pe, q_offset):
    """Per head h: k = [W_UK,h c ; k_R], v = W_UV,h c, with kv_b_proj rows head-major [W_UK,h ; W_UV,h];
    softmax(q k^T * scale) v with query i at position q_offset + i seeing keys 0..q_offset + i. [B,S,H,v]."""
    nope, dv, H = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    W = attn.kv_b_proj.weight.double()
    B, S = q_nope.shape[:2]
    T = c_kv.shape[1]
    out = torch.zeros(B, S, H, dv, dtype=torch.float64)
    visible = torch.arange(T)[None, :] <= (q_offset + torch.arange(S))[:, None]  # [S, T]
    for h in range(H):
        rows = W[h * (nope + dv): (h + 1) * (nope + dv)]
        w_uk, w_uv = rows[:nope], rows[nope:]
        k = torch.cat([c_kv @ w_uk.T, k_pe], dim=-1)  # [B, T, nope + rope]
        q = torch.cat([q_nope[:, :, h], q_pe[:, :, h]], dim=-1)  # [B, S, nope + rope]
        logits = (q @ k.transpose(1, 2)) * expected_softmax_scale(cfg)
        p = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        out[:, :, h] = p @ (c_kv @ w_uv.T)
    return out


def _mla_inputs(model, T: int, seed: int = 0):
    """Queries and latents of layer 0 for T random hidden states at positions 0..T-1 (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, model.cfg.hidden_size, generator=g, dtype=torch.float64)
    attn = model.layers[0].self_attn
    cos, sin = model.rope(torch.arange(T)[None])
    q_nope, q_pe = attn.query(x, cos, sin)
    c_kv, k_pe = attn.latent(x, cos, sin)
    return attn, q_nope, q_pe, c_kv, k_pe


SHAPE_IDS = ["base", "no_qlora-1group-rope-mtp2-dense0", "shared2-yarn0.707-2groups"]


@pytest.mark.parametrize("tiny_cfg", SHAPE_IDS, indirect=True)
@pytest.mark.parametrize(
    "q_start,q_end,T",
    [(0, 12, 12), (5, 12, 12), (11, 12, 12), (4, 8, 12)],
    ids=["causal-prefill", "chunk-after-5", "decode-one", "chunk-with-future-keys"],
)
def test_expanded_and_absorbed_match_per_head_reference(tiny_cfg, make_model, q_start, q_end, T):
    model = make_model(tiny_cfg, dtype=torch.float64)
    attn, q_nope, q_pe, c_kv, k_pe = _mla_inputs(model, T)
    assert attn.softmax_scale == pytest.approx(expected_softmax_scale(tiny_cfg), rel=1e-12)
    qn, qp = q_nope[:, q_start:q_end], q_pe[:, q_start:q_end]
    ref = attention_reference(attn, tiny_cfg, qn, qp, c_kv, k_pe, q_start)
    with torch.no_grad():
        expanded = attn.expanded(qn, qp, c_kv, k_pe, q_start)
        absorbed = attn.absorbed(qn, qp, c_kv, k_pe, q_start)
    assert_rel_close(expanded, ref)
    assert_rel_close(absorbed, ref)
    assert_rel_close(absorbed, expanded)


def test_absorbed_with_per_row_positions_matches_per_row_reference(make_cfg, make_model):
    # batched decode of sequences of different lengths: row 0 has 12 tokens cached, row 1 only 7 (its keys
    # 7..11 are padding and must stay invisible); each row's last two tokens are this step's queries
    cfg = make_cfg()
    model = make_model(cfg, dtype=torch.float64)
    attn, q_nope, q_pe, c_kv, k_pe = _mla_inputs(model, 12)
    lengths = [12, 7]
    q_pos = torch.tensor([[n - 2, n - 1] for n in lengths])
    qn = torch.stack([q_nope[b, n - 2:n] for b, n in enumerate(lengths)])
    qp = torch.stack([q_pe[b, n - 2:n] for b, n in enumerate(lengths)])
    with torch.no_grad():
        got = attn.absorbed(qn, qp, c_kv, k_pe, q_pos)
    for b, n in enumerate(lengths):
        row = slice(b, b + 1)
        ref = attention_reference(attn, cfg, qn[row], qp[row], c_kv[row, :n], k_pe[row, :n], n - 2)
        assert_rel_close(got[b:b + 1], ref)


# Float64 models are float64 end to end (the router promotes to at least float32, RoPE's table follows the
# model's dtype): the cached and full paths differ by float64 summation order only. A cache or mask error is
# >1e-3.
MOE_REL_TOL = 1e-11


@pytest.mark.parametrize(
    "shape,overrides,tol",
    [
        ("base", dict(first_k_dense_replace=3, num_nextn_predict_layers=0), REL_TOL),
        ("no_qlora-1group-rope-mtp2-dense0", dict(first_k_dense_replace=3), REL_TOL),
        ("base", {}, MOE_REL_TOL),
        ("no_qlora-1group-rope-mtp2-dense0", {}, MOE_REL_TOL),
        ("shared2-yarn0.707-2groups", {}, MOE_REL_TOL),
    ],
    ids=["dense-yarn", "dense-noqlora-rope", "moe-base", "moe-noqlora-rope", "moe-yarn0.707"],
)
def test_cached_prefill_then_decode_equals_full_forward(make_cfg, make_model, tokens, shape, overrides, tol):
    cfg = make_cfg(**{**SHAPES[shape], **overrides})
    model = make_model(cfg, dtype=torch.float64)
    B, S = tokens.shape
    with torch.no_grad():
        full = model(tokens, mtp=False).logits
        cache = StaticLatentCache(cfg, B, max_len=32, dtype=torch.float64)
        p = 9
        pieces = [model(tokens[:, :p], cache=cache, start_pos=0).logits]
        for t in range(p, 15):  # one token at a time
            pieces.append(model(tokens[:, t:t + 1], cache=cache, start_pos=t).logits)
        pieces.append(model(tokens[:, 15:], cache=cache, start_pos=15).logits)  # a multi-token chunk
    assert_rel_close(torch.cat(pieces, dim=1), full, rel=tol)
    # positions beyond what was written are untouched
    assert not cache.c_kv[:, :, S:].any() and not cache.k_pe[:, :, S:].any()


def test_a_cache_that_declines_to_finish_the_latents_gets_them_finished(make_cfg, make_model, tokens):
    # LatentCache.update_unfinished: NotImplemented -> attention finishes the latents and calls update (the
    # result is a plain cache's); anything but pages or NotImplemented is refused, not silently mis-attended;
    # a norm with hooks is never offered
    class Declines(StaticLatentCache):
        def update_unfinished(self, layer_idx, kv_a, kv_norm, cos, sin):
            self.asked = getattr(self, "asked", 0) + 1
            return NotImplemented

    class Broken(StaticLatentCache):
        def update_unfinished(self, layer_idx, kv_a, kv_norm, cos, sin):
            return None

    cfg = make_cfg(**SHAPES["base"])
    model = make_model(cfg, dtype=torch.float64)
    B = tokens.shape[0]
    with torch.no_grad():
        plain, declines = (kind(cfg, B, 32, dtype=torch.float64) for kind in (StaticLatentCache, Declines))
        want = [model(tokens[:, :9], cache=plain).logits, model(tokens[:, 9:10], cache=plain, start_pos=9).logits]
        got = [model(tokens[:, :9], cache=declines).logits, model(tokens[:, 9:10], cache=declines, start_pos=9).logits]
        assert declines.asked == 2 * cfg.num_hidden_layers
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        # a hooked kv norm is not handed to a cache to apply: its forward (and the hook) runs
        seen = []
        model.layers[0].self_attn.kv_a_layernorm.register_forward_hook(lambda *a: seen.append(1))
        declines.asked = 0
        model(tokens[:, 10:11], cache=declines, start_pos=10)
        assert declines.asked == cfg.num_hidden_layers - 1 and seen == [1]
        with pytest.raises(TypeError, match="update_unfinished"):
            model(tokens[:, :9], cache=Broken(cfg, B, 32, dtype=torch.float64))


def _rmsnorm64(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def test_cache_holds_exactly_the_latent_and_rotated_rope_key(make_cfg, make_model, tokens):
    cfg = make_cfg()
    model = make_model(cfg, dtype=torch.float64)
    B, S = tokens.shape
    cache = StaticLatentCache(cfg, B, max_len=S, dtype=torch.float64)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert cache.c_kv.shape == (n_layers, B, S, C) and cache.k_pe.shape == (n_layers, B, S, R)
    # kv_lora_rank + qk_rope_head_dim values per token per layer, nothing else
    assert (cache.c_kv.numel() + cache.k_pe.numel()) == n_layers * B * S * (C + R)
    with torch.no_grad():
        model(tokens, cache=cache)

    # layer 0 by hand: c_kv = RMSNorm_kv(W_DKV h), k_R = RoPE(W_KR h) with no norm, h = RMSNorm_in(Emb(t))
    layer = model.layers[0]
    eps = cfg.rms_norm_eps
    h = _rmsnorm64(model.embed_tokens.weight.double()[tokens], layer.input_layernorm.weight, eps)
    kv = h @ layer.self_attn.kv_a_proj_with_mqa.weight.double().T
    c_ref = _rmsnorm64(kv[..., :C], layer.self_attn.kv_a_layernorm.weight, eps)
    assert_rel_close(cache.c_kv[0], c_ref)
    freqs, _ = rope_frequencies(cfg)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * freqs  # [S, R/2]
    k = kv[..., C:].unflatten(-1, (-1, 2))
    x0, x1, cos, sin = k[..., 0], k[..., 1], angle.cos(), angle.sin()
    k_ref = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)  # adjacent pairs
    assert model.rotary.inv_freq.dtype == torch.float64  # a float32 table would be ~1e-7 off here
    assert_rel_close(cache.k_pe[0], k_ref, rel=1e-12)


def test_cache_refuses_to_write_past_its_length(make_cfg):
    cfg = make_cfg()
    cache = StaticLatentCache(cfg, 1, max_len=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="4"):
        cache.update(0, torch.zeros(1, 2, cfg.kv_lora_rank), torch.zeros(1, 2, cfg.qk_rope_head_dim), 3)


def test_a_single_query_ignores_keys_beyond_its_position(make_cfg, make_model):
    # S == 1 is not "every key visible" when the cache holds keys past the query (a re-scored position)
    cfg = make_cfg()
    model = make_model(cfg, dtype=torch.float64)
    attn, qn, qp, c, k = _mla_inputs(model, 12)
    ref = attention_reference(attn, cfg, qn[:, 5:6], qp[:, 5:6], c, k, 5)
    with torch.no_grad():
        assert_rel_close(attn.absorbed(qn[:, 5:6], qp[:, 5:6], c, k, 5), ref)
        assert_rel_close(attn.expanded(qn[:, 5:6], qp[:, 5:6], c, k, 5), ref)


def test_a_cache_takes_the_models_dtype_and_mtp_is_refused_with_it(make_cfg, make_model, tokens):
    cfg = make_cfg()
    model = make_model(cfg, dtype=torch.bfloat16)
    cache = StaticLatentCache(cfg, tokens.shape[0], max_len=tokens.shape[1])  # no dtype: the latents'
    with torch.no_grad():
        model(tokens[:, :5], cache=cache, start_pos=0, mtp=False)
        model(tokens[:, 5:6], cache=cache, start_pos=5, mtp=False)  # float32 latents failed in SDPA here
        assert cache.c_kv.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="MTP blocks are not cached"):
            model(tokens[:, 6:7], cache=cache, start_pos=6, mtp=True)


def test_attend_doc_mask_is_same_label_causal_whatever_the_labels_order():
    # doc_ids are labels: a query sees the earlier keys with its own label only, also when labels are not
    # increasing along the row (float64 loop over queries written from the definition)
    g = torch.Generator().manual_seed(0)
    B, H, S, D, Dv, scale = 2, 3, 7, 8, 5, 0.4
    q, k = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64)
    doc_ids = torch.tensor([[2, 2, 0, 0, 0, 1, 1], [5, 5, 5, 3, 3, 4, 4]])
    with torch.no_grad():
        got = attend(q, k, v, scale, 0, doc_ids)
    want = torch.empty_like(got)
    for b in range(B):
        for i in range(S):
            keys = [j for j in range(i + 1) if doc_ids[b, j] == doc_ids[b, i]]
            p = torch.softmax((q[b, :, i : i + 1] @ k[b, :, keys].transpose(-1, -2)) * scale, dim=-1)
            want[b, :, i] = (p @ v[b, :, keys])[:, 0]
    assert_rel_close(got, want)
    with pytest.raises(ValueError, match="document masking"):
        attend(q, k, v, scale, 3, doc_ids)
