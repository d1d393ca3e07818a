"""128x128 block quantisation of weights to float8_e4m3fn, as the released checkpoint stores them.

A weight W [out, in] is cut into 128x128 blocks (the last row/column of blocks may be narrower when a size
is not a multiple of 128). Each block stores q = W / s in E4M3 and one float32 `scale_inv` s = amax / 448,
so W ~= q * s (SPEC 6: "real weight = fp8 value * scale_inv of its block").
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # an all-zero block gets a tiny scale instead of dividing by zero


def _expand(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """Repeat a [ceil(out/b), ceil(in/b)] block grid to the element grid [out, in]."""
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (E4M3 values [out, in], float32 scale_inv [ceil(out/block), ceil(in/block)])."""
    if w.dim() != 2:
        raise ValueError(f"block quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    ro, ri = -out_f % block, -in_f % block
    wf = torch.nn.functional.pad(w.float(), (0, ri, 0, ro))  # zero padding never raises a block's amax
    blocks = wf.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [bo, block, bi, block]
    amax = blocks.abs().amax(dim=(1, 3))
    scale = amax.clamp(min=_TINY) / E4M3_MAX
    q = (w.float() / _expand(scale, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = 128
) -> torch.Tensor:
    """E4M3 values [out, in] times their block's scale_inv -> W in `dtype` (multiplied in float32)."""
    expect = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
            f"with {block}x{block} blocks (expected {expect})"
        )
    return (q.float() * _expand(scale_inv.float(), q.shape, block)).to(dtype)
