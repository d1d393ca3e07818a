"""Decode's expert-grouped Triton GEMM (dsv3.model.expert_gemm) against float64: each chosen expert's rows found in
the top-k indices, in turns of BLOCK_M rows, the shared expert's program rows, the SwiGLU input of the down
projection, E4M3 weights with 128x128 block scales on gate_up's two grids (tiles straddling the halves, an E4M3
shared expert), ragged shapes, the largest expert (every token on it) and its checks. CUDA only; `Experts`' use
of it: tests/model/test_gemv.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.fp8 import dequantize_blockwise, quantize_blockwise
from dsv3.model.expert_gemm import EXPERT_GEMM_MAX_TOKENS, expert_gemm, expert_gemm_supported
from dsv3.model.gemv import Extra
from tests.model.test_gemv import float64_products, within_output_rounding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def routing(T: int, E: int, K: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])


def pair_weights(idx: torch.Tensor, stack: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """[T*K (+ T), N, d] in float64: each output row's matrix (pair t*K + k: stack[idx[t, k]]; then the shared)."""
    w = stack.double()[idx.flatten()]
    return w if shared is None else torch.cat([w, shared.double().expand(idx.shape[0], -1, -1)])


# tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): at 64 tokens 16-row tiles take an expert's rows in turns
TILES = [None, (16, 32, 32, 4, 2), (32, 128, 64, 8, 3), (64, 16, 128, 4, 3)]
CASES = ([(torch.bfloat16, T, tiles) for T in (1, 5, 16, 33, 64) for tiles in TILES]
         + [(dtype, T, tiles) for dtype in (torch.float16, torch.float32) for T in (5, 64) for tiles in TILES[:2]])


@pytest.mark.parametrize("dtype,T,tiles", CASES)
def test_gate_up_and_swiglu_down_match_float64(dtype, T, tiles):
    g = torch.Generator().manual_seed(T)
    E, K, inter, d = 7, 3, 100, 333  # N = 2 * inter and d off every tile size; tiles straddle the halves
    gate_up = torch.randn(E, 2 * inter, d, generator=g).to(dtype)
    down = torch.randn(E, d, inter, generator=g).to(dtype)
    sg, su, sd = (torch.randn(*s, generator=g).to(dtype) for s in ((inter, d), (inter, d), (d, inter)))
    x = torch.randn(T, d, generator=g).to(dtype)
    idx = routing(T, E, K, g)
    got = expert_gemm(x.cuda(), gate_up.cuda(), idx.cuda(), split=inter, extra=Extra(sg.cuda(), None, su.cuda()),
                      tiles=tiles)
    w = pair_weights(idx, gate_up, torch.cat([sg, su]))
    rows = torch.cat([x.double().repeat_interleave(K, 0), x.double()])
    ref, absum = float64_products(w, rows)
    assert got.shape == (T * K + T, 2 * inter) and got.dtype == dtype
    assert within_output_rounding(got, ref, absum, dtype)

    h = torch.randn(T * K + T, 2 * inter, generator=g).to(dtype)
    got = expert_gemm(h.cuda(), down.cuda(), idx.cuda(), swiglu=True, extra=Extra(sd.cuda()), tiles=tiles)
    # the SwiGLU is rounded to the activations' dtype before the product, as `swiglu` rounds it
    a = (F.silu(h[:, :inter].double()) * h[:, inter:].double()).to(dtype).double()
    w = pair_weights(idx, down, sd)
    assert within_output_rounding(got, *float64_products(w, a), dtype)


def test_every_token_on_one_expert_and_experts_nobody_chose():
    # expert 0 takes all 64 tokens (four turns of 16 rows), expert 1 every other one, experts 3.. none (their
    # programs read nothing)
    g = torch.Generator().manual_seed(1)
    T, E, K, N, d = EXPERT_GEMM_MAX_TOKENS, 9, 2, 64, 256
    w = torch.randn(E, N, d, generator=g).to(torch.bfloat16)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.zeros(T, dtype=torch.long), 1 + torch.arange(T) % 2], 1)
    got = expert_gemm(x.cuda(), w.cuda(), idx.cuda())
    wp = pair_weights(idx, w, None)
    rows = x.double().repeat_interleave(K, 0)
    assert within_output_rounding(got, *float64_products(wp, rows), torch.bfloat16)


def within_fp8_mma(got: torch.Tensor, ref: torch.Tensor, absum: torch.Tensor, dtype: torch.dtype) -> bool:
    """E4M3 weights with bf16 rows multiply E4M3 x E4M3 (the rows split exactly in two terms): the products are
    exact, but the FP8 MMA keeps 14 significant bits of its sums (DeepSeek-V3 3.3.2). How often it rounds is not
    documented; this bound assumes at most once per 8 products: a K step of at most 128 rounds 16 times, each
    off by at most 2^-13 of a partial sum no larger than the step's |w||hi| sum (about 17/16 of its |w||a|),
    lo's MMA adding 1/16 of that again, so |got - ref| <= 18 * 2^-13 * absum on top of the output's rounding.
    Measured on the H200 (`bench` and these shapes): at most 2^-13.7, ~30x inside it."""
    if dtype != torch.bfloat16:  # float16 / float32 rows widen the weights instead: exact products, float32 sums
        return within_output_rounding(got, ref, absum, dtype)
    return bool(((got.double().cpu() - ref).abs() <= 2.0**-7 * ref.abs() + 18 * 2.0**-13 * absum).all())


@pytest.mark.parametrize("tiles", [None, (16, 64, 32, 4, 3), (32, 32, 128, 4, 2)])
@pytest.mark.parametrize("T,dtype", [(5, torch.bfloat16), (11, torch.bfloat16), (64, torch.bfloat16),
                                     (33, torch.float32)])
def test_e4m3_block_scales_match_float64_on_two_grids(T, dtype, tiles):
    # gate_up of I = 200 rows per half: the up half's block rows start at ceil(200/128) = 2, and a 64-row tile
    # holds gate rows 192-199 and up rows 200-255 (each row its own scale); an E4M3 shared expert with its own
    # grid per half (its scales swapped would fail); then down [E, d, I] with K = 200. 33 and 64 tokens take
    # an expert's rows in turns
    g = torch.Generator().manual_seed(2)
    E, inter, d, K = 5, 200, 384, 2

    def quantised(*shape: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, s = quantize_blockwise(torch.randn(*shape, generator=g) * torch.rand(shape[-2], 1, generator=g) * 4)
        return q, s, dequantize_blockwise(q, s, torch.float64)

    (qg, sg, wg), (qu, su, wu) = quantised(E, inter, d), quantised(E, inter, d)
    (qsg, ssg, wsg), (qsu, ssu, wsu) = quantised(inter, d), quantised(inter, d)
    q, s, wd = torch.cat([qg, qu], 1), torch.cat([sg, su], 1), torch.cat([wg, wu], 1)
    x = torch.randn(T, d, generator=g).to(dtype)
    idx = routing(T, E, K, g)
    got = expert_gemm(x.cuda(), q.cuda(), idx.cuda(), s.cuda(), split=inter, tiles=tiles,
                      extra=Extra(qsg.cuda(), ssg.cuda(), qsu.cuda(), ssu.cuda()))
    w = torch.cat([wd[idx.flatten()], torch.cat([wsg, wsu]).expand(T, -1, -1)])
    rows = torch.cat([x.double().repeat_interleave(K, 0), x.double()])
    ref, absum = float64_products(w, rows)
    assert within_fp8_mma(got, ref, absum, dtype)
    wrong = torch.einsum("pnk,pk->pn", dequantize_blockwise(q, s[:, :4], torch.float64)[idx.flatten()],
                         rows[: T * K])
    assert not torch.allclose(wrong, ref[: T * K])  # the case tells the two grids apart

    (qd, sdn, wdn), (qsd, ssd, wsd) = quantised(E, d, inter), quantised(d, inter)
    h = torch.randn(T * K + T, 2 * inter, generator=g).to(dtype)
    got = expert_gemm(h.cuda(), qd.cuda(), idx.cuda(), sdn.cuda(), swiglu=True, tiles=tiles,
                      extra=Extra(qsd.cuda(), ssd.cuda()))
    a = (F.silu(h[:, :inter].double()) * h[:, inter:].double()).to(dtype).double()
    w = torch.cat([wdn[idx.flatten()], wsd.expand(T, -1, -1)])
    assert within_fp8_mma(got, *float64_products(w, a), dtype)


@pytest.mark.parametrize("tiles", [None, (16, 64, 32, 4, 3)])
def test_e4m3_split_of_bf16_rows_is_exact(tiles):
    # one product per output (E4M3 permutation weights, power-of-two block scales): the MMA sums nothing, so the
    # output is its input value scaled, bit for bit, wherever splitting the bf16 row into hi + lo / 16 is exact.
    # Rows of every bf16 significand from 2^-12 to 2 (all within 2^-13 of the largest); one near bf16's least
    # normal, one near its largest; one all zero; one with values far below a largest just above a power of two
    # (kept down to 2^-21 of it); one holding inf (NaN outputs, never finite wrong ones)
    g = torch.Generator().manual_seed(5)
    T, E, K, d = 8, 3, 2, 256
    perm = torch.stack([torch.randperm(d, generator=g) for _ in range(E)])
    ones = torch.zeros(E, d, d).scatter_(2, perm[:, :, None], 1.0)
    scales = 2.0 ** torch.randint(-3, 1, (E, 2, 2), generator=g).float()
    mant = 1 + torch.randint(0, 128, (T, d), generator=g) / 128
    x = (torch.randint(0, 2, (T, d), generator=g) * 2 - 1) * mant * 2.0 ** torch.randint(-12, 1, (T, d), generator=g)
    x[1] *= 2.0**-106  # outputs stay normal bf16 after scales down to 2^-3
    x[2] = 0
    x[3, :8] = torch.tensor([3e-9, -1e-12, 2.0**-30, 0, 5e-8, -7e-6, 1.0, (1 + 2.0**-7) * 2.0**20])
    x[4] *= 2.0**127
    x[5, 7] = float("inf")
    x = x.to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    q = ones.to(torch.float8_e4m3fn)
    got = expert_gemm(x.cuda(), q.cuda(), idx.cuda(), scales.cuda(), tiles=tiles).cpu().double()
    assert got[5 * K: 6 * K].isnan().all()
    finite = torch.arange(T * K) // K != 5
    got, rows = got[finite], x.double().repeat_interleave(K, 0)[finite]
    src = torch.einsum("pnk,pk->pn", ones.double()[idx.flatten()[finite]], rows)  # each output's input value
    scale = dequantize_blockwise(q, scales, torch.float64)[idx.flatten()[finite]].amax(-1)
    big = rows.abs().amax(1, keepdim=True)
    exact = src.abs() >= 2.0**-13 * big
    assert exact.sum() > 0.8 * exact.numel() and (~exact).sum() > 0
    assert torch.equal(got[exact], (src * scale)[exact])
    assert ((got - src * scale).abs() <= 2.0**-21 * big * scale).all()


def test_checks():
    w = torch.zeros(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1]], device="cuda")
    x = torch.zeros(1, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        expert_gemm(torch.zeros(2, 32, device="cuda", dtype=torch.bfloat16), w, idx)  # 2 rows, 1 token
    with pytest.raises(ValueError, match="do not fit"):
        expert_gemm(x, w, idx, swiglu=True)  # down reads [T*K, 2 * d_in]
    with pytest.raises(ValueError, match="at most"):
        expert_gemm(torch.zeros(65, 32, device="cuda", dtype=torch.bfloat16), w,
                    torch.zeros(65, 2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="block grid"):
        expert_gemm(x, w.to(torch.float8_e4m3fn), idx, torch.ones(4, 1, 2, device="cuda"))
    with pytest.raises(ValueError, match="narrow"):
        expert_gemm(x, w.float(), idx)
    with pytest.raises(ValueError, match="int32 or int64"):
        expert_gemm(x, w, idx.float())
    with pytest.raises(ValueError, match="extra"):
        expert_gemm(x, w, idx, extra=Extra(torch.zeros(64, 16, device="cuda", dtype=torch.bfloat16)))
    # dot needs 16+, powers of two, K steps inside a scale block
    for tiles in [(8, 64, 64, 4, 2), (16, 64, 256, 4, 2), (16, 48, 64, 4, 2), (24, 64, 64, 4, 2)]:
        with pytest.raises(ValueError, match="tiles"):
            expert_gemm(x, w, idx, tiles=tiles)
    assert expert_gemm_supported(x, w)
    assert not expert_gemm_supported(x, w.float())  # tl.dot would narrow the weight to x's bf16
    assert not expert_gemm_supported(torch.zeros(65, 32, device="cuda", dtype=torch.bfloat16), w)
    assert not expert_gemm_supported(x.cpu(), w.cpu())
    assert not expert_gemm_supported(x.requires_grad_(), w)
