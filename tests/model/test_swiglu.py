"""The experts' gated SwiGLU (`dsv3.model.swiglu`): its Triton backward against float64 autograd.

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


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,I", [(1, 1), (37, 576), (300, 100)])
def test_backward_matches_float64(N, I, dtype):
    check("cuda", N, I, dtype)


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
