"""Few-row GEMMs that read each weight byte once at memory speed: decode's routed experts and FP8 linears.

At decode a MoE layer multiplies T*K (token, expert) pairs, one row each, by K of E experts. Both general
kernels waste the step there: grouped_mm tiles every expert's segment for 64+ rows (~19 us a call for 8 rows of
the `bench` experts on an H200, ~4x the time their bytes take), and cuBLAS's blockwise FP8 GEMM needs K a
multiple of 512, so FP8 weights otherwise get dequantised to bf16 every step (three times the bytes). `gemv`
is one Triton kernel for both: program (p, n-tile) streams the [BLOCK_N, K] slab of weight `idx[p]` once,
multiplies it by its activation row in float32, and applies FP8's 128x128 block scales per 128-deep partial
sum (the paper's promotion interval), so the activation is never quantised (more exact than the GEMM path).
With `swiglu=True` the activation is silu(h[:, :I]) * h[:, I:] of the gate_up output, computed as it is
loaded: the down projection never materialises the hidden activation.

CUDA only (Triton); callers keep their own path elsewhere (`gemv_supported`). Not differentiable: decode only.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers' general paths run
    triton = None

BLOCK = 128  # FP8 scale block, and the kernel's K step


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
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, idx_ptr, y_ptr,
        N, K, ROWS_PER_X, SPLIT, SPLIT_BLOCKS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
        HAS_IDX: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
        ACC2D: tl.constexpr,
    ):
        p = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_base = w_ptr
        if HAS_IDX:
            e = tl.load(idx_ptr + p).to(tl.int64)
            w_base += e * stride_we
        x_row = x_ptr + (p // ROWS_PER_X).to(tl.int64) * stride_xm
        w_rows = w_base + offs_n[:, None].to(tl.int64) * stride_wn
        if HAS_SCALE:  # rows past SPLIT (gate_up's up half) have their own block grid after SPLIT_BLOCKS rows
            s_row = tl.where(offs_n < SPLIT, offs_n // 128, SPLIT_BLOCKS + (offs_n - SPLIT) // 128)
            s_base = s_ptr
            if HAS_IDX:
                s_base += e * stride_se
            s_rows = s_base + s_row * stride_sn
        # ACC2D: elementwise products summed over K, one cross-lane sum at the end. A sum per 128-deep step
        # left the kernel latency-bound: 1.5-2x slower for the linears, 1.2-1.4x for gate_up (weights read
        # from HBM, benchmarks/gemv.py). The SwiGLU-on-load variant keeps it: ~2x slower with ACC2D in a sweep.
        if ACC2D:
            acc = tl.zeros([BLOCK_N, 128], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, 128):
            offs_k = k0 + tl.arange(0, 128)
            k_ok = offs_k < K
            if SWIGLU:
                g = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_row + K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                a = g * tl.sigmoid(g) * u
            else:
                a = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if ACC2D:
                if HAS_SCALE:
                    w = w * tl.load(s_rows + k0 // 128, mask=n_ok, other=0.0)[:, None]
                acc += w * a[None, :]
            else:
                part = tl.sum(w * a[None, :], axis=1)
                if HAS_SCALE:
                    part = part * tl.load(s_rows + k0 // 128, mask=n_ok, other=0.0)
                acc += part
        if ACC2D:
            y = tl.sum(acc, axis=1)
        else:
            y = acc
        tl.store(y_ptr + p.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None = None, scale_inv: torch.Tensor | None = None,
    rows_per_x: int = 1, swiglu: bool = False, split: int | None = None,
) -> torch.Tensor:
    """y[p] = W_p a_p for p < P, in x's dtype (float32 accumulation).

    - w: one weight [N, K] (then `idx` is None and P = x's rows) or a stack [E, N, K] with `idx` [P] naming
      each row's weight; E4M3 weights take `scale_inv` ([ceil(N/128), ceil(K/128)] or [E, ...]).
    - a_p = x[p // rows_per_x] (rows_per_x = K of top-K: each token's row serves its K pairs), or with
      `swiglu` silu(x[p, :K]) * x[p, K:] for x [P, 2K].
    - split: gate_up stacks two matrices of `split` rows each quantised on its own grid (the second's block
      rows start after ceil(split/128)); default: one grid.
    """
    if idx is None:
        if rows_per_x != 1:
            raise ValueError("gemv: rows_per_x needs idx (one weight per pair)")
        P = x.shape[0]
        w3, s3 = w.unsqueeze(0), None if scale_inv is None else scale_inv.unsqueeze(0)
    else:
        P, w3, s3, idx = idx.numel(), w, scale_inv, idx.reshape(-1).contiguous()
    _, N, K = w3.shape
    if x.dim() != 2 or x.shape[1] != (2 * K if swiglu else K) or x.shape[0] * rows_per_x != P:
        raise ValueError(f"gemv: activations {tuple(x.shape)} do not fit the weight {tuple(w.shape)} for {P} rows "
                         f"(x is [P / rows_per_x, {'2K' if swiglu else 'K'}])")
    grid_rows = -(-N // BLOCK) if split is None else 2 * -(-split // BLOCK)
    if s3 is not None and tuple(s3.shape[1:]) != (grid_rows, -(-K // BLOCK)):
        raise ValueError(f"gemv: scale_inv {tuple(scale_inv.shape)} is not the 128x128 block grid of {tuple(w.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w3 = w3 if w3.stride(-1) == 1 else w3.contiguous()
    s3 = None if s3 is None else s3.contiguous()
    y = torch.empty(P, N, dtype=x.dtype, device=x.device)
    if P == 0:
        return y
    split = N if split is None else split
    block_n = 16 if N * P >= 16 * 132 * 4 else 8  # enough programs to keep every SM streaming
    _gemv_kernel[(P, triton.cdiv(N, block_n))](
        x, w3, s3 if s3 is not None else w3, idx if idx is not None else x, y,
        N, K, rows_per_x, split, triton.cdiv(split, BLOCK),
        x.stride(0), w3.stride(0), w3.stride(1),
        s3.stride(0) if s3 is not None else 0, s3.stride(1) if s3 is not None else 0, y.stride(0),
        HAS_IDX=idx is not None, HAS_SCALE=s3 is not None, SWIGLU=swiglu, BLOCK_N=block_n,
        ACC2D=not swiglu, num_warps=4 if swiglu else 8,  # the fastest of a sweep on the H200 (benchmarks/gemv.py)
    )
    return y
