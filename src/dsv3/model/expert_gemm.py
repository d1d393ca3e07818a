"""Decode's routed experts at a few tokens per expert: each chosen expert's weights read once for all its tokens.

From a third as many (token, expert) pairs as experts on (`bench`'s batch 3; its batch 8 puts 64 pairs on ~42
distinct experts of 64), streaming every pair's expert (`dsv3.model.gemv`) reads an expert once per token that
chose it, and the grouped GEMMs of training (`grouped_mm`) tile each expert's handful of rows for 64+, behind a
sort, gathers and an unsort of launches of their own. Here one launch per projection: program (e, n-tile) finds
expert e's tokens in the router's top-k indices itself (a prefix count over the tokens, no sort), multiplies its
[BLOCK_N, K] weight slab by their rows with `tl.dot` (W a^T, BLOCK_M rows at a time: the slab is the MMA's tall
operand, so Hopper runs wgmma), and writes each (token, k) pair's output row where `Experts.few_pairs` expects
it. A shared expert shaped like a routed one runs as more program rows, one per BLOCK_M tokens.

E4M3 weights with bf16 activations go to the MMA as loaded, E4M3 x E4M3: each bf16 row is scaled by a power of
two and split exactly into two E4M3 terms (`_split_e4m3`), two FP8 MMAs a step, their 128x128 block scales
applied to each K step's float32 partial products. On `bench` 41.8 us at 8 tokens (62% of copy bandwidth) and
83.1 at 64, where widening the weights to bf16 in registers took 60.1 and 110.9, at the cost of the FP8 MMA's
14-bit sums within a step (see `_turn`); float16 and float32 activations widen the weights (exact).

`bench`'s experts on an H200 (`python -m benchmarks.experts`; gate_up and down, bf16, us): 8 tokens 60.3 (88% of
copy bandwidth for the distinct experts' bytes) against per-pair gemv 75.3 and the grouped GEMMs alone (no
sort) 108.8; 64 tokens 97.7 (82%) against 437.1 and 141.7.

CUDA only (Triton), no autograd: decode. `expert_gemm_supported` says when it runs.
"""

from __future__ import annotations

import torch

from dsv3.model import pdl
from dsv3.model.gemv import BLOCK, Extra, extra_fits, gemv_supported, scale_grid, stand_ins
from dsv3.model.pdl import pdl_release, pdl_wait

try:
    import triton
    import triton.language as tl

    from dsv3.model.gemv import n_tile, weight_rows
except ImportError:  # CPU-only installs: Experts keeps its grouped GEMMs
    triton = None

# Most tokens a launch takes: each program finds its expert's tokens among all T (a token picks an expert at most
# once). From here grouped_mm's tiles fill, and the router's top-k is sorted once for all experts.
EXPERT_GEMM_MAX_TOKENS = 64


def expert_gemm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `expert_gemm` runs for tokens x [T, d] and these expert stacks: CUDA with Triton, 1 to
    EXPERT_GEMM_MAX_TOKENS tokens in a 16- or 32-bit float, weights of x's own dtype or E4M3 (on compute
    capability 8.9+: E4M3 MMAs for bf16 rows, split exactly; widened to x's type otherwise), no autograd."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= EXPERT_GEMM_MAX_TOKENS and gemv_supported(x, *weights)
            and all(w.dtype in (x.dtype, torch.float8_e4m3fn) for w in weights))  # tl.dot in x's type


if triton is not None:

    @triton.jit
    def _expert_gemm_kernel(
        x_ptr, w_ptr, s_ptr, idx_ptr, y_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr,
        T, N, K, SPLIT, SPLIT_BLOCKS, EXTRA_PROGRAMS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
        TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_TOPK: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_EXTRA: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, TURNS: tl.constexpr, IEEE: tl.constexpr, SPLIT_A: tl.constexpr,
        PDL: tl.constexpr,
    ):
        e = tl.program_id(0)
        offs_n, n_ok = n_tile(N, BLOCK_N)
        n_experts = tl.num_programs(0) - EXTRA_PROGRAMS
        extra = e >= n_experts  # the shared expert's rows, BLOCK_M of every token a program row
        pdl_wait(PDL)  # the top-k indices and the activations come from the previous kernels
        # expert e's rows: the tokens that picked it, in token order (slot j = the j-th such token), found with a
        # prefix count over a [T, K] compare rather than a sort; the extra program rows take every token
        t = tl.arange(0, BLOCK_T)
        kk = tl.arange(0, BLOCK_TOPK)
        ids = tl.load(idx_ptr + t[:, None] * TOP_K + kk[None, :], mask=(t[:, None] < T) & (kk[None, :] < TOP_K),
                      other=-1)
        hit = ids == e
        picked = tl.max(hit.to(tl.int32), axis=1)  # [BLOCK_T]: 1 where token t chose e (at most once)
        k_of_t = tl.max(tl.where(hit, kk[None, :], 0), axis=1)  # (max, not sum: in range even for repeats)
        slot_of_t = tl.cumsum(picked, axis=0) - 1
        count = tl.sum(picked, axis=0)
        m_first = 0
        m_end = count
        if HAS_EXTRA:
            count = tl.where(extra, T, count)
            m_first = tl.where(extra, (e - n_experts) * BLOCK_M, 0)
            m_end = tl.where(extra, tl.minimum(m_first + BLOCK_M, T), count)
        w_rows, s_rows = weight_rows(w_ptr, s_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr, e.to(tl.int64), extra, offs_n,
                                     SPLIT, SPLIT_BLOCKS, stride_we, stride_wn, stride_se, stride_sn, HAS_EXTRA)
        # BLOCK_M rows at a time: an expert nobody chose costs no load; with more tokens than BLOCK_M, a busy
        # expert reads its slab again for its next rows, mostly from L2, rather than every program multiplying a
        # tile as tall as the busiest expert could be (the shared expert, busy by definition, has a program row
        # per BLOCK_M tokens instead: its turns in series made the launch's tail). At most BLOCK_M tokens: one
        # pass with no loop around it (at 8 tokens on the H200 the loop took 79.1 us for both projections, one
        # pass 69.7, same tiles)
        if TURNS:
            for m0 in range(m_first, m_end, BLOCK_M):
                _turn(m0, count, picked, slot_of_t, k_of_t, t, extra, T, x_ptr, y_ptr, w_rows, s_rows, offs_n, n_ok, K,
                      stride_xm, stride_ym, TOP_K, HAS_SCALE, HAS_EXTRA, SWIGLU, BLOCK_M, BLOCK_N, BLOCK_K, IEEE,
                      SPLIT_A)
        elif count > 0:
            _turn(0, count, picked, slot_of_t, k_of_t, t, extra, T, x_ptr, y_ptr, w_rows, s_rows, offs_n, n_ok, K,
                  stride_xm, stride_ym, TOP_K, HAS_SCALE, HAS_EXTRA, SWIGLU, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, SPLIT_A)
        pdl_release(PDL)

    @triton.jit
    def _split_e4m3(a):
        """bf16 rows a [M, K] as (hi + lo / 16) * s, hi and lo E4M3, s a power of two per row: exact from 2^-13 of
        the row's largest value (below that, a value's bits down to 2^-21 of it). s puts the row's largest in
        (128, 256], where a bf16 value's 8 significant bits are hi's 4 and the remainder's (at most 4, at most
        half of hi's last place), both normal or on E4M3's subnormal grid (checked against torch's E4M3 rounding
        for every bf16 value and row maxima from bf16's least to its largest; tests/model/test_expert_gemm.py
        checks the kernel's). Every scaling is by a power of two: no rounding. A row holding inf gets s = NaN,
        so NaN outputs rather than E4M3's saturated 448 making a finite wrong one."""
        af = a.to(tl.float32)
        big = tl.max(tl.abs(af), axis=1)
        # e: the biased exponent of the power of two at or above the row's largest (float32 bits rounded up to
        # the next exponent; from 2^-125 so that 2^(129 - e) stays a normal float32; 255 past 2^127)
        bits = tl.maximum(big, 2.350988701644575e-38).to(tl.int32, bitcast=True)
        e = ((bits + 0x007FFFFF) >> 23) & 0xFF
        xa = (af * ((256 - e) << 23).to(tl.float32, bitcast=True)[:, None]) * 64.0  # a * 2^(135 - e)
        hi = xa.to(tl.float8e4nv)
        lo = ((xa - hi.to(tl.float32)) * 16.0).to(tl.float8e4nv)
        # s = 2^(e - 135): directly where that is a normal float32, else 2^(e - 71) * 2^-64 (exact subnormal)
        s = tl.where(e > 8, ((e - 8) << 23).to(tl.float32, bitcast=True),
                     ((e + 56) << 23).to(tl.float32, bitcast=True) * 5.421010862427522e-20)
        return hi, lo, tl.where(big < float("inf"), s, float("nan"))

    @triton.jit
    def _turn(
        m0, count, picked, slot_of_t, k_of_t, t, extra, T, x_ptr, y_ptr, w_rows, s_rows, offs_n, n_ok, K,
        stride_xm, stride_ym, TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXTRA: tl.constexpr,
        SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, SPLIT_A: tl.constexpr,
    ):
        """Rows m0 .. m0 + BLOCK_M of the program's expert times its [BLOCK_N, K] slab, stored to their pairs."""
        slot = m0 + tl.arange(0, BLOCK_M)
        sel = (picked[None, :] == 1) & (slot_of_t[None, :] == slot[:, None])  # [BLOCK_M, BLOCK_T]
        tok = tl.sum(tl.where(sel, t[None, :], 0), axis=1)
        pair = tok * TOP_K + tl.sum(tl.where(sel, k_of_t[None, :], 0), axis=1)
        if HAS_EXTRA:
            tok = tl.where(extra, slot, tok)
            pair = tl.where(extra, T * TOP_K + slot, pair)
        rows_ok = slot < count
        # gate_up reads each token's row; down its pair's gate_up output (two halves: SwiGLU as it loads)
        a_rows = x_ptr + (pair if SWIGLU else tok).to(tl.int64)[:, None] * stride_xm
        # W a^T rather than a W^T: the weight tile is the MMA's tall left operand (M = BLOCK_N) and the few rows
        # its N. Hopper then issues wgmma; the other way round, BLOCK_M = 16 rows as M lowered to mma.sync, 25%
        # slower at 64 tokens.
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a_ok = rows_ok[:, None] & k_ok[None, :]
            if SWIGLU:
                g = tl.load(a_rows + offs_k[None, :], mask=a_ok, other=0.0).to(tl.float32)
                u = tl.load(a_rows + K + offs_k[None, :], mask=a_ok, other=0.0).to(tl.float32)
                a = (g * tl.sigmoid(g) * u).to(x_ptr.dtype.element_ty)
            else:
                a = tl.load(a_rows + offs_k[None, :], mask=a_ok, other=0.0)
            w = tl.load(w_rows[:, None] + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if SPLIT_A:
                # E4M3 weights meet E4M3 rows as loaded: no per-element widening ahead of the MMA (which held the
                # kernel at ~46% of copy bandwidth). The products are exact; the FP8 MMA sums them in 14
                # significant bits (DeepSeek-V3 3.3.2), not float32's 24. Each step's partial starts from zero
                # and reaches the float32 accumulator after at most 128 products (tests: bound and measured)
                hi, lo, s_a = _split_e4m3(a)
                part = tl.dot(w, tl.trans(hi)) + tl.dot(w, tl.trans(lo)) * 0.0625
                part *= s_a[None, :]
            else:
                w = w.to(a.dtype)  # E4M3 -> 16/32 bits: exact
                if IEEE:
                    part = tl.dot(w, tl.trans(a), input_precision="ieee")
                else:
                    part = tl.dot(w, tl.trans(a))
            if HAS_SCALE:  # BLOCK_K divides 128: the step lies in one column of scale blocks
                part *= tl.load(s_rows + k0 // 128, mask=n_ok, other=0.0)[:, None]
            acc += part
        out = y_ptr + pair.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & rows_ok[None, :])


def expert_gemm(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, scale_inv: torch.Tensor | None = None,
    swiglu: bool = False, split: int | None = None, extra: Extra | None = None,
    tiles: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """y[t*K + k] = W_{idx[t, k]} a (one row per (token, expert) pair, in `x`'s dtype, float32 sums) for the
    top-k indices idx [T, K] into the stack w [E, N, d_in] (E4M3 with `scale_inv` [E, ceil(N/128),
    ceil(d_in/128)]); with `extra` a shared expert's outputs in rows T*K + t. A token's K indices are distinct
    (as top-k's are): a row per (token, expert), found by the expert's programs.

    - gate_up (swiglu=False): x [T, d_in], a = x[t]; `split`: w stacks two matrices (gate and up), each on its
      own FP8 block grid, as `gemv` reads them.
    - down (swiglu=True): x [T*K (+ T), 2 * d_in] is gate_up's output, a = silu(x[p, :d_in]) * x[p, d_in:],
      rounded to x's dtype before the product as `swiglu` rounds it.
    - tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a program instead of the default (benchmarks sweep
      them): BLOCK_M of an expert's rows at a time, BLOCK_N outputs, BLOCK_K deep steps.
    """
    T, top_k = idx.shape
    E, N, d_in = w.shape
    rows_in = T * top_k + (T if extra is not None else 0) if swiglu else T
    if x.dim() != 2 or x.shape != (rows_in, 2 * d_in if swiglu else d_in) or not 1 <= T <= EXPERT_GEMM_MAX_TOKENS:
        raise ValueError(f"expert_gemm: activations {tuple(x.shape)} do not fit the weight {tuple(w.shape)} for "
                         f"top-k indices {tuple(idx.shape)} (at most {EXPERT_GEMM_MAX_TOKENS} tokens)")
    if scale_inv is not None and tuple(scale_inv.shape) != (E, *scale_grid(N, d_in, split)):
        raise ValueError(f"expert_gemm: scale_inv {tuple(scale_inv.shape)} is not the 128x128 block grid of "
                         f"{tuple(w.shape)}")
    if w.dtype not in (x.dtype, torch.float8_e4m3fn) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_gemm: weights {w.dtype} for activations {x.dtype} (x's dtype or E4M3: tl.dot would "
                         f"narrow them), indices {idx.dtype} (int32 or int64)")
    if extra is not None and not extra_fits(extra, w, scale_inv, N, split):
        raise ValueError("expert_gemm: the extra matrix does not match the stacked weights' shape, dtype, row "
                         "stride and scales")
    tiles = tiles or _tiles(swiglu, T, w.element_size(), x.element_size(), _e4m3_mma(w, x))
    block_m, block_n, block_k, warps, stages = tiles
    if (min(block_m, block_n, block_k) < 16 or any(b & (b - 1) for b in (block_m, block_n, block_k))
            or BLOCK % block_k):
        raise ValueError(f"expert_gemm: tiles {tiles}: BLOCK_M, BLOCK_N and BLOCK_K powers of two from 16, "
                         f"BLOCK_K dividing {BLOCK}")
    xw, xs, xw2, xs2 = extra if extra is not None else (None, None, None, None)
    return _run(x if x.stride(-1) == 1 else x.contiguous(), w if w.stride(-1) == 1 else w.contiguous(),
                None if scale_inv is None else scale_inv.contiguous(), idx.contiguous(), swiglu,
                N if split is None else split, xw, xs, xw2, xs2, [block_m, block_n, block_k, warps, stages])


def _e4m3_mma(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the MMAs run E4M3 x E4M3 (bf16 rows split in two E4M3 terms, `_split_e4m3`): float16's 11 bits
    would need three terms, float32 rows keep exact float32 products."""
    return w.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16


def _tiles(swiglu: bool, T: int, w_bytes: int, x_bytes: int, e4m3_mma: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): from sweeps of `bench`'s experts on the H200 (`python -m
    benchmarks.experts --sweep 8 64`, weights from HBM, us). gate_up 16x64x128x4x3 the best at 8 and 64 tokens
    (bf16 36.4 and 59.4, against ~38 and 61.4 for 16x128x128x4x3); down 16x256x64x4x3 at 8 tokens (21.8 against
    22.1 for the next shape, above 24.4 for 16x128x64x4x3), 16x128x64x4x3 at 64 (37.4, 256 rows not among the
    best five). E4M3 weights on E4M3 MMAs (`--e4m3 --sweep 8 64`): gate_up 16x128x128x4x3 at 8 tokens (24.2
    against 27.6), 16x64x128x4x3 at 64 (46.8 against 49.8); down as for bf16 (19.3 and 31.5, the best at both).
    Fewer stages where the pipelined loads would not fit 160 KB of shared memory (float32)."""
    if swiglu:
        block_m, block_n, block_k, warps, stages = 16, 256 if T <= 8 else 128, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 16, 128 if e4m3_mma and T <= 8 else 64, 128, 4, 3
    while stages > 2 and stages * block_k * (block_n * w_bytes + block_m * x_bytes) > 160 << 10:
        stages -= 1
    return block_m, block_n, block_k, warps, stages


def _run_shape(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, idx: torch.Tensor, swiglu: bool, split: int,
    xw: torch.Tensor | None, xs: torch.Tensor | None, xw2: torch.Tensor | None, xs2: torch.Tensor | None,
    tiles: list[int],
) -> torch.Tensor:
    T, top_k = idx.shape
    return x.new_empty(T * top_k + (T if xw is not None else 0), w.shape[1])


@pdl.launched_here("expert_gemm", _run_shape)
def _run(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, idx: torch.Tensor, swiglu: bool, split: int,
    xw: torch.Tensor | None, xs: torch.Tensor | None, xw2: torch.Tensor | None, xs2: torch.Tensor | None,
    tiles: list[int],
) -> torch.Tensor:
    """The launch on checked operands (see `expert_gemm`)."""
    T, top_k = idx.shape
    E, N, d_in = w.shape
    has_extra = xw is not None
    y = torch.empty(T * top_k + (T if has_extra else 0), N, dtype=x.dtype, device=x.device)
    scales, xw, xs, xw2, xs2 = stand_ins(w, s, xw, xs, xw2, xs2)
    block_m, block_n, block_k, warps, stages = tiles
    extra_programs = triton.cdiv(T, block_m) if has_extra else 0
    _expert_gemm_kernel[(E + extra_programs, triton.cdiv(N, block_n))](
        x, w, scales, idx, y, xw, xs, xw2, xs2, T, N, d_in, split, triton.cdiv(split, BLOCK), extra_programs,
        x.stride(0), w.stride(0), w.stride(1), s.stride(0) if s is not None else 0,
        s.stride(1) if s is not None else 0, y.stride(0),
        TOP_K=top_k, BLOCK_T=triton.next_power_of_2(T), BLOCK_TOPK=triton.next_power_of_2(top_k),
        HAS_SCALE=s is not None, HAS_EXTRA=has_extra, SWIGLU=swiglu, BLOCK_M=block_m, TURNS=T > block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        SPLIT_A=_e4m3_mma(w, x), num_warps=warps, num_stages=stages,
        **pdl.launch(x.device),
    )
    return y
