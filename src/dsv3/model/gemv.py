"""Few-row GEMMs that read each weight byte once at memory speed: decode's routed experts, its single-row
linears (`linear`, `linear_pair`) and FP8 linears.

At decode a MoE layer multiplies T*K (token, expert) pairs, one row each, by K of E experts. Both general
kernels waste the step there: grouped_mm tiles every expert's segment for 64+ rows (~19 us a call for 8 rows of
the `bench` experts on an H200, ~4x the time their bytes take), and cuBLAS's blockwise FP8 GEMM needs K a
multiple of 512, so FP8 weights otherwise get dequantised to bf16 every step (three times the bytes). `gemv`
is one Triton kernel for both: program (p, n-tile) streams the [BLOCK_N, K] slab of weight `idx[p]` once,
multiplies it by its activation row in float32, and applies FP8 weights' 128x128 block scales in float32 (to
the activation's columns where a program's rows share one row of blocks, else to each weight as it is loaded),
so the activation is never quantised (more exact than the GEMM path).
With `swiglu=True` the activation is silu(h[:, :I]) * h[:, I:] of the gate_up output, computed as it is
loaded: the down projection never materialises the hidden activation.

CUDA only (Triton); callers keep their own path elsewhere (`gemv_supported`). Not differentiable: decode only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsv3.model import pdl
from dsv3.model.layers import defer_norm, norm_inside
from dsv3.model.pdl import pdl_prefetch_rows, pdl_release, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers' general paths run
    triton = None

BLOCK = 128  # FP8 scale block, and the kernel's K step
GEMV_MAX_ROWS = 8  # decode batches: below a GEMM tile, where cuBLAS would pad M (and quantise x for FP8)
# Largest 16/32-bit weight (bytes, all of a launch's together) a single row streams through gemv rather than
# cuBLAS. Small ones are latency: there gemv wins, and carries the norm and the residual. Large ones are bytes:
# there cuBLAS keeps more loads in flight. V3's single-row linears on an H200 (`python -m benchmarks.gemv
# --linears 2112x7168 24576x1536 7168x16384 --no-experts --sweep`, weights from HBM; cuBLAS / gemv / gemv's
# best program shape): 30 MB 12.4 / 12.1 / 12.1 us, W_UQ 75 MB 21.3 / 26.2 / 25.5, W_O 235 MB 59.9 / 91.4 / 85.8.
# `bench`'s are all under 7 MB.
GEMV_MAX_BYTES = 32 << 20


@torch.compiler.assume_constant_result
def _has_e4m3(device: torch.device) -> bool:
    """Triton's fp8e4nv needs compute capability 8.9+ (Ada, Hopper). A constant of the device: torch.compile
    folds it instead of tracing the CUDA query."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def gemv_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `gemv` runs for activations x and these weights: CUDA with Triton, a 16- or 32-bit float x,
    E4M3 weights only where Triton has the type (compute capability 8.9+: Ada, Hopper), and nothing autograd
    would need a gradient for (the kernel has no backward)."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if any(w.dtype == torch.float8_e4m3fn for w in weights) and not _has_e4m3(x.device):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)))


if triton is not None:

    @triton.jit
    def n_tile(N, BLOCK_N: tl.constexpr):
        """(offs_n, n_ok): this program's BLOCK_N output rows along grid axis 1, clamped inside the weight so
        that their addresses stay valid (loads are masked with n_ok)."""
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.minimum(offs_n, N - 1), offs_n < N

    @triton.jit
    def weight_rows(
        w_ptr, s_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr, e, extra, offs_n, SPLIT, SPLIT_BLOCKS,
        stride_we, stride_wn, stride_se, stride_sn, HAS_EXTRA: tl.constexpr,
    ):
        """(pointers to rows `offs_n` of stacked weight `e`, pointers to their 128x128 block scales' rows), or of
        the extra matrix where `extra`. A weight is read as two row ranges: rows < SPLIT from `lo`, the rest
        from `hi` (gate_up's halves, each with its own FP8 block grid of SPLIT_BLOCKS rows for the first; for
        the extra matrix two separate tensors, such as a shared expert's gate_proj and up_proj)."""
        lo = w_ptr + e * stride_we
        s_lo = s_ptr + e * stride_se
        hi = lo + SPLIT * stride_wn
        s_hi = s_lo + SPLIT_BLOCKS * stride_sn
        if HAS_EXTRA:
            lo = tl.where(extra, xw_ptr, lo)
            hi = tl.where(extra, xw2_ptr, hi)
            s_lo = tl.where(extra, xs_ptr, s_lo)
            s_hi = tl.where(extra, xs2_ptr, s_hi)
        first = offs_n < SPLIT
        rest = tl.maximum(offs_n - SPLIT, 0).to(tl.int64)
        w_rows = tl.where(first, lo + offs_n.to(tl.int64) * stride_wn, hi + rest * stride_wn)
        s_rows = tl.where(first, s_lo + (offs_n // 128) * stride_sn, s_hi + (rest // 128) * stride_sn)
        return w_rows, s_rows

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, idx_ptr, y_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr, nw_ptr, r_ptr, eps,
        N, K, P, ROWS_PER_X, EXTRA_X0, SPLIT, SPLIT_BLOCKS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ym, stride_rm,
        HAS_IDX: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXTRA: tl.constexpr, SWIGLU: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr, NORM: tl.constexpr,
        RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr,
    ):
        p = tl.program_id(0)
        offs_n, n_ok = n_tile(N, BLOCK_N)
        if HAS_IDX:  # the rows' experts come from the previous kernel (the router)
            pdl_wait(PDL)
            e = tl.load(idx_ptr + tl.minimum(p, P - 1)).to(tl.int64)
        else:
            e = tl.zeros([], dtype=tl.int64)
        row = p // ROWS_PER_X
        extra = p >= P  # programs past the P indexed rows apply the extra matrix to x's last rows
        if HAS_EXTRA:
            row = tl.where(extra, EXTRA_X0 + p - P, row)
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        w_rows, s_rows = weight_rows(w_ptr, s_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr, e, extra, offs_n, SPLIT,
                                     SPLIT_BLOCKS, stride_we, stride_wn, stride_se, stride_sn, HAS_EXTRA)
        w_rows = w_rows[:, None]
        s_rows = s_rows[:, None]
        if HAS_SCALE:
            # ROW_SCALE: the program's rows share one row of 128x128 blocks, so each column's scale multiplies the
            # activation once, not each of the BLOCK_N weights (nor is it loaded BLOCK_N times): the E4M3 GEMVs
            # are bound by that per-element work, not bytes (H200, us: `bench`'s W_O 4.9 -> 3.3, the experts'
            # gate_up 15.9 -> 9.2 and down 9.0 -> 5.0, V3's W_O 108 -> 69; `python -m benchmarks.gemv`)
            _, s_row = weight_rows(w_ptr, s_ptr, xw_ptr, xs_ptr, xw2_ptr, xs2_ptr, e, extra,
                                   tl.program_id(1) * BLOCK_N, SPLIT, SPLIT_BLOCKS, stride_we, stride_wn,
                                   stride_se, stride_sn, HAS_EXTRA)
        if not HAS_IDX:  # a fixed weight: its [BLOCK_N, K] slab on its way to L2 while the previous kernel ends
            pdl_prefetch_rows(w_rows, K, LINE, PDL)
            pdl_wait(PDL)
        # ACC2D: elementwise products summed over K, one cross-lane sum at the end. A sum per 128-deep step
        # left the kernel latency-bound: 1.5-2x slower for the linears, 1.2-1.4x for gate_up (weights read
        # from HBM, benchmarks/gemv.py). The SwiGLU-on-load variant keeps it: ~2x slower with ACC2D in a sweep.
        # BLOCK_K: a multiple of 128 (FP8's scale block), each column scaled by its own block's scale
        if ACC2D:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            if SWIGLU:
                g = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_row + K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                a = g * tl.sigmoid(g) * u
            else:
                a = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                if NORM:  # RMSNorm(x): the weight now, the row's 1/rms once its sum of squares is complete
                    sq += a * a
                    a *= tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if HAS_SCALE and ROW_SCALE:
                a *= tl.load(s_row + offs_k // 128, mask=k_ok, other=0.0)
            elif HAS_SCALE:  # each weight's own 128x128 block scale
                w = w * tl.load(s_rows + offs_k[None, :] // 128, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if ACC2D:
                acc += w * a[None, :]
            else:
                acc += tl.sum(w * a[None, :], axis=1)
        pdl_release(PDL)
        if ACC2D:
            y = tl.sum(acc, axis=1)
        else:
            y = acc
        if NORM:  # (under torch.compile eps arrives as a float64)
            y *= tl.rsqrt((tl.sum(sq, axis=0) / K + eps).to(tl.float32))
        if RESIDUAL:  # the block's skip connection, added before the one rounding
            y += tl.load(r_ptr + p.to(tl.int64) * stride_rm + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + p.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


class Extra(NamedTuple):
    """A matrix `gemv` applies after its indexed rows, in the same launch: `w` [N, K], or with `w2` the first
    `split` rows in `w` and the rest in `w2` (a shared expert's gate_proj and up_proj); E4M3 weights with their
    `scale_inv` block grids. Same dtype and row stride as the indexed weights."""

    w: torch.Tensor
    scale_inv: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    scale_inv2: torch.Tensor | None = None


def gemv(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None = None, scale_inv: torch.Tensor | None = None,
    rows_per_x: int = 1, swiglu: bool = False, split: int | None = None, extra: Extra | None = None,
    extra_rows: int = 0, tiles: tuple[int, int, int] | None = None,
    norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[p] = W_p a_p (+ residual[p]) for p < P, in x's dtype (float32 accumulation).

    - w: one weight [N, K] (then `idx` is None and P = x's rows) or a stack [E, N, K] with `idx` [P] naming
      each row's weight; E4M3 weights take `scale_inv` ([ceil(N/128), ceil(K/128)] or [E, ...]).
    - a_p = x[p // rows_per_x] (rows_per_x = K of top-K: each token's row serves its K pairs), or with
      `swiglu` silu(x[p, :K]) * x[p, K:] for x [P, 2K].
    - split: each weight stacks two matrices, its first `split` rows and the rest (gate_up), each quantised on
      its own grid (the second's block rows start after ceil(split/128)); default: one grid.
    - extra, extra_rows: `extra_rows` more outputs y[P + j] = W_extra a, a from x's last `extra_rows` rows (which
      may be the ones the indexed rows read: decode's shared expert on each token beside its routed pairs).
    - tiles: (BLOCK_N, BLOCK_K, warps) of a program instead of the default (`_tiles`; benchmarks sweep them).
    - norm (weight [K], eps): a_p = RMSNorm(x row) inside the same pass, no launch of its own: each column
      scaled by the norm's weight as it is loaded, the row's sum of squares gathered alongside and its 1/rms
      applied to the sums at the end (float32 throughout: `layers.RMSNorm` rounds the normalised row to x's
      dtype twice, this does not); not with swiglu.
    - residual [P, N] (one weight, no idx): added to the float32 sums before their one rounding (a block's skip
      connection in its output projection's launch).
    """
    if idx is None:
        if rows_per_x != 1:
            raise ValueError("gemv: rows_per_x needs idx (one weight per pair)")
        if extra is not None:
            raise ValueError("gemv: an extra matrix goes with indexed rows (idx); see gemv_pair")
        P = x.shape[0]
        w3, s3 = w.unsqueeze(0), None if scale_inv is None else scale_inv.unsqueeze(0)
    else:
        P, w3, s3, idx = idx.numel(), w, scale_inv, idx.reshape(-1).contiguous()
    _, N, K = w3.shape
    own = x.shape[0] - (extra_rows if extra is not None else 0)  # x rows only the indexed rows read
    if (x.dim() != 2 or x.shape[1] != (2 * K if swiglu else K) or extra_rows > x.shape[0]
            or P not in (x.shape[0] * rows_per_x, own * rows_per_x)):
        raise ValueError(f"gemv: activations {tuple(x.shape)} do not fit the weight {tuple(w.shape)} for {P} rows "
                         f"(x is [P / rows_per_x, {'2K' if swiglu else 'K'}])")
    if s3 is not None and tuple(s3.shape[1:]) != scale_grid(N, K, split):
        raise ValueError(f"gemv: scale_inv {tuple(scale_inv.shape)} is not the 128x128 block grid of {tuple(w.shape)}")
    if norm is not None and (swiglu or norm[0].shape != (K,)):
        raise ValueError(f"gemv: RMSNorm weight {tuple(norm[0].shape)} does not fit activations {tuple(x.shape)} "
                         "(one value a column, no swiglu)")
    if residual is not None and (idx is not None or residual.shape != (P, N) or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} {residual.dtype} on {residual.device} does not fit "
                         f"the output ({P}, {N}) {x.dtype} on {x.device} of one weight")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w3 = w3 if w3.stride(-1) == 1 else w3.contiguous()
    s3 = None if s3 is None else s3.contiguous()
    return _launch(x, w3, s3, idx if P else None, P, N, K, rows_per_x, swiglu, split, extra,
                   extra_rows if extra is not None else 0, tiles, norm,
                   None if residual is None else residual.contiguous())


def gemv_pair(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale_inv1: torch.Tensor | None = None,
    scale_inv2: torch.Tensor | None = None, tiles: tuple[int, int, int] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x [M, K] times two weights that share it, [N1, K] and [N2, K], in one launch: [M, N1 + N2] = x [W1; W2]^T
    (MLA's W_DQ and [W_DKV; W_KR] at decode), without concatenating the weights; norm: RMSNorm(x) first, inside
    the same pass, as `gemv` applies it."""
    if x.dim() != 2 or x.shape[1] != w1.shape[1]:
        raise ValueError(f"gemv_pair: activations {tuple(x.shape)} do not fit the weight {tuple(w1.shape)}")
    if norm is not None and norm[0].shape != (x.shape[1],):
        raise ValueError(f"gemv_pair: RMSNorm weight {tuple(norm[0].shape)} does not fit activations {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    extra = Extra(w1, scale_inv1, w2, scale_inv2)
    return _launch(x, w1.unsqueeze(0), None if scale_inv1 is None else scale_inv1.unsqueeze(0), None, 0,
                   w1.shape[0] + w2.shape[0], w1.shape[1], 1, False, w1.shape[0], extra, x.shape[0], tiles, norm)


def scale_grid(n: int, k: int, split: int | None = None) -> tuple[int, int]:
    """The 128x128 block grid of an [n, k] E4M3 weight's scales: (block rows, block columns), the first `split`
    rows and the rest each on a grid of their own when split is given (gate_up's halves)."""
    rows = -(-n // BLOCK) if split is None else -(-split // BLOCK) + -(-(n - split) // BLOCK)
    return rows, -(-k // BLOCK)


def extra_fits(
    extra: Extra, like: torch.Tensor, scale_like: torch.Tensor | None, n: int, split: int | None = None,
) -> bool:
    """Whether `gemv` can read `extra` beside indexed weights of `n` rows stored as `like` is (its dtype and row
    stride, unit-stride columns) with `scale_like`'s block scales (or none): the same dtype and row stride,
    contiguous scales, and rows in two halves (each on its own block grid) exactly when the weights' are."""
    K = like.shape[-1]
    kblocks = -(-K // BLOCK)
    two = split is not None and split < n
    n1 = split if two else n

    def fits(t: torch.Tensor | None, dtype: torch.dtype, row_stride: int, shape: tuple[int, int]) -> bool:
        return (t is not None and t.dtype == dtype and tuple(t.shape) == shape and t.stride(-1) == 1
                and t.stride(0) == row_stride)

    def weight(t: torch.Tensor | None, rows: int) -> bool:
        return fits(t, like.dtype, like.stride(-2), (rows, K))

    def scale(t: torch.Tensor | None, rows: int) -> bool:
        if scale_like is None:
            return t is None
        return fits(t, scale_like.dtype, kblocks, (-(-rows // BLOCK), kblocks))

    if like.stride(-1) != 1 or (extra.w2 is not None) != two:
        return False
    halves = [(extra.w, extra.scale_inv, n1)] + ([(extra.w2, extra.scale_inv2, n - n1)] if two else [])
    return (all(weight(w, rows) and scale(s, rows) for w, s, rows in halves)
            and (two or extra.scale_inv2 is None))


def _launch(
    x: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor | None, idx: torch.Tensor | None, P: int, N: int, K: int,
    rows_per_x: int, swiglu: bool, split: int | None, extra: Extra | None, extra_rows: int,
    tiles: tuple[int, int, int] | None = None, norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    if extra is not None and not extra_fits(extra, w3, s3, N, split):
        raise ValueError("gemv: the extra matrix does not match the indexed weights' shape, dtype, row stride "
                         "and scales")
    block_n, block_k, warps = tiles or _tiles((P + extra_rows) * N, K, swiglu, s3 is not None)
    if block_k < BLOCK or block_k % BLOCK or block_n < 1 or block_n & (block_n - 1) or block_k & (block_k - 1):
        raise ValueError(f"gemv: tiles {tiles}: BLOCK_N a power of two, BLOCK_K a power-of-two multiple of {BLOCK}")
    xw, xs, xw2, xs2 = extra if extra is not None else (None, None, None, None)
    return _run(x, w3, s3, idx, P, N, rows_per_x, swiglu, N if split is None else split, xw, xs, xw2, xs2,
                extra_rows, [block_n, block_k, warps], None if norm is None else norm[0].contiguous(),
                0.0 if norm is None else norm[1], residual)


def _run_shape(
    x: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor | None, idx: torch.Tensor | None, P: int, N: int,
    rows_per_x: int, swiglu: bool, split: int, xw: torch.Tensor | None, xs: torch.Tensor | None,
    xw2: torch.Tensor | None, xs2: torch.Tensor | None, extra_rows: int, tiles: list[int], nw: torch.Tensor | None,
    eps: float, residual: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(P + extra_rows, N)


@pdl.launched_here("gemv", _run_shape)
def _run(
    x: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor | None, idx: torch.Tensor | None, P: int, N: int,
    rows_per_x: int, swiglu: bool, split: int, xw: torch.Tensor | None, xs: torch.Tensor | None,
    xw2: torch.Tensor | None, xs2: torch.Tensor | None, extra_rows: int, tiles: list[int], nw: torch.Tensor | None,
    eps: float, residual: torch.Tensor | None,
) -> torch.Tensor:
    """The launch itself, on checked operands (see `gemv`): x [rows, K or 2K], the weights w3 [E, N, K] (scales
    s3), `idx` naming each of the first P rows' weight, the extra matrix xw (rows from `split` on: xw2; scales
    xs, xs2) for the last `extra_rows` outputs, (BLOCK_N, BLOCK_K, warps) `tiles`, the RMSNorm weight nw, the
    residual added to the outputs."""
    K = w3.shape[-1]
    y = torch.empty(P + extra_rows, N, dtype=x.dtype, device=x.device)
    if y.shape[0] == 0:
        return y
    has_extra = xw is not None
    s, xw, xs, xw2, xs2 = stand_ins(w3, s3, xw, xs, xw2, xs2)
    block_n, block_k, warps = tiles
    _gemv_kernel[(y.shape[0], triton.cdiv(N, block_n))](
        x, w3, s, idx if idx is not None else x, y, xw, xs, xw2, xs2, x if nw is None else nw,
        y if residual is None else residual, eps,
        N, K, P, rows_per_x, x.shape[0] - extra_rows, split, triton.cdiv(split, BLOCK),
        x.stride(0), w3.stride(0), w3.stride(1),
        s3.stride(0) if s3 is not None else 0, s3.stride(1) if s3 is not None else 0, y.stride(0),
        0 if residual is None else residual.stride(0),
        HAS_IDX=idx is not None, HAS_SCALE=s3 is not None, HAS_EXTRA=has_extra, SWIGLU=swiglu,
        BLOCK_N=block_n, BLOCK_K=block_k, ACC2D=not swiglu, NORM=nw is not None, RESIDUAL=residual is not None,
        ROW_SCALE=BLOCK % block_n == 0 and split % block_n == 0, LINE=128 // w3.element_size(), num_warps=warps,
        **pdl.launch(x.device),
    )
    return y


def stand_ins(
    w: torch.Tensor, s: torch.Tensor | None, xw: torch.Tensor | None, xs: torch.Tensor | None,
    xw2: torch.Tensor | None, xs2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, xw, xs, xw2, xs2) as `weight_rows`' kernels take them: every absent operand replaced by a tensor the
    kernel is handed but never reads (no scales: the weight; no extra matrix: the stacked one; no second half:
    the first)."""
    s = s if s is not None else w
    xw, xs = (xw, xs if xs is not None else s) if xw is not None else (w, s)
    return s, xw, xs, xw2 if xw2 is not None else xw, xs2 if xs2 is not None else xs


def _tiles(rows: int, K: int, swiglu: bool, scaled: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for `rows` output values (all programs' together) of K-long dot products: the
    fastest of sweeps on the H200 (weights from HBM). From four programs per SM on (the routed experts),
    16-row programs stepping 256 columns (8 pairs' gate_up 10.6 -> 10.1 us, down 7.4 -> 6.8 against 128-column
    steps; `python -m benchmarks.gemv --sweep`). Fewer rows (a bf16 linear's single row): 8-row programs that
    load the whole row at once (up to 2048 columns a step), so that each program's loads are in flight
    together rather than one latency per 128-column step: W_UQ 3072 x 768 3.5 -> 2.9 us, W_O 1536 x 2048 5.0 ->
    4.1, W_DQ 768 x 1536 2.6 -> 2.1 (a sweep of 1-8 rows, 128-2048 columns, 1-8 warps). E4M3 weights,
    with their scales on the activation (ROW_SCALE), take 8 rows of 1024 columns at 4 warps (`python -m
    benchmarks.gemv --linears ... --no-experts --sweep --sweep-e4m3 --tiles ...`, against 4 x 512 at 4 warps,
    the best before ROW_SCALE: `bench`'s W_O 1536 x 2048 3.4 -> 2.8 us, W_UQ 3072 x 768 3.0 -> 2.4; V3's
    [W_DQ; W_DKV; W_KR] 2112 x 7168 10.3 -> 9.3, W_O 7168 x 16384 69.0 -> 45.9)."""
    if rows >= 16 * 132 * 4:
        return 16, 2 * BLOCK, 4 if swiglu else 8
    if swiglu:
        return 4, BLOCK, 4
    whole = max(BLOCK, triton.next_power_of_2(K))
    return (8, min(8 * BLOCK, whole), 4) if scaled else (8, min(16 * BLOCK, whole), 8)


def plain_linear(m: torch.nn.Module) -> bool:
    """Whether `m`'s forward is exactly x W^T from its `weight` (E4M3 with `weight_scale_inv`; no bias), so gemv
    may read the weight instead of calling it: nn.Linear itself or a class that declares so (`gemv_streamable`:
    dsv3.fp8's FP8Linear), with no hooks. Subclasses and wrappers (a LoRA adapter adds to the product) keep
    their forward."""
    return ((type(m) is torch.nn.Linear or getattr(type(m), "gemv_streamable", False))
            and getattr(m, "bias", None) is None and not (m._forward_hooks or m._forward_pre_hooks))


def _streams(x: torch.Tensor, *mods: torch.nn.Module) -> bool:
    """Whether gemv should run bias-free linears `mods` (sharing the input x) instead of their forwards: a single
    row of 16/32-bit weights in x's dtype of at most GEMV_MAX_BYTES together (cuBLAS's GEMV takes about as long
    per launch there, and faster beyond; gemv streams each weight once per row, so more rows lose), or up to
    GEMV_MAX_ROWS rows of E4M3 ones (dsv3.fp8's FP8Linear: `weight` and `weight_scale_inv`, which stream through
    gemv one launch each anyway); not under autocast."""
    if not all(plain_linear(m) for m in mods):
        return False
    w = mods[0].weight
    scaled = getattr(mods[0], "weight_scale_inv", None) is not None
    rows = x.numel() // max(1, x.shape[-1])
    return (rows <= (GEMV_MAX_ROWS if scaled else 1) and all(m.weight.shape[1] == x.shape[-1] for m in mods)
            and gemv_supported(x, *(m.weight for m in mods))
            and (scaled or (w.dtype == x.dtype and sum(m.weight.nbytes for m in mods) <= GEMV_MAX_BYTES))
            and not torch.is_autocast_enabled(x.device.type))


def linear(
    x: torch.Tensor, m: torch.nn.Module, norm: torch.nn.Module | None = None, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """m(x), or m(norm(x)) for an RMSNorm `norm`, plus `residual` when given, for a bias-free linear layer:
    through one gemv launch where that pays (`_streams`: decode's single row over weights of up to
    GEMV_MAX_BYTES, where cuBLAS reads `bench`'s W_UQ and W_O at a fraction of the bandwidth: 4.6 / 8.0 us
    against gemv's 2.8 / 4.2 on the H200, benchmarks/gemv.py),
    the norm and the residual inside it (a norm that is not `layers.plain_rmsnorm`, or autograd: norm(x) first);
    otherwise the modules' own forwards."""
    x, norm = defer_norm(x, norm)
    if not _streams(x, m) or (residual is not None and residual.dtype != x.dtype):
        y = m(x if norm is None else norm(x))
        return y if residual is None else residual + y
    rows = x.reshape(-1, x.shape[-1])
    return gemv(rows, m.weight, scale_inv=getattr(m, "weight_scale_inv", None),
                norm=None if norm is None else (norm.weight, norm.eps),
                residual=None if residual is None else residual.reshape(rows.shape[0], -1)).view(*x.shape[:-1], -1)


def linear_pair(
    x: torch.Tensor, a: torch.nn.Module, b: torch.nn.Module, norm: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a(x), b(x)), or (a(norm(x)), b(norm(x))) for an RMSNorm `norm`, for two bias-free linear layers reading
    the same x, in one `gemv_pair` launch (the norm inside it) where that pays (`_streams`), else None (the
    caller runs them itself, norm included)."""
    if not _streams(x, a, b) or (norm is not None and not norm_inside(norm)):
        return None
    wa, wb = a.weight, b.weight
    sa, sb = getattr(a, "weight_scale_inv", None), getattr(b, "weight_scale_inv", None)
    n = wa.shape[0]
    if not extra_fits(Extra(wa, sa, wb, sb), wa, sa, n + wb.shape[0], split=n):  # as gemv_pair reads them
        return None
    y = gemv_pair(x.reshape(-1, x.shape[-1]), wa, wb, sa, sb, norm=None if norm is None else (norm.weight, norm.eps))
    return y[:, :n].view(*x.shape[:-1], n), y[:, n:].view(*x.shape[:-1], -1)
