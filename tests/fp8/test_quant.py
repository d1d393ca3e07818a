"""E4M3 quantisation (SPEC 2, 6): 128x128 weight blocks against float64 references computed block by block,
stacks of them (routed experts), and 1x128 activation tiles against hand-computed values and an independent
float64 model of E4M3 round-to-nearest-even."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.fp8 import E4M3_MAX, dequantize_blockwise, quantize_activation_1x128, quantize_blockwise

SHAPES = [(1, 1), (80, 200), (128, 128), (129, 257), (300, 200), (576, 300)]


def block_grid(shape, b=128):
    for i in range(math.ceil(shape[0] / b)):
        for j in range(math.ceil(shape[1] / b)):
            yield slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b), i, j


def test_e4m3_max_is_the_format_maximum():
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max == 448.0


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_scales_each_block_amax_to_448_within_e4m3_rounding(shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    # per-row magnitudes spread over 6 decades, so blocks get very different scales and many values fall
    # into E4M3's subnormal range within their block
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[0])[:, None]
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    w64, q64 = w.double(), q.double()
    for r, c, i, j in block_grid(shape):
        amax = w64[r, c].abs().max().item()
        assert s[i, j].item() == pytest.approx(amax / 448, rel=2**-23)  # one float32 division
        # E4M3 has 3 mantissa bits: round-to-nearest is within 2^-4 relative for |x| >= 2^-6 (normal) and
        # within half the subnormal step 2^-9 below; in weight units that is 2^-4 |w| + 2^-10 s. 2^-22 |w|
        # covers the float32 division w / s before the cast.
        err = (q64[r, c] * s[i, j].item() - w64[r, c]).abs()
        bound = (2**-4 + 2**-22) * w64[r, c].abs() + 2**-10 * s[i, j].item()
        assert (err <= bound).all(), (i, j)
        # the element holding the amax lands on +-448 exactly
        k = w64[r, c].abs().argmax()
        assert q64[r, c].flatten()[k].abs().item() == 448.0


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_float64_block_loop(shape):
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.exp(torch.randn(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) * 3)
    ref = torch.empty(shape, dtype=torch.float64)
    for r, c, i, j in block_grid(shape):
        ref[r, c] = q[r, c].double() * s[i, j].double()
    got = dequantize_blockwise(q, s, torch.float64)
    # the exact product needs 4 + 24 bits; it is formed in float32, one rounding: 2^-24 relative
    assert ((got - ref).abs() <= 2**-24 * ref.abs()).all()
    assert dequantize_blockwise(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_zero_block_quantises_to_zero_without_nan():
    w = torch.zeros(200, 130)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_blockwise(w)
    back = dequantize_blockwise(q, s)
    assert torch.isfinite(s).all() and torch.isfinite(back).all()
    assert not back[128:].any() and not back[:, 128:].any()


def test_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.zeros(4))
    q = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_blockwise(q, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"expected \(5, 3, 2\)"):
        dequantize_blockwise(torch.zeros(5, 300, 200).to(torch.float8_e4m3fn), torch.ones(3, 2))


def test_stacked_weights_quantise_each_matrix_on_its_own():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 200, 300, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    q, s = quantize_blockwise(w)
    assert q.shape == w.shape and s.shape == (3, 2, 3)
    for e in range(3):
        qe, se = quantize_blockwise(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
        assert torch.equal(dequantize_blockwise(q, s)[e], dequantize_blockwise(qe, se))


# ---- activations: 1x128 tiles -------------------------------------------------------------------------------

def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """E4M3 round-to-nearest-even in float64, from the format's definition: 3 mantissa bits, so the grid step in
    [2^e, 2^(e+1)) is 2^(e-3); below the smallest normal 2^-6 the subnormal step 2^-9 (|v| <= 448 assumed)."""
    a = v.abs()
    e = torch.floor(torch.log2(a)).clamp(min=-6)  # log2(0) = -inf -> -6
    step = torch.exp2(e - 3)
    return torch.sign(v) * torch.round(a / step) * step  # torch.round: ties to even; a / step is exact


def test_activation_hand_case_exact():
    # Row 0, tile 0: amax 3.5, so s = 3.5 / 448 = 2^-7 exactly and q = 128 x exactly before rounding.
    x = torch.zeros(2, 130)
    u = 2.0**-7
    row = {0: 3.5, 1: -1.0, 2: 1.3125 * u, 3: 1.4375 * u, 4: -0.01, 5: 0.005 * u, 6: 300 * u, 7: 3.4}
    want_q = {0: 448.0, 1: -128.0,
              2: 1.25,  # 1.3125 is halfway between 1.25 (mantissa 010) and 1.375 (011): ties to even
              3: 1.5,  # 1.4375 is halfway between 1.375 (011) and 1.5 (100): ties to even
              4: -1.25,  # -1.28: step 1/8 in [1, 2)
              5: 3 * 2.0**-9,  # 0.005 is subnormal in E4M3: step 2^-9, 2.56 steps -> 3
              6: 288.0,  # step 32 in [256, 448]: 300 -> 288
              7: 448.0}  # 435.2 -> 448 (nearer than 416)
    for i, v in row.items():
        x[0, i] = v
    # Row 0, tile 1 (the ragged last tile, 2 channels): amax 4e-5 < 1e-4, so the floor sets s = 1e-4 / 448.
    x[0, 128], x[0, 129] = 2e-5, -4e-5  # q = 89.6 -> 88 (step 8), -179.2 -> -176 (step 16)
    # Row 1 is all zero: both tiles get the floor scale and quantise to 0.
    q, s = quantize_activation_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 130)
    assert s.dtype == torch.float32 and s.shape == (2, 2)
    assert s[0, 0].item() == u
    floor = 1e-4 / 448
    for v in (s[0, 1], s[1, 0], s[1, 1]):
        assert v.item() == pytest.approx(floor, rel=2**-23)  # float32(1e-4) / 448 in float32
    got = q.double()
    for i, v in want_q.items():
        assert got[0, i].item() == v, i
    assert not got[0, 8:128].any() and not got[1].any()
    assert got[0, 128].item() == 88.0 and got[0, 129].item() == -176.0


@pytest.mark.parametrize("shape", [(1, 128), (3, 5, 200), (7, 300), (4, 1024)])
def test_activation_matches_float64_definition(shape):
    g = torch.Generator().manual_seed(shape[-1])
    # token magnitudes over 8 decades, some below the 1e-4 floor; one token exactly zero
    x = torch.randn(shape, generator=g) * torch.logspace(-7, 1, shape[-2])[:, None]
    x[..., 0, :] = 0
    x = x.to(torch.bfloat16)  # what the model feeds it on the GPU
    q, s = quantize_activation_1x128(x)
    kb = math.ceil(shape[-1] / 128)
    assert q.shape == x.shape and s.shape == (*shape[:-1], kb)
    x64 = x.double()
    for j in range(kb):
        tile = x64[..., j * 128:(j + 1) * 128]
        want_s = tile.abs().amax(-1).clamp(min=1e-4) / 448
        assert torch.allclose(s[..., j].double(), want_s, rtol=2**-23, atol=0)
        # q is x / s (float32 division) rounded to E4M3 with ties to even, element by element
        ratio = (tile.float() / s[..., j : j + 1]).double()
        assert torch.equal(q[..., j * 128:(j + 1) * 128].double(), round_e4m3(ratio))
        # and so within half an E4M3 step of x / s: 2^-4 relative (normal), 2^-10 s absolute (subnormal)
        err = (q[..., j * 128:(j + 1) * 128].double() * s[..., j : j + 1].double() - tile).abs()
        assert (err <= (2**-4 + 2**-22) * tile.abs() + 2**-10 * s[..., j : j + 1].double()).all()
