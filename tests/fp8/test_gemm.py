"""The blockwise FP8 GEMM (SPEC 2): its float64 emulation against the exact product with a bound derived from
E4M3's 3 mantissa bits, the CPU path (dequantise + matmul) exactly, the CUDA path's plumbing on the CPU
against a stand-in that enforces torch._scaled_mm's blockwise layout checks, and (marked gpu) cuBLAS itself
against the emulation, the CPU path and float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dsv3.fp8.gemm as gemm
from dsv3.fp8 import (
    dequantize_blockwise,
    fp8_linear,
    quantize_activation_1x128,
    quantize_blockwise,
    scaled_mm_reference,
)

# (M, N, K): ragged N and K (last blocks narrower), a single token (decode), K a multiple of 512
SHAPES = [(5, 80, 200), (1, 300, 512), (16, 208, 1024), (3, 128, 130)]


def operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] with token magnitudes over 4 decades, W [N, K] with row magnitudes over 3 (so 1x128 tiles and
    128x128 blocks get very different scales), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, m, dtype=torch.float64)[:, None]
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, n, dtype=torch.float64)[:, None]
    return x, w


def quant_error(v: torch.Tensor, s_elem: torch.Tensor) -> torch.Tensor:
    """Largest |E4M3 value * s - v| per element: half a step, 2^-4 |v| in the normal range, 2^-10 s (half the
    subnormal step 2^-9, in units of s) below it, plus 2^-22 |v| for the float32 division v / s."""
    return (2**-4 + 2**-22) * v.abs() + 2**-10 * s_elem


def expand(s: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    return s.double().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_blockwise_gemm_within_e4m3_bound_of_float64(shape):
    m, n, k = shape
    x, w = operands(m, n, k)
    xq, xs = quantize_activation_1x128(x.float())
    q, s = quantize_blockwise(w.float())
    got = scaled_mm_reference(xq, xs, q, s)
    # the block sums are a reordering of the product of the operands dequantised in float64
    x_hat = xq.double() * expand(xs, m, k, 1, 128)
    w_hat = q.double() * expand(s, n, k, 128, 128)
    assert ((got - x_hat @ w_hat.T).abs() <= 1e-13 * (x_hat.abs() @ w_hat.abs().T)).all()
    # |x^ w^ - x w| <= ex |w| + |x| ew + ex ew per term, summed over K (float64's own rounding: 1e-12 of it)
    ex = quant_error(x.float().double(), expand(xs, m, k, 1, 128))
    ew = quant_error(w.float().double(), expand(s, n, k, 128, 128))
    x32, w32 = x.float().double(), w.float().double()  # the inputs as quantised (float32)
    bound = ex @ w32.abs().T + x32.abs() @ ew.T + ex @ ew.T
    exact = x32 @ w32.T
    assert ((got - exact).abs() <= bound * (1 + 1e-9) + 1e-12 * (x32.abs() @ w32.abs().T)).all()
    # a meaningful bound: errors of random sign stay well inside it, and FP8 did round
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 2**-10 < rel < 2**-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_path_is_dequantise_then_matmul(shape, dtype):
    m, n, k = shape
    x, w = operands(m, n, k)
    q, s = quantize_blockwise(w)
    x = x.to(dtype).view(1, m, k)
    got = fp8_linear(x, q, s)
    assert got.dtype == dtype and got.shape == (1, m, n)
    assert torch.equal(got, F.linear(x, dequantize_blockwise(q, s, dtype)))


def test_shapes_cublas_takes():
    assert gemm.scaled_mm_shape_ok(576, 7168)  # V3's kv_a_proj_with_mqa: ragged N is fine
    assert gemm.scaled_mm_shape_ok(32768, 512)  # kv_b_proj
    assert not gemm.scaled_mm_shape_ok(128, 384)  # 3 K-blocks: the scale stride would need padding to 4
    assert not gemm.scaled_mm_shape_ok(128, 200)  # ragged K
    assert not gemm.scaled_mm_shape_ok(72, 512)  # N not a multiple of 16
    x = torch.zeros(2, 512, dtype=torch.bfloat16)
    assert not gemm.scaled_mm_supported(x, torch.zeros(128, 512, dtype=torch.float8_e4m3fn))  # CPU


# ---- the CUDA path's plumbing, on the CPU (the `emulated_cuda` fixture of conftest.py) ---------------------

@pytest.mark.parametrize("lead", [(1,), (2, 3), (1, 5), (4, 16)])
@pytest.mark.parametrize("n", [80, 576])
def test_cuda_path_layouts_and_padding(emulated_cuda, lead, n):
    k = 1024
    m = math.prod(lead)
    x, w = operands(m, n, k, seed=m)
    q, s = quantize_blockwise(w)
    xb = x.to(torch.bfloat16)
    got = fp8_linear(xb.view(*lead, k), q, s)
    assert got.shape == (*lead, n) and got.dtype == torch.bfloat16
    assert emulated_cuda == [(-(-m // 4) * 4, n, k)]  # one cuBLAS call, tokens padded to a multiple of 4
    xq, xs = quantize_activation_1x128(xb)
    assert torch.equal(got.view(m, n), scaled_mm_reference(xq, xs, q, s).to(torch.bfloat16))


# ---- cuBLAS itself ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_cuda_activation_quantisation_is_bitwise_the_cpu_one():
    x, _ = operands(64, 16, 1000)
    x = x.to(torch.bfloat16)
    q, s = quantize_activation_1x128(x)
    qc, sc = quantize_activation_1x128(x.cuda())
    assert torch.equal(qc.cpu().view(torch.uint8), q.view(torch.uint8)) and torch.equal(sc.cpu(), s)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", [(1, 576, 7168), (5, 80, 512), (64, 1024, 1536), (256, 32768, 512),
                                   (37, 208, 2048)])
def test_cuda_scaled_mm_matches_emulation_cpu_path_and_float64(shape):
    m, n, k = shape
    x, w = operands(m, n, k)
    q, s = quantize_blockwise(w)
    xb = x.to(torch.bfloat16)
    assert gemm.scaled_mm_supported(xb.cuda(), q)
    got = gemm.scaled_mm_blockwise(xb.cuda(), q.cuda(), s.cuda()).cpu().double()  # the kernel at every M
    # 1. the same quantised operands in float64: cuBLAS adds only float32 accumulation (promoted every 128 of
    # K) and the bfloat16 output rounding, 2^-9 relative (HARDWARE.md measured 1.7e-3 relative overall)
    xq, xs = quantize_activation_1x128(xb)
    ref = scaled_mm_reference(xq, xs, q, s)
    mag = xq.double().abs() * xs.double().repeat_interleave(128, 1)[:, :k]
    absum = mag @ dequantize_blockwise(q, s, torch.float64).abs().T
    assert ((got - ref).abs() <= 2**-8 * ref.abs() + 2**-12 * absum).all()
    assert ((got - ref).norm() / ref.norm()).item() < 4e-3
    # 2. the CPU path (weights dequantised, activations not quantised): apart by the activations' E4M3
    # rounding, at most 2^-4 relative per element and random in sign
    cpu = fp8_linear(xb.double(), q, s)
    assert ((got - cpu).norm() / cpu.norm()).item() < 2**-4
    # 3. float64 of the unquantised operands: both E4M3 roundings (the CPU-side bound above) plus bf16
    x32, w32 = xb.double(), w.float().double()
    ex = quant_error(x32, xs.double().repeat_interleave(128, 1)[:, :k])
    ew = quant_error(w32, expand(s, n, k, 128, 128))
    bound = ex @ w32.abs().T + x32.abs() @ ew.T + ex @ ew.T
    exact = x32 @ w32.T
    assert ((got - exact).abs() <= bound + 2**-8 * exact.abs() + 2**-12 * absum).all()


@pytest.mark.gpu
@cuda
def test_cuda_shapes_cublas_refuses_fall_back_to_dequantise():
    for n, k in [(128, 384), (80, 200)]:
        x, w = operands(gemm.GEMV_MAX_ROWS + 1, n, k)
        q, s = quantize_blockwise(w)
        xb = x.to(torch.bfloat16).cuda()
        assert not gemm.scaled_mm_supported(xb, q)
        got = fp8_linear(xb, q.cuda(), s.cuda())
        assert torch.equal(got, F.linear(xb, dequantize_blockwise(q.cuda(), s.cuda(), torch.bfloat16)))
