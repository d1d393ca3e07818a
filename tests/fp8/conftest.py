"""Fixtures of the FP8 tests: the CUDA GEMM path run on the CPU through a stand-in for torch._scaled_mm.

`fake_scaled_mm` enforces what torch's ScaledBlas.cpp checks for (1x128, 128x128) blockwise scaling (operand
majorness, sizes divisible by 16, the scale tensors' shapes and strides, bfloat16 output, no fast accumulation)
plus the M % 4 padding our path promises, and computes with the float64 emulation `scaled_mm_reference`, so
the layouts and the padding/reshaping around the call are tested without a GPU.

The tiny models here gain nothing from intra-op threads (on a shared 2-core machine the hand-offs cost more
than the math), so these tests run torch on one thread, as the inference tests do.
"""

from __future__ import annotations

import math

import pytest
import torch

import dsv3.fp8.gemm as gemm
from dsv3.fp8 import scaled_mm_reference


def fake_scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    """torch._scaled_mm for (1x128, 128x128) blockwise scaling, with the layout checks of torch's
    ScaledBlas.cpp (size-1 dimensions have no stride to check) and the float64 emulation as its math."""
    m, k = a.shape
    n = b.shape[1]
    kb, nb = math.ceil(k / 128), math.ceil(n / 128)

    def stride_ok(t, dim, stride):
        return t.shape[dim] <= 1 or t.stride(dim) == stride

    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert a.is_contiguous() and b.t().is_contiguous(), "A row-major, B column-major"
    assert k % 16 == 0 and n % 16 == 0 and m % 4 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert scale_a.shape == (m, kb) and stride_ok(scale_a, 0, 1) and stride_ok(scale_a, 1, m), "1x128: M-major"
    sbt = scale_b.t()
    assert sbt.shape == (nb, kb) and stride_ok(sbt, 1, 1), "128x128 weight scales, transposed"
    assert stride_ok(sbt, 0, -(-kb // 4) * 4), "K-block stride padded to a multiple of 4 (pytorch#166752)"
    assert out_dtype == torch.bfloat16 and bias is None and not use_fast_accum
    return scaled_mm_reference(a, scale_a, b.t(), sbt).to(out_dtype)


@pytest.fixture
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Route fp8_linear's CUDA branch through `fake_scaled_mm` for bfloat16 inputs on the CPU; the returned
    list collects the (M, N, K) of every call."""
    calls: list[tuple[int, int, int]] = []

    def counted(a, b, *args, **kw):
        calls.append((a.shape[0], b.shape[1], a.shape[1]))
        return fake_scaled_mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    monkeypatch.setattr(gemm, "scaled_mm_supported",
                        lambda x, q: x.dtype == torch.bfloat16 and gemm.scaled_mm_shape_ok(*q.shape))
    return calls


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """These tests run many small ops: one thread avoids oversubscription on a busy 2-core machine."""
