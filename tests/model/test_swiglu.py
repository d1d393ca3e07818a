"""The experts' gated SwiGLU (`dsv3.model.swiglu`): the forward's two paths and the Triton backward against
float64.

`check` takes the device, so the kernel also runs in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, calling it directly).
"""

from __future__ import annotations

import pytest
import torch

from dsv3.model.swiglu import _forward, swiglu, swiglu_backward


def check(device: str, N: int, I: int, dtype: torch.dtype, block_r: int = 32, block_i: int = 64) -> None:
    """swiglu_backward against float64 autograd of the same math, on rows and columns not multiples of the
    tile: each gradient within a few roundings of its dtype (float32 math inside, one rounding at the end)."""
    torch.manual_seed(N + I)
    h = (torch.randn(N, 2 * I, device=device) * 2).to(dtype)
    s = torch.rand(N, 1, device=device) * 2.5
    dout = torch.randn(N, I, device=device).to(dtype)
    h64, s64 = h.double().requires_grad_(), s.double().requires_grad_()
    dh_want, ds_want = torch.autograd.grad(_forward(h64, s64), (h64, s64), dout.double())
    dh, ds = swiglu_backward(h, s, dout, block_r, block_i)
    assert dh.dtype == dtype and ds.dtype == torch.float32 and ds.shape == (N, 1)
    eps = torch.finfo(dtype).eps
    # one rounding of a float32 value (subnormals: their fixed spacing)
    assert ((dh.double() - dh_want).abs() <= dh_want.abs() * eps + torch.finfo(dtype).smallest_normal * eps).all()
    # a sum of I float32 terms: within float32 rounding of the sum of their magnitudes
    terms = (dout.double() * torch.nn.functional.silu(h64[:, :I].detach()) * h64[:, I:].detach()).abs().sum(1, True)
    assert ((ds.double() - ds_want).abs() <= terms * 1e-6).all()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_is_float32_math_with_or_without_autograd(dtype):
    # the no-grad path (prefill) computes in one buffer in place; both within one rounding of float64
    torch.manual_seed(1)
    h = (torch.randn(50, 2 * 24) * 2).to(dtype)
    s = torch.rand(50, 1) * 2
    want = torch.nn.functional.silu(h[:, :24].double()) * h[:, 24:].double() * s.double()
    with torch.no_grad():
        plain = swiglu(h, s)
    h.requires_grad_()
    traced = swiglu(h, s)
    assert traced.grad_fn is not None
    # float32 math (a few float32 roundings; the CPU's silu differs by an ulp between strided and contiguous
    # inputs), then one rounding to the output dtype
    bound = want.abs() * (torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps)
    for got in (plain, traced.detach()):
        assert ((got.double() - want).abs() <= bound).all()
    h0 = h.detach().clone()
    with torch.no_grad():
        swiglu(h.detach(), s)
    assert torch.equal(h.detach(), h0)  # the in-place math never writes into h (float32: no copy by .to)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,I", [(1, 1), (37, 576), (300, 100)])
def test_backward_matches_float64(N, I, dtype):
    check("cuda", N, I, dtype)


@pytest.mark.gpu
@needs_cuda
def test_strided_inputs_take_the_kernel_correctly():
    # h a column slice of a wider buffer, dout transposed, the gates a strided column: as autograd hands them
    torch.manual_seed(2)
    N, I = 40, 96
    h = torch.randn(N, 2 * I + 13, device="cuda", dtype=torch.bfloat16)[:, 5 : 5 + 2 * I].requires_grad_()
    s = (torch.rand(N, 3, device="cuda") * 2)[:, 1:2].requires_grad_()
    dout = torch.randn(I, N, device="cuda", dtype=torch.bfloat16).T
    got = torch.autograd.grad(swiglu(h, s), (h, s), dout)
    h64, s64 = h.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    want = torch.autograd.grad(_forward(h64, s64), (h64, s64), dout.double())
    for a, b in zip(got, want, strict=True):
        assert ((a.double() - b).abs() <= b.abs() * 2**-7 + 1e-5).all()


@pytest.mark.gpu
@needs_cuda
def test_autograd_takes_the_kernel_and_matches_the_plain_backward():
    torch.manual_seed(0)
    h = torch.randn(64, 2 * 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.rand(64, 1, device="cuda", requires_grad=True)
    out = swiglu(h, s)
    assert "_SwiGLU" in type(out.grad_fn).__name__
    assert torch.equal(out, _forward(h, s))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, s), dout)
    want = swiglu_backward(h.detach(), s.detach(), dout)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # compiled, the graph keeps the kernel
    compiled = torch.compile(swiglu, fullgraph=True)
    got_c = torch.autograd.grad(compiled(h, s), (h, s), dout)
    assert torch.equal(got_c[0], want[0]) and torch.equal(got_c[1], want[1])
