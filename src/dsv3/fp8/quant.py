"""FP8 E4M3 block quantisation (paper §3.3; SPEC 2 and 6): weights per 128x128 block, activations per 1x128 tile.

A weight W [..., out, in] is cut into 128x128 blocks (the last row/column of blocks may be narrower when a
size is not a multiple of 128). Each block stores q = W / s in E4M3 and one float32 `scale_inv`
s = amax / 448, so W ~= q * s (SPEC 6: "real weight = fp8 value * scale_inv of its block"). Leading
dimensions are independent matrices (stacked experts [E, out, in] with scales [E, ceil(out/128), ceil(in/128)]).

An activation x [..., K] is quantised online per token per 128 channels with s = max(amax, 1e-4) / 448 and
no rounding of s (SPEC 2, FP8 inference of V3). Both casts are torch's float32 -> float8_e4m3fn conversion
(round to nearest even), the same on the CPU and the GPU, so a CPU emulation rounds exactly like the GPU.
The scale's division by 448 runs in float64 and is rounded once to float32 (`_scale`): CUDA turns a float32
division by a constant into a multiplication by its float32 reciprocal (eagerly for a Python number,
inductor for any constant), one ulp off in some scales, which moved exact ties of x / s (124 between E4M3's
120 and 128) to the other neighbour. A float64 quotient, even through a reciprocal, rounds to the correctly
rounded float32 one (amax / 448 = amax / 7 / 64 is never near a float32 rounding midpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # an all-zero weight block gets a tiny scale instead of dividing by zero
ACT_AMAX_FLOOR = 1e-4  # DeepSeek's activation quantiser: an all-zero tile gets scale 1e-4 / 448


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 correctly rounded in float32 on every device, compiled or not (see the module docstring)."""
    return (amax.double() / E4M3_MAX).float()


def _pad(t: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """Zero padding (which never raises a block's amax), without a copy when there is none to add."""
    return F.pad(t, pad) if any(pad) else t


def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """[..., R, C] -> zero-padded float32 blocks [..., ceil(R/b), b, ceil(C/b), b]."""
    r, c = t.shape[-2:]
    tf = _pad(t.float(), (0, -c % block, 0, -r % block))
    return tf.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))


def _unblock(b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_blocks`: [..., R', b, C', b] -> [..., R, C] (the padding cut off)."""
    return b.flatten(-2, -1).flatten(-3, -2)[..., : shape[-2], : shape[-1]]


def quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (E4M3 values [..., out, in], float32 scale_inv [..., ceil(out/block), ceil(in/block)])."""
    if w.dim() < 2:
        raise ValueError(f"block quantisation takes a 2-D weight (or a stack of them), got shape {tuple(w.shape)}")
    blocks = _blocks(w, block)  # [..., bo, block, bi, block]
    scale = _scale(blocks.abs().amax(dim=(-3, -1)).clamp(min=_TINY))  # [..., bo, bi]
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return _unblock(q, w.shape).to(torch.float8_e4m3fn), scale


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = 128
) -> torch.Tensor:
    """E4M3 values [..., out, in] times their block's scale_inv -> W in `dtype` (multiplied in float32, one
    rounding to `dtype` after: the same numbers whatever the device)."""
    expect = (*q.shape[:-2], -(-q.shape[-2] // block), -(-q.shape[-1] // block))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
            f"with {block}x{block} blocks (expected {expect})"
        )
    w = _blocks(q, block) * scale_inv.float()[..., :, None, :, None]
    return _unblock(w, q.shape).to(dtype)


def quantize_activation_1x128(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 values [..., K], float32 scales [..., ceil(K/block)]) with x ~= q * s per tile.

    s = max(amax, 1e-4) / 448 over each token's tile of `block` channels (the last tile narrower when K is
    not a multiple of it); q = x / s in float32, cast to E4M3 with round-to-nearest-even.
    """
    k = x.shape[-1]
    tiles = _pad(x.float(), (0, -k % block)).unflatten(-1, (-1, block))  # [..., ceil(K/b), b]
    scale = _scale(tiles.abs().amax(dim=-1).clamp(min=ACT_AMAX_FLOOR))
    q = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).flatten(-2)[..., :k]
    return q.to(torch.float8_e4m3fn), scale
