"""Absorbed MLA decode attention read straight from a paged latent pool (flash-decoding, CUDA, Triton).

At decode each query (a head of a draft position, S*H per sequence) attends over one shared key per cached
token, [c_kv; k_R] (kv_lora_rank + qk_rope_head_dim wide), with c_kv as the value (paper §2.1.1, SPEC 1.1).
The general path (`attention.attend`) needs the keys contiguous: the paged pool copied out block by block,
then two batched GEMMs around a float32 softmax: four kernels and the cache's bytes moved three times. Here
two kernels read the cached latents in place through the block table, once per tile of queries (`bench`'s
16 heads: one tile of 16; V3's 128 heads: two of 64, the second reading the keys from L2):

- `_partial_kernel`: program (row, key split, query tile) runs an online softmax over its split's keys: float32
  scores from tl.dot of the bf16/fp16 query and key tiles (q_lat against c_kv plus q_R against k_R, so the
  query halves need no concatenation), keys past a query's position masked with -inf, unnormalised
  probabilities rounded to the value dtype for the second tl.dot as the fused kernels and the general path do,
  float32 accumulators; it writes its running max, sum and [queries, C] partial output (a row in one split
  normalises and writes its output itself).
- `_combine_kernel` rescales the splits to the global max and divides by the total sum, each program loading
  every split's [queries, columns] tile at once (programs over query tiles and column chunks).
- `_combine_uv_kernel` instead (a few rows, `paged_decode(..., w_uv=)`): the same merge in float32, each column
  chunk multiplied at once by the query's head's W_UV columns, so MLA's output product rides in the merge and
  o_lat is never written (one launch where the combine and a batched GEMM took two).

Around them, two launches that each replace two or three at decode:
- `store_latents`, the paged cache's write: each new token's c_kv and k_R into its slot, at decode finishing
  them on the way (RMSNorm of c_kv, RoPE of k_R: eqs. 1 and 3);
- `absorb_query`: q_C W_UK of every head (a tl.dot a program) and q_R's RoPE, the queries as `_partial_kernel`
  takes them.

The key range is split so that rows x splits x query tiles fill the GPU about twice over (at most MAX_SPLITS a
row): one sequence's 1K keys spread over 18-32 SMs rather than one. Every step takes this path, one row included.
"""

from __future__ import annotations

import torch

from dsv3.model import pdl
from dsv3.model.pdl import pdl_prefetch_rows, pdl_release, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: attention's general path runs
    triton = None

BLOCK_Q = 16  # queries per combine program, and per partial program by default (tl.dot's smallest M)
BLOCK_T = 32  # keys per inner step
# Queries per partial program from this many on (8 warps): V3's 128 heads as 2 tiles instead of 8 reading each
# split's keys. On an H200 (benchmarks/mla_decode.py --tiles, C 512): 8-64 rows 1.3-1.9x faster than 16-query
# tiles (64 rows at 4K: 742 -> 477 us); at 1-4 rows within 0.7-1.3x either way (the gathered path runs there).
WIDE_BLOCK_Q = 64
_SMS = 132  # an H100/H200's SMs
_PROGRAMS = 2 * _SMS  # about two waves
# Most key splits a row gets. One row of `bench` on an H200 (benchmarks/mla_decode.py --splits, 1K / 4K keys):
# 32 splits 8.0 / 14.1 us, 16 splits 9.8 / 21.3, 8 splits 13.8 / 34.6 (each program walks its keys one
# latency-bound step at a time, so short splits win while the combine stays small); 64 from 2K keys on (at 1K
# the BLOCK_T floor keeps 32): compiled decode at 4K 1,415 -> 1,473 tok/s (BENCHMARKS.md, twelfth session).
MAX_SPLITS = 64
_COMBINE_VALUES = 64 * 128  # float32 values a combine program loads at once: 64 a thread at 4 warps


# Below this many sequences a step would gather the pages and run `attention.attend` instead. With the combine
# loading every split at once and up to 32 splits (the cap then), one row of `bench` took 8.0 us at 1K keys and
# 14.1 at 4K against 21.0 and 24.5 gathered (benchmarks/mla_decode.py, H200; it was 8 rows when one row took 11-25 us
# here), so every step reads the pages in place.
MIN_ROWS = 1


def paged_decode_supported(pool: torch.Tensor, kv_lora_rank: int, rows: int) -> bool:
    """Whether `paged_decode` runs over this pool [slots, C + rope] for a step of `rows` sequences: at least
    MIN_ROWS of them, CUDA with Triton, a bf16/fp16 pool, both widths powers of two of at least 16 (tl.dot and
    tl.arange), and no autograd."""
    C, R = kv_lora_rank, pool.shape[-1] - kv_lora_rank
    return (rows >= MIN_ROWS and triton is not None and pool.is_cuda and pool.stride(-1) == 1
            and pool.dtype in (torch.bfloat16, torch.float16)
            and all(n >= 16 and n & (n - 1) == 0 for n in (C, R)) and not torch.is_grad_enabled())


if triton is not None:

    @triton.jit
    def _partial_kernel(
        qc_ptr, qr_ptr, pool_ptr, bt_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
        Q, T, KEYS_PER_SPLIT, GROUP, scale,
        stride_qcb, stride_qcq, stride_qrb, stride_qrq, stride_pool, stride_btb, stride_posb,
        stride_ob, stride_os, stride_oq, stride_mb, stride_ms, stride_outb, stride_outq,
        BS: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
        ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)  # the queries, and the newest key, are this step's
        b = tl.program_id(0)
        split = tl.program_id(1)
        offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < Q
        offs_c = tl.arange(0, C)
        offs_r = tl.arange(0, R)
        qc = tl.load(qc_ptr + b * stride_qcb + offs_q[:, None] * stride_qcq + offs_c[None, :], mask=q_ok[:, None],
                     other=0.0)
        qr = tl.load(qr_ptr + b * stride_qrb + offs_q[:, None] * stride_qrq + offs_r[None, :], mask=q_ok[:, None],
                     other=0.0)
        pos = tl.load(pos_ptr + b * stride_posb + offs_q // GROUP, mask=q_ok, other=-1)  # GROUP queries a position
        m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        lsum = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, C], dtype=tl.float32)
        start = split * KEYS_PER_SPLIT
        end = tl.minimum(start + KEYS_PER_SPLIT, T)
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < end
            block = tl.load(bt_ptr + b * stride_btb + offs_t // BS, mask=t_ok, other=0)
            slot = block.to(tl.int64) * BS + offs_t % BS
            k_rows = pool_ptr + slot[:, None] * stride_pool
            kc = tl.load(k_rows + offs_c[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, C]: key and value
            kr = tl.load(k_rows + C + offs_r[None, :], mask=t_ok[:, None], other=0.0)
            # float32 scores (the cast: torch.compile hands `scale` over as a float64 scalar)
            s = ((tl.dot(qc, tl.trans(kc)) + tl.dot(qr, tl.trans(kr))) * scale).to(tl.float32)
            s = tl.where((offs_t[None, :] <= pos[:, None]) & t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp(-inf) = 0, not NaN
            alpha = tl.exp(m - m_ref)
            p = tl.exp(s - m_ref[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc)
            m = m_new
        pdl_release(PDL)
        # the whole row: normalise here, nothing to merge. A constexpr, so split programs do not carry this
        # epilogue: as a runtime branch, V3's 64-query tiles ran 9-10% slower at 8-64 rows (4-6% with it)
        if ONE_SPLIT:
            out = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
            tl.store(out_ptr + b * stride_outb + offs_q[:, None] * stride_outq + offs_c[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])
        else:
            o_rows = o_ptr + b * stride_ob + split * stride_os + offs_q[:, None] * stride_oq
            tl.store(o_rows + offs_c[None, :], acc, mask=q_ok[:, None])
            tl.store(m_ptr + b * stride_mb + split * stride_ms + offs_q, m, mask=q_ok)
            tl.store(l_ptr + b * stride_mb + split * stride_ms + offs_q, lsum, mask=q_ok)

    @triton.jit
    def _rope(x_ptrs, cos_ptrs, sin_ptrs, out_ptrs, mask):
        """RoPE of adjacent pairs as `rope.apply_rope` computes it: (x[2i], x[2i+1]) from x_ptrs (pointers to the
        even elements) rotated by the angles' cos/sin in float32, rounded once to out's dtype at out_ptrs (where
        that is not x's, apply_rope's result would be rounded to x's dtype first)."""
        x0 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptrs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (x0 * cos - x1 * sin).to(out_ptrs.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + 1, (x0 * sin + x1 * cos).to(out_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_kernel(
        ckv_ptr, kpe_ptr, slots_ptr, pool_ptr, nw_ptr, cos_ptr, sin_ptr, eps, S,
        stride_c, stride_r, stride_pool, stride_cb, stride_cs,
        C: tl.constexpr, R: tl.constexpr, FINISH: tl.constexpr, PDL: tl.constexpr,
    ):
        # token i's c_kv and k_R side by side into its pool slot: the concatenation never materialised. FINISH:
        # they are still W_DKV h and W_KR h, RMSNorm'd and rotated here (eqs. 1 and 3) as `layers.RMSNorm` and
        # `rope.apply_rope` compute them: float32, the normalised c_kv rounded to its dtype before the weight
        pdl_wait(PDL)
        pdl_release(PDL)
        i = tl.program_id(0)
        row = pool_ptr + tl.load(slots_ptr + i).to(tl.int64) * stride_pool
        offs_c = tl.arange(0, C)
        c = tl.load(ckv_ptr + i * stride_c + offs_c)
        if FINISH:
            cf = c.to(tl.float32)
            cn = (cf * tl.rsqrt((tl.sum(cf * cf, axis=0) / C + eps).to(tl.float32))).to(c.dtype)
            c = tl.load(nw_ptr + offs_c).to(tl.float32) * cn.to(tl.float32)
            offs_p = tl.arange(0, R // 2)
            angle = (i // S) * stride_cb + (i % S) * stride_cs + offs_p  # token i is position i % S of row i // S
            _rope(kpe_ptr + i * stride_r + 2 * offs_p, cos_ptr + angle, sin_ptr + angle, row + C + 2 * offs_p,
                  offs_p < R // 2)
        else:
            offs_r = tl.arange(0, R)
            tl.store(row + C + offs_r, tl.load(kpe_ptr + i * stride_r + offs_r).to(pool_ptr.dtype.element_ty))
        tl.store(row + offs_c, c.to(pool_ptr.dtype.element_ty))

    @triton.jit
    def _absorb_kernel(
        q_ptr, cos_ptr, sin_ptr, w_ptr, qlat_ptr, qpe_ptr, M, S, D,
        stride_qm, stride_qh, stride_cb, stride_cs, stride_wh, stride_wd, stride_lm, stride_lh, stride_pm, stride_ph,
        R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, LINE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # head h, latent columns [c0, c0 + BLOCK_C), query rows (token m = b * S + s) of a tile: q_C W_UK[h] from
        # one tl.dot (float32, rounded once); the first column tile's programs also rotate the rows' q_R
        h = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok, d_ok = offs_m < M, offs_d < D
        w_rows = w_ptr + h * stride_wh + tl.minimum(offs_d, D - 1)[:, None] * stride_wd
        pdl_prefetch_rows(w_rows + tl.program_id(1) * BLOCK_C, BLOCK_C, LINE, PDL, (BLOCK_C + LINE - 1) // LINE)
        pdl_wait(PDL)
        pdl_release(PDL)
        q_rows = q_ptr + offs_m[:, None] * stride_qm + h * stride_qh
        q_c = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + offs_c[None, :], mask=d_ok[:, None], other=0.0)
        q_lat = tl.dot(q_c, w)
        tl.store(qlat_ptr + offs_m[:, None] * stride_lm + h * stride_lh + offs_c[None, :],
                 q_lat.to(qlat_ptr.dtype.element_ty), mask=m_ok[:, None])
        if tl.program_id(1) == 0:
            offs_p = tl.arange(0, R // 2)[None, :]
            angle = (offs_m // S)[:, None] * stride_cb + (offs_m % S)[:, None] * stride_cs + offs_p
            _rope(q_rows + D + 2 * offs_p, cos_ptr + angle, sin_ptr + angle,
                  qpe_ptr + offs_m[:, None] * stride_pm + h * stride_ph + 2 * offs_p, m_ok[:, None])

    @triton.jit
    def _split_weights(m, lsum):
        """Each split's weight exp(m_s - max_s m_s) [S, X] (0 for splits that saw no key) and the total sum over
        the splits, sum_s weight * lsum_s [X], from the splits' running maxima m and sums lsum [S, X]."""
        m_all = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
        return w, tl.sum(w * lsum, axis=0)

    @triton.jit
    def _combine_kernel(
        o_ptr, m_ptr, l_ptr, out_ptr, Q, SPLITS,
        stride_ob, stride_os, stride_oq, stride_mb, stride_ms, stride_outb, stride_outq,
        BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        pdl_release(PDL)
        # columns [c0, c0 + BLOCK_C) of one row's query tile: every split's partial rescaled to the global max and
        # divided by the total sum, all splits in one [splits, queries, columns] load (a loop over the splits
        # waits out one memory latency each)
        b = tl.program_id(0)
        offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        ok = (offs_s < SPLITS)[:, None] & (offs_q < Q)[None, :]
        ml = b * stride_mb + offs_s[:, None] * stride_ms + offs_q[None, :]
        w, total = _split_weights(tl.load(m_ptr + ml, mask=ok, other=float("-inf")),  # [S, Q]
                                  tl.load(l_ptr + ml, mask=ok, other=0.0))
        parts = tl.load(o_ptr + b * stride_ob + offs_s[:, None, None] * stride_os + offs_q[None, :, None] * stride_oq
                        + offs_c[None, None, :], mask=ok[:, :, None], other=0.0)
        out = tl.sum(w[:, :, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)[:, None]  # no key seen: 0
        tl.store(out_ptr + b * stride_outb + offs_q[:, None] * stride_outq + offs_c[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(offs_q < Q)[:, None])


    @triton.jit
    def _combine_uv_kernel(
        o_ptr, m_ptr, l_ptr, w_ptr, out_ptr, H, V, SPLITS,
        stride_ob, stride_os, stride_oq, stride_mb, stride_ms, stride_outb, stride_outq, stride_wh, stride_wv,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, LINE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # query q of row b, values [v0, v0 + BLOCK_V): the splits merged column chunk by column chunk in float32
        # and each chunk multiplied by its head's W_UV columns at once, so o_lat is never written
        b = tl.program_id(0)
        q = tl.program_id(1)
        offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        w_rows = w_ptr + (q % H) * stride_wh + tl.minimum(offs_v, V - 1)[:, None] * stride_wv
        pdl_prefetch_rows(w_rows, C, LINE, PDL, (C + LINE - 1) // LINE)  # the head's W_UV rows: constant
        pdl_wait(PDL)
        offs_s = tl.arange(0, BLOCK_S)[:, None]  # [S, 1]: the query's splits
        s_ok = offs_s < SPLITS
        ml = b * stride_mb + offs_s * stride_ms + q
        w, total = _split_weights(tl.load(m_ptr + ml, mask=s_ok, other=float("-inf")),
                                  tl.load(l_ptr + ml, mask=s_ok, other=0.0))
        w = w / tl.where(total > 0, total, 1.0)[None, :]  # no key seen: 0
        parts = o_ptr + b * stride_ob + offs_s * stride_os + q * stride_oq
        acc = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
        for c0 in tl.static_range(0, C, BLOCK_C):  # unrolled: every chunk's loads issue together
            offs_c = c0 + tl.arange(0, BLOCK_C)
            o_c = tl.sum(w * tl.load(parts + offs_c[None, :], mask=s_ok, other=0.0), axis=0)
            acc += tl.load(w_rows + offs_c[None, :], mask=v_ok[:, None], other=0.0).to(tl.float32) * o_c[None, :]
        pdl_release(PDL)
        tl.store(out_ptr + b * stride_outb + q * stride_outq + offs_v, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty),
                 mask=v_ok)


# The merged W_UV product reads a head's [v, C] matrix once per query (from L2 after the first): it pays while
# that is a few MB (`bench`'s 16 heads at 1-8 rows: 1-8 MB; V3's 128 heads at one row: 16 MB, where it ties),
# beyond which the combine's o_lat and one batched GEMM, which reads each head's matrix once, win. Program shape
# from a sweep (H200, 1K keys, attention + W_UV against combine + einsum): 64 values, 4 warps, [splits, columns]
# chunks of 4096 float32 values; `bench` 1 row 7.96 vs 10.88 us, 8 rows 13.8 vs 14.4, V3 1 row 25.7 vs 25.8.
_UV_BYTES = 16 << 20
BLOCK_V = 64  # values per merged-W_UV program
_UV_WARPS = 4
_UV_TILE = 4096


def _paged_decode_shape(q_lat: torch.Tensor, q_pe: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                        block_size: int, q_pos: torch.Tensor, scale: float, block_q: int | None = None,
                        num_warps: int | None = None, splits: int | None = None,
                        w_uv: torch.Tensor | None = None) -> torch.Tensor:
    B, Q, C = q_lat.shape
    return q_lat.new_empty(B, Q, C if w_uv is None else w_uv.shape[1])


@pdl.launched_here("paged_decode", _paged_decode_shape)
def paged_decode(
    q_lat: torch.Tensor, q_pe: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, block_size: int,
    q_pos: torch.Tensor, scale: float, block_q: int | None = None, num_warps: int | None = None,
    splits: int | None = None, w_uv: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax([q_lat; q_pe] . [c_kv; k_R] * scale) c_kv over the paged keys, for q_lat [B, Q, C], q_pe [B, Q, R]
    (Q = draft positions x heads), pool [slots, C + R] (one layer), block_tables [B, W] (key j of row b in slot
    block_tables[b, j // block_size] * block_size + j % block_size) and q_pos [B or 1, P], P dividing Q (query
    q sees the keys at positions <= q_pos[b, q // (Q / P)]: one position per draft token serves its heads).
    Returns [B, Q, C] in q_lat's dtype. block_q / num_warps: queries and warps of
    a partial program (a power of two >= 16; each query tile reads its split's keys once); by default 64 and 8
    from 64 queries a row on (V3's 128 heads), else 16 and 4. splits: key ranges per row, merged by a second
    kernel (default: enough programs to fill the GPU twice, at most MAX_SPLITS, at least BLOCK_T keys each).
    w_uv [H, V, C] (H dividing Q; query q is head q % H): return each query's W_UV o_lat [B, Q, V] instead, the
    product taken inside the merge of the splits where that pays (float32 o_lat, rounded once at the end)."""
    B, Q, C = q_lat.shape
    R = q_pe.shape[-1]
    if pool.shape[-1] != C + R or pool.stride(-1) != 1 or pool.dtype != q_lat.dtype or q_pe.dtype != q_lat.dtype:
        raise ValueError(f"paged_decode: queries {tuple(q_lat.shape)} + {tuple(q_pe.shape)} {q_lat.dtype} do not fit "
                         f"the pool {tuple(pool.shape)} {pool.dtype} (rows of unit stride)")
    q_lat = q_lat if q_lat.stride(-1) == 1 else q_lat.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    pos = q_pos if q_pos.stride(-1) == 1 else q_pos.contiguous()  # int32 or int64, read as stored
    bt = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    if pos.dim() != 2 or pos.shape[0] not in (B, 1) or not 0 < pos.shape[1] <= Q or Q % pos.shape[1] \
            or bt.shape[0] != B:
        raise ValueError(f"paged_decode: positions {tuple(q_pos.shape)} / block tables {tuple(block_tables.shape)} "
                         f"do not fit {B} rows of {Q} queries")
    if w_uv is not None and (w_uv.dim() != 3 or w_uv.shape[2] != C or Q % w_uv.shape[0] or w_uv.dtype != q_lat.dtype):
        raise ValueError(f"paged_decode: W_UV {tuple(w_uv.shape)} {w_uv.dtype} does not fit {Q} queries of {C} "
                         f"{q_lat.dtype} values ([heads, v, C] with heads dividing the queries)")
    T = bt.shape[1] * block_size
    if T == 0:  # no keys: every query sees none, as a padding row does
        return q_lat.new_zeros(B, Q, C if w_uv is None else w_uv.shape[1])
    if block_q is None:
        block_q = WIDE_BLOCK_Q if Q >= WIDE_BLOCK_Q else BLOCK_Q
    if block_q < 16 or block_q & (block_q - 1):
        raise ValueError(f"paged_decode: block_q must be a power of two >= 16 (tl.dot's tiles), got {block_q}")
    if num_warps is None:
        num_warps = 8 if block_q >= WIDE_BLOCK_Q else 4
    q_tiles = triton.cdiv(Q, block_q)
    if splits is None:
        splits = max(1, min(triton.cdiv(_PROGRAMS, B * q_tiles), triton.cdiv(T, BLOCK_T), MAX_SPLITS))
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"paged_decode: splits must be in [1, {MAX_SPLITS}], got {splits}")
    keys_per_split = triton.cdiv(triton.cdiv(T, splits), BLOCK_T) * BLOCK_T
    splits = triton.cdiv(T, keys_per_split)  # none empty
    out = torch.empty(B, Q, C, dtype=q_lat.dtype, device=q_lat.device)
    o = torch.empty(B, splits, Q, C, dtype=torch.float32, device=q_lat.device) if splits > 1 else out
    # two tensors, not views of one: torch.compile copies views handed to a kernel that writes them
    m, lsum = (torch.empty(B, splits, Q, dtype=torch.float32, device=q_lat.device) for _ in range(2))
    strides = (o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1), out.stride(0), out.stride(1))
    _partial_kernel[(B, splits, q_tiles)](
        q_lat, q_pe, pool, bt, pos, o, m, lsum, out,
        Q, T, keys_per_split, Q // pos.shape[1], scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), pool.stride(0), bt.stride(0),
        pos.stride(0) if pos.shape[0] > 1 else 0, *strides,
        BS=block_size, C=C, R=R, BLOCK_Q=block_q, BLOCK_T=BLOCK_T, ONE_SPLIT=splits == 1, num_warps=num_warps,
        **pdl.launch(q_lat.device),
    )
    if w_uv is not None:
        H, V = w_uv.shape[:2]
        if splits == 1 or B * Q // H * w_uv.numel() * w_uv.element_size() > _UV_BYTES:
            o_lat = _combine(o, m, lsum, out, splits, strides) if splits > 1 else out
            # contiguous, as the custom op's shape function declares (the einsum's layout need not be)
            return torch.einsum("bshc,hvc->bshv", o_lat.view(B, Q // H, H, C), w_uv).reshape(B, Q, V).contiguous()
        w_uv = w_uv if w_uv.stride(-1) == 1 else w_uv.contiguous()
        y = torch.empty(B, Q, V, dtype=q_lat.dtype, device=q_lat.device)
        block_s = triton.next_power_of_2(splits)
        block_c = min(C, max(16, _UV_TILE // block_s))  # a [splits, columns] tile of _UV_TILE float32 values
        _combine_uv_kernel[(B, Q, triton.cdiv(V, BLOCK_V))](
            o, m, lsum, w_uv, y, H, V, splits, *strides[:5], y.stride(0), y.stride(1), w_uv.stride(0),
            w_uv.stride(1), C=C, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_V=BLOCK_V, LINE=128 // w_uv.element_size(),
            num_warps=_UV_WARPS, **pdl.launch(q_lat.device),
        )
        return y
    return _combine(o, m, lsum, out, splits, strides) if splits > 1 else out


def _combine(o: torch.Tensor, m: torch.Tensor, lsum: torch.Tensor, out: torch.Tensor, splits: int,
             strides: tuple[int, ...]) -> torch.Tensor:
    """`_combine_kernel` over the partials of `splits` key ranges into `out` [B, Q, C]."""
    B, Q, C = out.shape
    block_s = triton.next_power_of_2(splits)
    block_c = min(C, 64, 1 << (_COMBINE_VALUES // (block_s * BLOCK_Q)).bit_length() - 1)  # a power of two
    _combine_kernel[(B, triton.cdiv(Q, BLOCK_Q), triton.cdiv(C, block_c))](
        o, m, lsum, out, Q, splits, *strides, BLOCK_C=block_c, BLOCK_Q=BLOCK_Q, BLOCK_S=block_s, num_warps=4,
        **pdl.launch(out.device),
    )
    return out


def _angles(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """RoPE angles cos / sin [B or 1, S or 1, R/2] as the kernels read them: contiguous, with their (row,
    position) strides, 0 along a dimension of one (broadcast)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1) if cos.shape[1] > 1 else 0)


def store_latents(
    pool: torch.Tensor, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
    finish: tuple[torch.Tensor, float, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """pool[slots[i]] = [c_kv[i]; k_pe[i]] (cast to the pool's dtype) for c_kv [N, C], k_pe [N, R], slots [N]: the
    paged cache's write, one launch for what `index_copy_` of a concatenation does in two. Where
    `paged_decode_supported` holds (C and R powers of two, a CUDA pool of unit-stride rows).

    finish (weight, eps, cos, sin): c_kv and k_pe are still W_DKV h and W_KR h, and what is stored is MLA's
    cached pair (eqs. 1 and 3), RMSNorm(c_kv) with that weight and eps and k_pe rotated by the angles cos / sin
    [B or 1, S or 1, R/2] of the N = B * S tokens (token i is position i % S of row i // S; with one position a
    row, every token of the row takes it): the norm, the rotation and the write in one launch (three at decode
    otherwise)."""
    N, C = c_kv.shape
    R = k_pe.shape[-1]
    if pool.shape[-1] != C + R or k_pe.shape[0] != N or slots.numel() != N or pool.stride(-1) != 1:
        raise ValueError(f"store_latents: latents {tuple(c_kv.shape)} + {tuple(k_pe.shape)} at {slots.numel()} slots "
                         f"do not fit the pool {tuple(pool.shape)}")
    if N == 0:
        return
    c_kv = c_kv if c_kv.stride(-1) == 1 else c_kv.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    if finish is None:
        weight, eps, cos, sin, S, angle_strides = pool, 0.0, pool, pool, 1, (0, 0)
    else:
        weight, eps, cos, sin = finish
        S = cos.shape[1] if cos.dim() == 3 and cos.shape[1] > 1 else N // max(1, cos.shape[0])  # tokens a row
        if weight.shape != (C,) or cos.dim() != 3 or N % S or cos.shape[-1] * 2 != R \
                or cos.shape[0] not in (1, N // S) or sin.shape != cos.shape:
            raise ValueError(f"store_latents: norm weight {tuple(weight.shape)} and angles {tuple(cos.shape)} do not "
                             f"fit {N} tokens of {C} + {R} latents")
        weight = weight.contiguous()
        cos, sin, angle_strides = _angles(cos, sin)
    _store_kernel[(N,)](c_kv, k_pe, slots.contiguous(), pool, weight, cos, sin, eps, S, c_kv.stride(0),
                        k_pe.stride(0), pool.stride(0), *angle_strides, C=C, R=R, FINISH=finish is not None,
                        num_warps=1 if C + R <= 512 else 2, **pdl.launch(pool.device))


# Latent columns per `absorb_query` program: the work per SM (heads x C x row tiles / 132) rounded up to a power
# of two, 16 to 128, so a launch has between half a program and one program an SM. At a few rows each program's
# W_UK tile comes from HBM and the launch is latency-bound, so narrow tiles win while there are few heads
# (`python -m benchmarks.mla_decode --absorb 16 32 64 128`, H200, W_UK from HBM, 16 / 32 / 64 / 128 columns:
# `bench`'s 16 heads 2.9 / 3.1 / 3.8 / 3.7 us at one row, 3.5 / 3.5 / 4.1 / 4.0 at 8 (16 and 32 within the
# run-to-run spread of ~0.4 us: a scratch sweep had 2.4 / 2.3); V3's 128 heads 10.7 / 9.1 / 7.2 / 7.0 at one row).
_ABSORB_MAX_C = 128


def _absorb_query_shape(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_uk: torch.Tensor,
                        block_c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, _ = q.shape
    D, C = w_uk.shape[1:]
    return q.new_empty(B, S * H, C), q.new_empty(B, S * H, q.shape[-1] - D)


@pdl.launched_here("absorb_query", _absorb_query_shape)
def absorb_query(
    q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_uk: torch.Tensor, block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's absorbed decode query in one launch (CUDA, Triton): for q [B, S, H, nope + rope] (eqs. 7-8, q_R not
    yet rotated; bf16 or fp16), the angles cos / sin [B or 1, S or 1, rope/2] (broadcast as apply_rope does)
    and W_UK [H, nope, C], returns q_lat = q_C W_UK of each head [B, S*H, C] (float32 sums, rounded once, as a
    batched GEMM) and q_R rotated as `rope.apply_rope` rotates it [B, S*H, rope]: query s*H + h is head h at
    position s, as `paged_decode` takes them. One batched GEMM and a RoPE kernel otherwise. block_c: latent
    columns a program (a power of two from 16 to C; default about one program an SM, benchmarks/mla_decode.py
    --absorb sweeps it)."""
    B, S, H, _ = q.shape
    _, D, C = w_uk.shape
    R = q.shape[-1] - D
    if w_uk.shape[0] != H or R < 2 or R & (R - 1) or C < 16 or C & (C - 1) or w_uk.stride(-1) != 1 \
            or cos.dim() != 3 or cos.shape[-1] * 2 != R or cos.shape[0] not in (1, B) or cos.shape[1] not in (1, S) \
            or sin.shape != cos.shape or q.dtype not in (torch.bfloat16, torch.float16) or w_uk.dtype != q.dtype:
        raise ValueError(f"absorb_query: queries {tuple(q.shape)} {q.dtype}, angles {tuple(cos.shape)} and W_UK "
                         f"{tuple(w_uk.shape)} {w_uk.dtype} do not fit (bf16 or fp16 alike, C a power of two >= 16, "
                         "an even power-of-two rope)")
    q = q if q.stride(-1) == 1 and q.stride(0) == S * q.stride(1) else q.contiguous()
    cos, sin, angle_strides = _angles(cos, sin)
    q_lat = torch.empty(B, S * H, C, dtype=q.dtype, device=q.device)
    q_pe = torch.empty(B, S * H, R, dtype=q.dtype, device=q.device)
    M, block_m = B * S, 16  # 16 rows: tl.dot's smallest tile
    if block_c is None:
        per_sm = triton.cdiv(H * C * triton.cdiv(M, block_m), _SMS)
        block_c = min(C, _ABSORB_MAX_C, max(16, triton.next_power_of_2(per_sm)))
    if not 16 <= block_c <= C or block_c & (block_c - 1):
        raise ValueError(f"absorb_query: block_c must be a power of two in [16, {C}], got {block_c}")
    _absorb_kernel[(H, C // block_c, triton.cdiv(M, block_m))](
        q, cos, sin, w_uk, q_lat, q_pe, M, S, D, q.stride(1), q.stride(2), *angle_strides, w_uk.stride(0),
        w_uk.stride(1), H * C, C, H * R, R, R=R, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m,
        BLOCK_C=block_c, LINE=128 // w_uk.element_size(), num_warps=4, **pdl.launch(q.device),
    )
    return q_lat, q_pe
