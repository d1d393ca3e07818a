"""The routed experts' gated SwiGLU, silu(gate) * up * g, for the grouped GEMMs' rows (training, prefill).

Each (token, expert) pair's gate value g scales its activations before the down projection, so the unsort
after it is a plain sum (`moe.Experts.forward`). The forward is a few pointwise ops that torch.compile fuses
into one pass at copy bandwidth. The backward is one Triton pass on CUDA: it reads h and the activations'
gradient once and writes d(gate), d(up) and each row's d(g) = sum_i dout_i * silu(gate_i) * up_i. Compiled,
the same backward became two passes over h (the row sum apart), ~1.26 ms a layer for `bench`'s 262K pairs on
an H200 against ~0.37 ms of bytes (benchmarks/swiglu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: autograd differentiates `_forward`
    triton = None


def _forward(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.chunk(2, dim=-1)
    if torch.is_grad_enabled() and (h.requires_grad or scale.requires_grad):
        return (F.silu(gate.to(acc)) * up.to(acc) * scale.to(acc)).to(h.dtype)
    # no autograd (prefill runs eagerly): the same float32 math in one buffer of [N, I] instead of four
    a = F.silu(gate.to(acc, copy=True), inplace=True)
    return a.mul_(up).mul_(scale).to(h.dtype)


if triton is not None:

    @triton.jit
    def _backward_kernel(h_ptr, s_ptr, do_ptr, dh_ptr, ds_ptr, N, I, stride_h, stride_do, stride_dh,
                         BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < N
        rows64 = rows.to(tl.int64)[:, None]
        scale = tl.load(s_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
        d_scale = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = (i0 + tl.arange(0, BLOCK_I))[None, :]
            m = live[:, None] & (cols < I)
            gate = tl.load(h_ptr + rows64 * stride_h + cols, mask=m, other=0.0).to(tl.float32)
            up = tl.load(h_ptr + rows64 * stride_h + I + cols, mask=m, other=0.0).to(tl.float32)
            dout = tl.load(do_ptr + rows64 * stride_do + cols, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_scale += tl.sum(dout * silu * up, axis=1)
            d = dout * scale
            out = dh_ptr + rows64 * stride_dh + cols
            tl.store(out, (d * up * sig * (1.0 + gate * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(out + I, (d * silu).to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(ds_ptr + rows, d_scale, mask=live)


# rows x columns (and warps) of one backward program: within 2.5% of the best of a sweep on the H200 (458 vs 469 us,
# 77% of copy bandwidth; benchmarks/swiglu.py)
BLOCK_R, BLOCK_I, NUM_WARPS = 32, 64, 4


def swiglu_backward(
    h: torch.Tensor, scale: torch.Tensor, dout: torch.Tensor, block_r: int = BLOCK_R, block_i: int = BLOCK_I,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d h [N, 2I] in h's dtype, d scale [N, 1] float32) of `swiglu(h, scale)` given dout [N, I]: the Triton
    pass, in float32 inside. CUDA tensors whose last dimension is contiguous."""
    N, I = dout.shape
    dh = torch.empty_like(h)
    ds = torch.empty(N, 1, dtype=torch.float32, device=h.device)
    _backward_kernel[(triton.cdiv(N, block_r),)](
        h, scale, dout, dh, ds, N, I, h.stride(0), dout.stride(0), dh.stride(0),
        BLOCK_R=block_r, BLOCK_I=block_i, num_warps=num_warps,
    )
    return dh, ds


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(h, scale)
        return _forward(h, scale)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # noqa: ANN001, ANN205 - autograd.Function signature
        h, scale = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dh, ds = swiglu_backward(h, scale.contiguous(), dout)
        return dh, ds.to(scale.dtype)


def swiglu(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * scale for the stacked experts' gate_up output h [N, 2I] (gate columns first) and each
    row's scale [N, 1], computed in float32 (float64 for float64 models), returned in h's dtype."""
    if (triton is not None and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and h.dim() == 2
            and h.stride(-1) == 1 and scale.shape == (h.shape[0], 1) and scale.dtype == torch.float32):
        return _SwiGLU.apply(h, scale)
    return _forward(h, scale)
