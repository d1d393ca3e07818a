"""GEMMs with 128x128 block-scaled E4M3 weights: y = x W^T, W = q * scale_inv per block (SPEC 2, 6).

Three kernels behind one call, `fp8_linear`:
- CUDA, at most GEMV_MAX_ROWS rows (decode): `dsv3.model.gemv` streams the E4M3 weight once, applying the
  block scales to each 128-deep float32 partial sum; the activation stays unquantised. Any K.
- CUDA, bfloat16 activations, K a multiple of 512 (`scaled_mm_shape_ok`): cuBLAS's blockwise-scaled FP8
  GEMM through `torch._scaled_mm`. x is quantised online per token per 128 channels
  (`quantize_activation_1x128`), the weight keeps its checkpoint scales; cuBLAS applies both scales to each
  128-deep partial sum and accumulates in float32 (the paper's promotion every 128 elements of K). Output
  bfloat16.
- everything else (the CPU, other dtypes, shapes cuBLAS refuses): dequantise the weight block-wise to x's
  dtype (`dequantize_blockwise`, one float32 product per element) and a normal matmul. Activations are not
  quantised there, so on the CPU an FP8-kept model computes exactly what the same checkpoint dequantised at
  load computes.

`scaled_mm_reference` is the float64 emulation of the CUDA kernel (quantised activation times quantised
weight, both scales applied per 128-deep block of K), against which tests hold it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.quant import dequantize_blockwise, quantize_activation_1x128
from dsv3.model.gemv import GEMV_MAX_ROWS, gemv, gemv_supported

BLOCK = 128


def scaled_mm_shape_ok(n: int, k: int) -> bool:
    """Whether cuBLAS's block-scaled GEMM takes a weight [N, K]: torch._scaled_mm wants K and N multiples of
    16 and 1x128 tiles whole (K a multiple of 128), and cuBLAS reads the weight scales with their K-block
    stride padded to a multiple of 4 (pytorch#166752, torch >= 2.10, checks it; earlier versions silently
    computed garbage without it). With K a multiple of 512 the plain [ceil(N/128), K/128] scale tensor is
    that layout in every version. All of V3's GEMMs qualify (K in 512, 1536, 2048, 7168, 16384, 18432)."""
    return k % (4 * BLOCK) == 0 and n % 16 == 0


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether `fp8_linear` runs x [..., K] times the E4M3 weight q [N, K] on cuBLAS: CUDA, bfloat16 (the
    only output dtype of its non-tensorwise scaling, and the serving dtype), and a shape it takes."""
    return x.is_cuda and x.dtype == torch.bfloat16 and scaled_mm_shape_ok(*q.shape)


def scaled_mm_blockwise(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16, CUDA) times (q * scale_inv)^T with q [N, K] E4M3 and scale_inv [ceil(N/128), K/128]
    float32 -> [M, N] bfloat16, via torch._scaled_mm with 1x128 activation and 128x128 weight scales.

    Layouts cuBLAS wants (shared/HARDWARE.md; torch's ScaledBlas.cpp checks): mat2 column-major (q.t() of
    the row-major weight); scale_a [M, K/128] M-major (stride (1, M)); scale_b the weight scales
    transposed, [K/128, ceil(N/128)]. M is padded with zero rows to a multiple of 4: cuBLAS's M-major scale
    rows then stay 16-byte aligned, and a single row (M=1, decode) cannot be mistaken for a 128x128 scale
    grid of one block by torch's scaling-type detection.
    """
    m = x.shape[0]
    if m % 4:
        x = F.pad(x, (0, 0, 0, -m % 4))
    xq, xs = quantize_activation_1x128(x)
    y = torch._scaled_mm(
        xq, q.t(), scale_a=xs.t().contiguous().t(), scale_b=scale_inv.t(), out_dtype=torch.bfloat16,
    )
    return y[:m]


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T with W [N, K] = q * scale_inv block-wise; the result has x's dtype and device."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= GEMV_MAX_ROWS and gemv_supported(x, q):
        return gemv(rows, q, scale_inv=scale_inv).view(*x.shape[:-1], q.shape[0])
    if scaled_mm_supported(x, q):
        return scaled_mm_blockwise(rows, q, scale_inv).view(*x.shape[:-1], q.shape[0])
    return F.linear(x, dequantize_blockwise(q, scale_inv, x.dtype))


def scaled_mm_reference(
    xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor
) -> torch.Tensor:
    """The blockwise GEMM in float64: y[m, n] = sum_j xs[m, j] * s[n // 128, j] * sum_{k in block j}
    xq[m, k] q[n, k] for xq [M, K], xs [M, ceil(K/128)], q [N, K], scale_inv [ceil(N/128), ceil(K/128)].
    Every product of two E4M3 values and each partial sum is exact in float64 (4 + 4 significant bits, at most
    128 terms), so this is the kernel's math without its float32 rounding."""
    m, k = xq.shape
    n = q.shape[0]
    kb = -(-k // BLOCK)
    xb = F.pad(xq.double(), (0, -k % BLOCK)).view(m, kb, BLOCK)
    qb = F.pad(q.double(), (0, -k % BLOCK)).view(n, kb, BLOCK)
    partial = torch.einsum("mjk,njk->mnj", xb, qb)  # [M, N, K-blocks]
    sw = scale_inv.double().repeat_interleave(BLOCK, 0)[:n]  # [N, K-blocks]
    return (partial * xs.double()[:, None, :] * sw[None, :, :]).sum(-1)
