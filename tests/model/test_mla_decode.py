"""The paged MLA decode kernel (dsv3.model.mla_decode) against float64 attention over the same keys gathered
through the block tables: rows of different lengths, several queries per row at consecutive positions (MTP
drafts), blocks in shuffled order, a split count that leaves a ragged last split. CUDA only."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.mla_decode import absorb_query, paged_decode, paged_decode_supported, store_latents

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def attention_weights(q_lat, q_pe, pool, block_tables, block_size, q_pos, scale):
    """float64 softmax weights [B, Q, T] of each query over its row's keys 0..q_pos (0 past it), and the keys'
    values c_kv [B, T, C], gathered slot by slot."""
    B, Q, C = q_lat.shape
    T = block_tables.shape[1] * block_size
    p = torch.zeros(B, Q, T, dtype=torch.float64)
    values = torch.zeros(B, T, C, dtype=torch.float64)
    q = torch.cat([q_lat, q_pe], -1).double()
    for b in range(B):
        slots = torch.tensor([int(block_tables[b, j // block_size]) * block_size + j % block_size for j in range(T)])
        k = pool[slots].double()  # [T, C + R]
        values[b] = k[:, :C]
        pos = q_pos[b if q_pos.shape[0] > 1 else 0]
        for i in range(Q):
            n = int(pos[i]) + 1
            p[b, i, :n] = torch.softmax((k[:n] @ q[b, i]) * scale, 0)
    return p, values


def reference(q_lat, q_pe, pool, block_tables, block_size, q_pos, scale):
    """float64 softmax over each row's keys 0..q_pos, gathered slot by slot."""
    p, values = attention_weights(q_lat, q_pe, pool, block_tables, block_size, q_pos, scale)
    return p @ values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,R,H,S,bs", [(64, 32, 4, 1, 16), (256, 64, 16, 2, 16), (512, 64, 16, 1, 16),
                                        (64, 32, 20, 1, 3), (512, 64, 48, 2, 16)])
def test_paged_decode_matches_float64(dtype, C, R, H, S, bs):
    # 20 heads: two query tiles; block size 3: blocks straddle the key steps; 96 queries: the wide tiles
    check(dtype, C, R, H, S, bs)


@pytest.mark.parametrize("block_q,warps", [(32, 8), (64, 8)])
def test_wider_query_tiles_match_float64(block_q, warps):
    # V3-wide latents; 40 queries: ragged tiles of 32 and one of 64 over them
    check(torch.bfloat16, 512, 64, 20, 2, 16, block_q, warps)


@pytest.mark.parametrize("splits", [1, 3, 5, 32])
def test_any_split_count_matches_float64(splits):
    # one split normalises in place; 3 and 5 leave a ragged last split of the 144 keys; 32 asked for: 5 splits of
    # 32 keys run (none empty), merged over a [8, queries, columns] tile with masked split lanes
    check(torch.bfloat16, 256, 64, 16, 1, 16, splits=splits)


def test_long_row_takes_max_splits_and_matches_float64():
    # 2,048 keys a row: the default gives each row MAX_SPLITS splits of 32 keys, merged over [64, queries, columns]
    import dsv3.model.mla_decode as mla

    assert 2048 == mla.MAX_SPLITS * mla.BLOCK_T
    check(torch.bfloat16, 256, 64, 16, 1, 16, keys=2048)


def check(dtype: torch.dtype, C: int, R: int, H: int, S: int, bs: int, block_q: int | None = None,
          warps: int | None = None, device: str = "cuda", splits: int | None = None, keys: int = 144,
          offset: float = 0.0) -> None:
    """paged_decode on three rows (seeing 1 key, 70, all `keys`) against the float64 reference; `device` "cpu"
    runs the kernels in the Triton interpreter (TRITON_INTERPRET=1; float16 there). offset: added to every
    score, through k_R's first column (8 in every key) and q_R's (offset / (8 scale)): the softmax is the same."""
    g = torch.Generator().manual_seed(C + S)
    W, n_blocks = keys // bs, max(40 * 16, 2 * keys) // bs
    B = 3
    pool = (torch.randn(n_blocks * bs, C + R, generator=g) * 0.5).to(dtype)
    block_tables = torch.stack([torch.randperm(n_blocks, generator=g)[:W] for _ in range(B)])
    lengths = torch.tensor([1, 70, W * bs - S + 1])  # keys seen by the first query: 1, 70, all
    q_pos = (lengths[:, None] - 1 + torch.arange(S)).repeat_interleave(H, 1)  # [B, S*H]
    q_lat = torch.randn(B, S * H, C, generator=g).to(dtype)
    q_pe = torch.randn(B, S * H, R, generator=g).to(dtype)
    scale = (C + R) ** -0.5 * 2
    if offset:
        pool[:, C] = 8
        q_pe[..., 0] = offset / (8 * scale)
    got = paged_decode(q_lat.to(device), q_pe.to(device), pool.to(device), block_tables.to(device), bs,
                       q_pos.to(device), scale, block_q, warps, splits)
    want = reference(q_lat, q_pe, pool, block_tables, bs, q_pos, scale)
    assert got.shape == (B, S * H, C) and got.dtype == dtype
    # one position per draft token [B, S], shared by its H heads (what attention hands over): the same call
    grouped = paged_decode(q_lat.to(device), q_pe.to(device), pool.to(device), block_tables.to(device), bs,
                           q_pos[:, ::H].contiguous().to(device), scale, block_q, warps, splits)
    assert torch.equal(grouped, got)
    # probabilities rounded to the value dtype once (2^-9 relative for bf16) and the output rounded: both
    # bounded by a few ulps of the largest value in each output row
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (got.double().cpu() - want).abs().amax(-1)
    assert (err <= 4 * ulp * want.abs().amax(-1) + 1e-6).all(), err.max()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scores_past_float32_exp_range_match_float64(dtype, splits, device="cuda"):
    """Scores of about 120 (exp overflows float32 past 88): the online softmax subtracts its running max, so the
    output is the float64 softmax's, as at scores of order 1; one split normalising in place, and three merged."""
    check(dtype, 64, 32, 4, 1, 16, device=device, splits=splits, offset=120.0)


def test_queries_seeing_no_key_or_past_the_last_give_zero_or_all():
    # a padding row's query (position -1) sees nothing: 0, not NaN; a position past the table's keys sees them
    # all (keys are masked by the table's length too, so a pool slot beyond it is never read)
    g = torch.Generator().manual_seed(10)
    C, R, bs = 64, 32, 16
    pool = torch.randn(4 * bs, C + R, generator=g).half()
    block_tables = torch.tensor([[2, 0], [1, 3]])
    q_pos = torch.tensor([[-1, -1], [40, 5]])
    q_lat, q_pe = torch.randn(2, 2, C, generator=g).half(), torch.randn(2, 2, R, generator=g).half()
    got = paged_decode(q_lat.cuda(), q_pe.cuda(), pool.cuda(), block_tables.cuda(), bs, q_pos.cuda(), 0.1).cpu()
    assert torch.equal(got[0], torch.zeros(2, C, dtype=torch.float16))
    want = reference(q_lat[1:], q_pe[1:], pool, block_tables[1:], bs, torch.tensor([[31, 5]]), 0.1)
    assert ((got[1:].double() - want).abs() <= 2.0**-9 * want.abs().amax() + 1e-6).all()
    empty = paged_decode(q_lat.cuda(), q_pe.cuda(), pool.cuda(), block_tables[:, :0].cuda(), bs, q_pos.cuda(), 0.1)
    assert torch.equal(empty.cpu(), torch.zeros(2, 2, C, dtype=torch.float16))


def test_one_position_row_broadcasts_and_supported_conditions():
    g = torch.Generator().manual_seed(9)
    C, R, bs = 64, 32, 16
    pool = torch.randn(8 * bs, C + R, generator=g).to(torch.bfloat16)
    block_tables = torch.tensor([[3, 1], [5, 0]])
    q_pos = torch.tensor([[20, 20, 31, 31]])  # [1, Q]: every row alike
    q_lat, q_pe = torch.randn(2, 4, C, generator=g).bfloat16(), torch.randn(2, 4, R, generator=g).bfloat16()
    got = paged_decode(q_lat.cuda(), q_pe.cuda(), pool.cuda(), block_tables.cuda(), bs, q_pos.cuda(), 0.1)
    want = reference(q_lat, q_pe, pool, block_tables, bs, q_pos, 0.1)
    assert ((got.double().cpu() - want).abs() <= 2.0**-6 * want.abs().amax() + 1e-6).all()
    with torch.no_grad():
        assert paged_decode_supported(pool.cuda(), C, 8) and paged_decode_supported(pool.cuda(), C, 1)
        assert not paged_decode_supported(pool.cuda().float(), C, 8)  # float32: the general path
        assert not paged_decode_supported(torch.zeros(16, 96 + 32, device="cuda", dtype=torch.bfloat16), 96, 8)
        assert not paged_decode_supported(pool, C, 8)  # CPU
        assert not paged_decode_supported(torch.zeros(16, 64 + 48, device="cuda", dtype=torch.bfloat16), 64, 8)
        assert not paged_decode_supported(torch.zeros(C + R, 16, device="cuda", dtype=torch.bfloat16).T, C, 8)
    assert not paged_decode_supported(pool.cuda().requires_grad_(), C, 8)  # autograd: the general path
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode(q_lat.cuda(), q_pe.cuda(), pool.cuda()[:, :80], block_tables.cuda(), bs, q_pos.cuda(), 0.1)
    with pytest.raises(ValueError, match="do not fit"):  # a column-major pool would be read wrongly
        paged_decode(q_lat.cuda(), q_pe.cuda(), pool.T.contiguous().T.cuda(), block_tables.cuda(), bs,
                     q_pos.cuda(), 0.1)


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_store_latents_writes_each_token_at_its_slot(src_dtype, device="cuda"):
    """Token i's [c_kv; k_R] lands in pool row slots[i], cast to the pool's dtype (exactly: bf16 values, or
    float32 rounded once); every other row keeps its value. Strided inputs (views into a wider tensor)."""
    g = torch.Generator().manual_seed(3)
    C, R, N = 64, 32, 5
    pool = torch.randn(40, C + R, generator=g).to(torch.bfloat16)
    wide = torch.randn(N, C + R + 8, generator=g).to(src_dtype)
    c_kv, k_pe = wide[:, :C], wide[:, C + 8:]
    slots = torch.tensor([17, 0, 39, 5, 6])
    want = pool.clone()
    for i, s in enumerate(slots.tolist()):  # row by row, by hand
        want[s, :C] = c_kv[i].to(torch.bfloat16)
        want[s, C:] = k_pe[i].to(torch.bfloat16)
    got = pool.to(device)
    store_latents(got, slots.to(device), c_kv.to(device), k_pe.to(device))
    assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match="do not fit"):
        store_latents(got, slots.to(device), c_kv.to(device), k_pe[:, :16].to(device))


@pytest.mark.parametrize("splits,W", [(None, 5), (1, 5), (3, 5), (None, 128)])  # 128 blocks: 64 splits a row
@pytest.mark.parametrize("merged", [True, False])
def test_w_uv_product_matches_float64(splits, W, merged, monkeypatch, device="cuda", dtype=torch.bfloat16):
    """paged_decode(..., w_uv) = W_UV of each query's head times its float64 attention output: merged into the
    split merge (float32 o_lat), or (one split, or past _UV_BYTES: forced here) o_lat rounded and a batched
    product. Two draft positions of 4 heads, V = 48 (not a multiple of BLOCK_V); rows of W blocks.

    Within the roundings the kernels make, no looser: each probability rounded to the value dtype (u relative,
    u its unit roundoff; fp16's subnormals: half their spacing) moves the output by at most u times the
    probability-weighted sum of |W_UV v_t| over the keys, the output's rounding by u |y|, and the batched
    product's o_lat rounding by u |o_lat| |W_UV|; float32 scores, exps and sums by 2^-16 (256 float32 roundings)
    of the magnitudes p |v| |W_UV|. A merge normalising by a sum 2% off fails it."""
    import dsv3.model.mla_decode as mla

    if not merged:
        monkeypatch.setattr(mla, "_UV_BYTES", 0)
    g = torch.Generator().manual_seed(11)
    C, R, H, S, bs, V = 64, 32, 4, 2, 16, 48
    n_blocks, B = W + 7, 2
    pool = (torch.randn(n_blocks * bs, C + R, generator=g) * 0.5).to(dtype)
    block_tables = torch.stack([torch.randperm(n_blocks, generator=g)[:W] for _ in range(B)])
    q_pos = torch.tensor([[40, 41], [W * bs - 2, W * bs - 1]])  # [B, S]: a position per draft token, for its heads
    q_lat = torch.randn(B, S * H, C, generator=g).to(dtype)
    q_pe = torch.randn(B, S * H, R, generator=g).to(dtype)
    w_uv = (torch.randn(H, V, C + 8, generator=g) * C**-0.5).to(dtype)[..., :C]  # a strided view, as MLA's
    got = mla.paged_decode(q_lat.to(device), q_pe.to(device), pool.to(device), block_tables.to(device), bs,
                           q_pos.to(device), 0.2, splits=splits, w_uv=w_uv.to(device))
    p, values = attention_weights(q_lat, q_pe, pool, block_tables, bs, q_pos.repeat_interleave(H, 1), 0.2)
    o_lat = p @ values  # float64 [B, Q, C]
    heads = w_uv.double()[torch.arange(S * H) % H]  # [Q, V, C]
    want = torch.einsum("bqc,qvc->bqv", o_lat, heads)
    per_key = torch.einsum("btc,qvc->bqtv", values, heads).abs()  # |W_UV v_t| for each query's head
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the unit roundoff
    tiny = torch.finfo(dtype).smallest_normal * u  # the largest rounding error of a subnormal
    probs = torch.einsum("bqt,bqtv->bqv", u * p + tiny * (p > 0), per_key)
    magnitudes = torch.einsum("bqc,qvc->bqv", p @ values.abs(), heads.abs())
    rounded = torch.einsum("bqc,qvc->bqv", o_lat.abs(), heads.abs()) if splits == 1 or not merged else 0
    bound = u * want.abs() + probs + u * rounded + 2.0**-16 * magnitudes + 1e-7
    assert got.shape == (B, S * H, V) and got.dtype == dtype
    assert ((got.double().cpu() - want).abs() <= bound).all()
    with pytest.raises(ValueError, match="W_UV"):
        mla.paged_decode(q_lat.to(device), q_pe.to(device), pool.to(device), block_tables.to(device), bs,
                         q_pos.to(device), 0.2, w_uv=w_uv[:3].to(device))


def rope64(x, cos, sin):
    """float64 rotation of adjacent pairs of x [..., R] by angles [..., R/2]."""
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    cos, sin = cos.double(), sin.double()
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


def angles(B, S, R, g):
    """cos / sin [B, S, R/2] of random positions and RoPE-like frequencies, float32 as the model's table."""
    pos = torch.randint(0, 4096, (B, S), generator=g).double()
    a = pos[..., None] * 10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    return a.cos().float(), a.sin().float()


# angles: a row of positions per sequence [B, S], one row for all [1, S], one position a sequence [B, 1]
ANGLES = {"rows": lambda B, S: (B, S), "shared": lambda B, S: (1, S), "one-position": lambda B, S: (B, 1)}


@pytest.mark.parametrize("B,S,H,D,shape", [(1, 1, 16, 128, "rows"), (3, 7, 3, 48, "rows"), (2, 2, 5, 64, "shared"),
                                           (3, 4, 2, 64, "one-position")])
def test_absorb_query_matches_float64(B, S, H, D, shape, device="cuda", dtype=torch.bfloat16):
    """q_lat = q_C W_UK per head and RoPE'd q_R, queries ordered s*H + h, against float64: 21 rows (two row
    tiles), a nope width that is no power of two (48), angles per row or broadcast (ANGLES), W_UK a strided
    view of kv_b's head-major rows as MLA's."""
    g = torch.Generator().manual_seed(D + S)
    C, R, V = 128, 32, 24
    q = torch.randn(B, S, H, D + R, generator=g).to(dtype)
    w = (torch.randn(H, D + V, C, generator=g) * D**-0.5).to(dtype)
    w_uk = w[:, :D]
    cos, sin = angles(*ANGLES[shape](B, S), R, g)
    want = torch.einsum("bshd,hdc->bshc", q[..., :D].double(), w_uk.double()).reshape(B, S * H, C)
    bound = torch.einsum("bshd,hdc->bshc", q[..., :D].double().abs(), w_uk.double().abs()).reshape(B, S * H, C)
    want_pe = rope64(q[..., D:], cos[:, :, None], sin[:, :, None]).reshape(B, S * H, R)  # float32, rounded once
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for block_c in (None, 16, C):  # the default's program width, the narrowest, one program a head
        q_lat, q_pe = absorb_query(q.to(device), cos.to(device), sin.to(device), w_uk.to(device), block_c)
        assert q_lat.shape == (B, S * H, C) and q_pe.shape == (B, S * H, R) and q_lat.dtype == q_pe.dtype == dtype
        assert ((q_lat.double().cpu() - want).abs() <= ulp * want.abs() + D * 2.0**-24 * bound + 1e-6).all()
        assert ((q_pe.double().cpu() - want_pe).abs() <= ulp * want_pe.abs() + 2.0**-20 * q.abs().max() + 1e-6).all()
    with pytest.raises(ValueError, match="do not fit"):
        absorb_query(q.to(device), cos.to(device), sin.to(device), w_uk[: H - 1].to(device))  # a head short
    with pytest.raises(ValueError, match="block_c"):
        absorb_query(q.to(device), cos.to(device), sin.to(device), w_uk.to(device), 48)
    with pytest.raises(ValueError, match="bf16 or fp16"):  # float32 would go through tl.dot as TF32
        absorb_query(q.float().to(device), cos.to(device), sin.to(device), w_uk.float().to(device))


@pytest.mark.parametrize("src_dtype,shape", [(torch.bfloat16, "rows"), (torch.float32, "shared"),
                                             (torch.bfloat16, "one-position")])
def test_store_latents_finishes_norm_and_rope(src_dtype, shape, device="cuda"):
    """finish=(weight, eps, cos, sin): RMSNorm(c_kv) and rotated k_R land at each token's slot as MLA.latent
    computes them: against float64 (the normalised value rounded to the source dtype before the weight, then
    the product rounded to the pool's bf16: two roundings of 2^-8 relative at most), and against the modules
    themselves (`layers.RMSNorm`, `rope.apply_rope`: the same roundings, so at most a rare one-ulp difference
    where their float32 sums of squares differ; skipping the rounding before the weight would change about
    a quarter of the values); other rows untouched. Tokens are B rows x S positions, angles as ANGLES."""
    from dsv3.model.layers import RMSNorm
    from dsv3.model.rope import apply_rope

    g = torch.Generator().manual_seed(5)
    C, R, B, S, eps = 64, 32, 2, 3, 1e-6
    pool = torch.randn(40, C + R, generator=g).to(torch.bfloat16)
    kv_a = (torch.randn(B * S, C + R + 8, generator=g) * 3).to(src_dtype)[:, : C + R]  # strided rows
    weight = (1 + torch.randn(C, generator=g) * 0.1).to(torch.bfloat16)
    cos, sin = angles(*ANGLES[shape](B, S), R, g)
    slots = torch.tensor([17, 0, 39, 5, 6, 21])
    got = pool.to(device)
    store_latents(got, slots.to(device), kv_a[:, :C].to(device), kv_a[:, C:].to(device),
                  finish=(weight.to(device), eps, cos.to(device), sin.to(device)))
    got = got.cpu()
    c = kv_a[:, :C].double()
    want_c = c * (c.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight.double()
    want_r = rope64(kv_a[:, C:], cos.expand(B, S, -1).reshape(B * S, -1), sin.expand(B, S, -1).reshape(B * S, -1))
    want = torch.cat([want_c, want_r], -1)
    u = 2.0**-8  # bf16's unit roundoff
    assert ((got[slots].double() - want).abs() <= (2 * u + 2.0**-18) * want.abs() + 1e-6).all()
    norm = RMSNorm(C, eps).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        modules = torch.cat([norm(kv_a[:, :C].to(device)),
                             apply_rope(kv_a[:, C:].to(device).view(B, S, R), cos.to(device), sin.to(device)).view(
                                 B * S, R)], -1).to(torch.bfloat16).float().cpu()
    diff = (got[slots].float() - modules).abs()
    ulp = torch.ldexp(torch.ones_like(modules), torch.frexp(modules).exponent - 8)  # bf16's spacing at each value
    assert (diff <= ulp).all() and (diff > 0).float().mean() <= 0.02
    others = torch.ones(40, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(got[others], pool[others])
    with pytest.raises(ValueError, match="do not fit"):
        store_latents(got, slots, kv_a[:, :C], kv_a[:, C:], finish=(weight[:8], eps, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_latents_norm_keeps_eps_for_small_latents(dtype, device="cuda"):
    """finish's RMSNorm is c / sqrt(mean(c^2) + eps): for latents of rms 1e-3, eps = 1e-6 moves it by sqrt(2)
    (rows of rms ~1 cannot tell it is there). Against float64 within the two roundings of the pool's dtype, as
    test_store_latents_finishes_norm_and_rope; pool, latents and weight all fp16 or bf16 (`device` "cpu": the
    Triton interpreter, fp16 there)."""
    g = torch.Generator().manual_seed(6)
    C, R, N, eps = 64, 32, 4, 1e-6
    pool = torch.randn(16, C + R, generator=g).to(dtype)
    rms = torch.tensor([[3.0], [1e-3], [0.5], [2e-3]])
    kv_a = (torch.randn(N, C + R, generator=g) * rms).to(dtype)
    weight = (1 + torch.randn(C, generator=g) * 0.1).to(dtype)
    cos, sin = angles(1, N, R, g)
    slots = torch.tensor([3, 12, 0, 7])
    got = pool.to(device)
    store_latents(got, slots.to(device), kv_a[:, :C].to(device), kv_a[:, C:].to(device),
                  finish=(weight.to(device), eps, cos.to(device), sin.to(device)))
    c = kv_a[:, :C].double()
    want = torch.cat([c * (c.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight.double(),
                      rope64(kv_a[:, C:], cos[0], sin[0])], -1)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the unit roundoff
    assert ((got.cpu()[slots].double() - want).abs() <= (2 * u + 2.0**-18) * want.abs() + 1e-6).all()
