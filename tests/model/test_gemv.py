"""The few-row Triton GEMV (dsv3.model.gemv) against float64: stacked experts picked per row, the fused SwiGLU
input, E4M3 weights with 128x128 block scales (ragged shapes, gate_up's two grids), and the model paths that
take it (decode's routed experts, FP8 linears of <= GEMV_MAX_ROWS rows). CUDA only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.fp8 import dequantize_blockwise, gemm, quantize_blockwise
from dsv3.model.gemv import Extra, gemv, gemv_pair, gemv_supported, linear, linear_pair
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Experts, RouterOutput
from tests.conftest import tiny_config
from tests.model.test_moe import experts_reference, record_few_pairs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def within_output_rounding(got: torch.Tensor, ref: torch.Tensor, absum: torch.Tensor, dtype: torch.dtype) -> bool:
    """|got - ref| <= one ulp of the output dtype (RNE is half of it; the float32 sum adds <= K 2^-24 absum)."""
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}[dtype]
    return bool(((got.double().cpu() - ref).abs() <= ulp * ref.abs() + 2.0**-14 * absum + 1e-30).all())


def float64_products(w: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref, absum) for output rows p of matrices w [P, N, K] times rows [P, K], float64: sum_k w[p, n, k] rows[p, k]
    and the same sum of magnitudes, the scale of the float32 sums' rounding."""
    return torch.einsum("pnk,pk->pn", w, rows), torch.einsum("pnk,pk->pn", w.abs(), rows.abs())


@pytest.mark.parametrize("tiles", [None, (8, 128, 8), (4, 256, 4), (16, 512, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stacked_rows_and_swiglu_match_float64(dtype, tiles):
    # tiles: program shapes (rows, K step, warps) other than the default, K = 333 ragged against each step
    g = torch.Generator().manual_seed(0)
    E, N, K, T, topk = 6, 200, 333, 3, 2  # N and K off every tile size
    w = torch.randn(E, N, K, generator=g).to(dtype)
    x = torch.randn(T, K, generator=g).to(dtype)
    idx = torch.randint(0, E, (T * topk,), generator=g)
    got = gemv(x.cuda(), w.cuda(), idx.cuda(), rows_per_x=topk, tiles=tiles)
    rows = x.double().repeat_interleave(topk, 0)
    ref, absum = float64_products(w[idx].double(), rows)
    assert got.dtype == dtype and within_output_rounding(got, ref, absum, dtype)

    h = torch.randn(len(idx), 2 * K, generator=g).to(dtype)  # the down projection's input: SwiGLU while loading
    got = gemv(h.cuda(), w.cuda(), idx.cuda(), swiglu=True, tiles=tiles)
    a = F.silu(h[:, :K].double()) * h[:, K:].double()
    ref, absum = float64_products(w[idx].double(), a)
    assert within_output_rounding(got, ref, absum, dtype)


@pytest.mark.parametrize("tiles", [None, (8, 256, 8), (4, 512, 4)])
def test_e4m3_block_scales_match_float64_including_split_grids(tiles):
    # K steps of 256 and 512 span two and four scale blocks (each column takes its own)
    g = torch.Generator().manual_seed(1)
    # one weight, ragged in both dims: the last block row and column are partial
    w = torch.randn(300, 260, generator=g)
    q, s = quantize_blockwise(w)
    x = torch.randn(5, 260, generator=g).to(torch.bfloat16)
    got = gemv(x.cuda(), q.cuda(), scale_inv=s.cuda(), tiles=tiles)
    wd = dequantize_blockwise(q, s, torch.float64)
    assert within_output_rounding(got, x.double() @ wd.T, x.double().abs() @ wd.abs().T, torch.bfloat16)

    # gate_up of I = 200 rows per half: the up half's block rows start at ceil(200/128) = 2, not at row 200 // 128
    E, inter, d = 4, 200, 256
    (qg, sg), (qu, su) = quantize_blockwise(torch.randn(E, inter, d, generator=g)), quantize_blockwise(
        torch.randn(E, inter, d, generator=g))
    q, s = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
    wd = torch.cat([dequantize_blockwise(qg, sg, torch.float64), dequantize_blockwise(qu, su, torch.float64)], 1)
    x = torch.randn(2, d, generator=g)
    idx = torch.tensor([3, 0, 3, 1])
    got = gemv(x.cuda(), q.cuda(), idx.cuda(), s.cuda(), rows_per_x=2, split=inter, tiles=tiles)
    rows = x.double().repeat_interleave(2, 0)
    ref, absum = float64_products(wd[idx], rows)
    assert within_output_rounding(got, ref, absum, torch.float32)
    wrong = torch.einsum("pnk,pk->pn", dequantize_blockwise(q, s[:, :4], torch.float64)[idx], rows)  # one grid
    assert not torch.allclose(wrong, ref)  # the case tells the two grids apart

    # the down projection [E, d, I] with E4M3 weights, ragged K = I = 200, SwiGLU on the loaded gate_up output;
    # index tensor and scales handed over as non-contiguous views
    qd, sd = quantize_blockwise(torch.randn(E, d, inter, generator=g))
    wd = dequantize_blockwise(qd, sd, torch.float64)
    h = torch.randn(len(idx), 2 * inter, generator=g).to(torch.bfloat16)
    idx2 = torch.stack([idx, idx], 1)[:, 0]  # stride 2
    got = gemv(h.cuda(), qd.cuda(), idx2.cuda(), sd.cuda().transpose(1, 2).contiguous().transpose(1, 2), swiglu=True,
               tiles=tiles)
    a = F.silu(h[:, :inter].double()) * h[:, inter:].double()
    ref, absum = float64_products(wd[idx], a)
    assert within_output_rounding(got, ref, absum, torch.bfloat16)


@pytest.mark.parametrize("fp8", [False, True])
def test_extra_matrix_rides_after_the_indexed_rows(fp8):
    # decode's shared expert in the routed experts' launches: gate_up [E, 2I, d] rows for T*K pairs, then the
    # shared gate_proj / up_proj (two separate tensors, each on its own block grid) on each of the T tokens;
    # then the down projection with SwiGLU on load, the shared rows reading the last T rows of h. I = 200:
    # ragged, so the up half's grid starts at block row 2 in both.
    g = torch.Generator().manual_seed(4)
    E, inter, d, T, topk = 5, 200, 256, 3, 2

    def weight(*shape):  # (stored, scale_inv or None, float64 value)
        w = torch.randn(*shape, generator=g)
        if not fp8:
            w = w.to(torch.bfloat16)
            return w, None, w.double()
        q, s = quantize_blockwise(w)
        return q, s, dequantize_blockwise(q, s, torch.float64)

    (qg, sg, wg), (qu, su, wu), (qd, sd, wd) = weight(E, inter, d), weight(E, inter, d), weight(E, d, inter)
    (hg, hgs, hgw), (hu, hus, huw), (hd, hds, hdw) = weight(inter, d), weight(inter, d), weight(d, inter)
    gate_up, gate_up_s = torch.cat([qg, qu], 1), None if sg is None else torch.cat([sg, su], 1)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16)
    idx = torch.tensor([4, 0, 2, 4, 1, 3])

    def cuda(t):
        return None if t is None else t.cuda()

    h = gemv(x.cuda(), gate_up.cuda(), idx.cuda(), cuda(gate_up_s), rows_per_x=topk, split=inter,
             extra=Extra(hg.cuda(), cuda(hgs), hu.cuda(), cuda(hus)), extra_rows=T)
    rows = x.double().repeat_interleave(topk, 0)
    w_all = torch.cat([torch.cat([wg, wu], 1)[idx], torch.cat([hgw, huw]).expand(T, -1, -1)])
    a_all = torch.cat([rows, x.double()])
    assert h.shape == (T * topk + T, 2 * inter)
    assert within_output_rounding(h, *float64_products(w_all, a_all), torch.bfloat16)

    y = gemv(h, qd.cuda(), idx.cuda(), cuda(sd), swiglu=True, extra=Extra(hd.cuda(), cuda(hds)), extra_rows=T)
    a = F.silu(h[:, :inter].double().cpu()) * h[:, inter:].double().cpu()
    w_all = torch.cat([wd[idx], hdw.expand(T, -1, -1)])
    assert y.shape == (T * topk + T, d)
    assert within_output_rounding(y, *float64_products(w_all, a), torch.bfloat16)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_pair_of_weights_sharing_the_input(fp8, norm):
    # MLA's W_DQ and [W_DKV; W_KR] on the same row: y = x [W1; W2]^T, N1 = 300 ragged against the 128 grid; with
    # the block's input RMSNorm inside the launch: y = RMSNorm(x) [W1; W2]^T against float64
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(300, 384, generator=g), torch.randn(130, 384, generator=g)
    x = (torch.randn(2, 384, generator=g) * 3).to(torch.bfloat16)
    nw, eps = (1 + torch.randn(384, generator=g) * 0.1).to(torch.bfloat16), 1e-6
    a = x.double()
    if norm:
        a = a * (a.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * nw.double()
    kw = {"norm": (nw.cuda(), eps)} if norm else {}
    if fp8:
        (q1, s1), (q2, s2) = quantize_blockwise(w1), quantize_blockwise(w2)
        ref_w = torch.cat([dequantize_blockwise(q1, s1, torch.float64), dequantize_blockwise(q2, s2, torch.float64)])
        got = gemv_pair(x.cuda(), q1.cuda(), q2.cuda(), s1.cuda(), s2.cuda(), **kw)
    else:
        w1, w2 = w1.to(torch.bfloat16), w2.to(torch.bfloat16)
        ref_w = torch.cat([w1, w2]).double()
        got = gemv_pair(x.cuda(), w1.cuda(), w2.cuda(), **kw)
    assert got.shape == (2, 430)
    assert within_output_rounding(got, a @ ref_w.T, a.abs() @ ref_w.abs().T, torch.bfloat16)
    if norm:
        with pytest.raises(ValueError, match="RMSNorm"):
            gemv_pair(x.cuda(), w1.cuda(), w2.cuda(), norm=(nw[:-1].cuda(), eps))


def test_linear_pair_takes_one_bf16_row_or_few_e4m3_rows():
    from dsv3.fp8.modules import FP8Linear

    g = torch.Generator().manual_seed(7)
    a, b = torch.nn.Linear(384, 300, bias=False), torch.nn.Linear(384, 130, bias=False)
    a, b = a.cuda().bfloat16(), b.cuda().bfloat16()
    with torch.no_grad():
        x = torch.randn(1, 1, 384, generator=g).to("cuda", torch.bfloat16)
        ya, yb = linear_pair(x, a, b)
        assert ya.shape == (1, 1, 300) and yb.shape == (1, 1, 130)
        for y, m in ((ya, a), (yb, b)):
            w = m.weight.double().cpu()
            assert within_output_rounding(y[0], x[0].double().cpu() @ w.T, x[0].double().cpu().abs() @ w.abs().T,
                                          torch.bfloat16)
        assert linear_pair(torch.cat([x, x], 1), a, b) is None  # two rows: cuBLAS reads the weight once for both
        norm = RMSNorm(384).cuda().bfloat16()
        norm.weight.copy_(1 + torch.randn(384, generator=g) * 0.1)
        ya, yb = linear_pair(x, a, b, norm)  # the norm inside the launch
        xd = x[0].double().cpu()
        xd = xd * (xd.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt() * norm.weight.double().cpu()
        for y, m in ((ya, a), (yb, b)):
            w = m.weight.double().cpu()
            assert within_output_rounding(y[0], xd @ w.T, xd.abs() @ w.abs().T, torch.bfloat16)
        assert linear_pair(x, a, b, type("Sub", (RMSNorm,), {})(384).cuda().bfloat16()) is None  # not plain
        qa, qb = FP8Linear.from_linear(a), FP8Linear.from_linear(b)
        x8 = torch.randn(8, 384, generator=g).to("cuda", torch.bfloat16)
        ya, yb = linear_pair(x8, qa, qb)
        torch.testing.assert_close(ya, qa(x8), rtol=0, atol=0)  # the same kernel's arithmetic as one launch each
        torch.testing.assert_close(yb, qb(x8), rtol=0, atol=0)
        assert linear_pair(torch.cat([x8, x8[:1]]), qa, qb) is None
        assert linear_pair(x[0], a, qb) is None  # bf16 beside E4M3
    assert linear_pair(x[0], a, b) is None  # under autograd: no gemv


def test_linear_streams_one_bf16_row_and_leaves_the_rest_to_the_module(monkeypatch):
    import dsv3.model.gemv as gv

    g = torch.Generator().manual_seed(8)
    m = torch.nn.Linear(2048, 1536, bias=False).cuda().bfloat16()  # `bench`'s o_proj
    calls = []
    monkeypatch.setattr(gv, "gemv", lambda *a, **k: calls.append(1) or gemv(*a, **k))
    with torch.no_grad():
        x = torch.randn(1, 1, 2048, generator=g).to("cuda", torch.bfloat16)
        y = linear(x, m)
        w = m.weight.double().cpu()
        assert y.shape == (1, 1, 1536) and calls == [1]
        assert within_output_rounding(y[0], x[0].double().cpu() @ w.T, x[0].double().cpu().abs() @ w.abs().T,
                                      torch.bfloat16)
        x2 = torch.randn(2, 1, 2048, generator=g).to("cuda", torch.bfloat16)
        assert torch.equal(linear(x2, m), m(x2)) and calls == [1]  # two rows: the module's own GEMM
    assert linear(x, m).requires_grad and calls == [1]  # under autograd: the module (gemv has no backward)


def test_weights_beyond_gemv_max_bytes_go_to_the_module(monkeypatch):
    """Above GEMV_MAX_BYTES (V3's W_UQ and W_O) a single row takes the module's cuBLAS GEMM, the norm and the
    residual outside it; at or below it, gemv (a pair counts both weights)."""
    import dsv3.model.gemv as gv

    g = torch.Generator().manual_seed(9)
    K = 4096
    n_max = gv.GEMV_MAX_BYTES // (2 * K)  # rows of a bf16 weight of exactly GEMV_MAX_BYTES
    at, over = (torch.nn.Linear(K, n, bias=False).cuda().bfloat16() for n in (n_max, n_max + 1))
    calls = []
    monkeypatch.setattr(gv, "gemv", lambda *a, **k: calls.append(1) or gemv(*a, **k))
    norm = RMSNorm(K).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(K, generator=g) * 0.1)
        x = torch.randn(1, 1, K, generator=g).to("cuda", torch.bfloat16)
        r = torch.randn(1, 1, n_max + 1, generator=g).to("cuda", torch.bfloat16)
        linear(x, at)
        assert calls == [1]
        assert torch.equal(linear(x, over, norm, r), r + over(norm(x))) and calls == [1]
        half = torch.nn.Linear(K, n_max // 2 + 1, bias=False).cuda().bfloat16()
        assert linear_pair(x, half, half) is None and calls == [1]  # together over the limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_rmsnorm_matches_float64(dtype, device="cuda"):
    """gemv(x, w, norm=(weight, eps)) = W RMSNorm(x) with the norm inside the kernel (the weight on the loaded
    columns, 1/rms on the sums), against float64: within the output's rounding, as a plain product; K = 333
    ragged against the K steps."""
    g = torch.Generator().manual_seed(12)
    N, K, T, eps = 200, 333, 3, 1e-6
    w = torch.randn(N, K, generator=g).to(dtype)
    x = (torch.randn(T, K, generator=g) * 3).to(dtype)
    nw = (1 + torch.randn(K, generator=g) * 0.1).to(dtype)
    got = gemv(x.to(device), w.to(device), norm=(nw.to(device), eps))
    xd = x.double()
    a = xd * (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * nw.double()
    assert got.dtype == dtype
    assert within_output_rounding(got, a @ w.double().T, a.abs() @ w.double().abs().T, dtype)
    with pytest.raises(ValueError, match="RMSNorm"):
        gemv(x.to(device), w.to(device), norm=(nw[:-1].to(device), eps))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_rides_in_the_launch(dtype):
    """gemv(x, w, residual=r) = W x + r within the output's rounding of float64 (a block's skip connection in
    W_O's launch; a lost add shows, one rounding more or less does not); linear(x, m, residual=r) takes it at a
    bf16 row and adds it after the module elsewhere."""
    g = torch.Generator().manual_seed(14)
    N, K, T = 200, 333, 2
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(T, K, generator=g).to(dtype)
    r = (torch.randn(T, N, generator=g) * 30).to(dtype)  # as large as the products: a lost add would show
    got = gemv(x.cuda(), w.cuda(), residual=r.cuda())
    ref = x.double() @ w.double().T + r.double()
    assert within_output_rounding(got, ref, x.double().abs() @ w.double().abs().T + r.double().abs(), dtype)
    with pytest.raises(ValueError, match="residual"):
        gemv(x.cuda(), w.cuda(), residual=r[:, :-1].cuda())
    m = torch.nn.Linear(K, N, bias=False).cuda().to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        one = linear(x[:1].cuda(), m, residual=r[:1].cuda())  # one row (bf16: through gemv)
        assert within_output_rounding(one, ref[:1], (x[:1].double().abs() @ w.double().abs().T + r[:1].double().abs()),
                                      dtype)
        both = linear(x.cuda(), m, residual=r.cuda())  # two rows: the module, then the add
        torch.testing.assert_close(both, r.cuda() + m(x.cuda()), rtol=0, atol=0)


def test_fused_rmsnorm_with_e4m3_weights():
    # the norm inside an E4M3 GEMV (FP8 models' W_UQ at up to GEMV_MAX_ROWS rows): each column scaled by its
    # block's scale as well as by the norm's weight; ragged 300 x 260 against the 128 grid
    g = torch.Generator().manual_seed(14)
    q, s = quantize_blockwise(torch.randn(300, 260, generator=g))
    x = (torch.randn(5, 260, generator=g) * 3).to(torch.bfloat16)
    nw = (1 + torch.randn(260, generator=g) * 0.1).to(torch.bfloat16)
    got = gemv(x.cuda(), q.cuda(), scale_inv=s.cuda(), norm=(nw.cuda(), 1e-6))
    wd = dequantize_blockwise(q, s, torch.float64)
    a = x.double() * (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * nw.double()
    assert within_output_rounding(got, a @ wd.T, a.abs() @ wd.abs().T, torch.bfloat16)


@pytest.mark.parametrize("K,tiles,fp8", [
    (333, (8, 128, 8), False),  # three 128-column K steps
    (2100, None, False),  # the default's 2048-column steps: two
    (333, None, True),  # E4M3, N = 264 and its split multiples of BLOCK_N = 8: scales on the activation (ROW_SCALE)
    (333, (8, 128, 4), True),  # ROW_SCALE over three K steps
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_rmsnorm_keeps_eps_and_every_k_step(dtype, K, tiles, fp8, device="cuda"):
    """The fused RMSNorm where a single K step and rows of rms ~1 cannot tell: a row of rms 1e-3, where eps = 1e-6
    moves 1/rms by sqrt(2) (a dropped eps shows); the row's sum of squares gathered over every K step (the last
    step's alone shows); E4M3 weights with the block scales on the activation (ROW_SCALE), where the norm must
    square the unscaled row. Against float64, within the output's rounding. `device` "cpu" runs the kernel in
    the Triton interpreter (TRITON_INTERPRET=1; not bf16 there)."""
    g = torch.Generator().manual_seed(16)
    N, eps = 264 if fp8 else 200, 1e-6
    x = (torch.randn(3, K, generator=g) * torch.tensor([[3.0], [1e-3], [0.5]])).to(dtype)  # rms 3, 1e-3, 0.5
    nw = (1 + torch.randn(K, generator=g) * 0.1).to(dtype)
    if fp8:
        w, s = quantize_blockwise(torch.randn(N, K, generator=g))
        wd = dequantize_blockwise(w, s, torch.float64)
    else:
        w, s = torch.randn(N, K, generator=g).to(dtype), None
        wd = w.double()
    got = gemv(x.to(device), w.to(device), scale_inv=None if s is None else s.to(device),
               norm=(nw.to(device), eps), tiles=tiles)
    xd = x.double()
    a = xd * (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * nw.double()
    assert got.dtype == dtype
    assert within_output_rounding(got, a @ wd.T, a.abs() @ wd.abs().T, dtype)


def test_linear_takes_the_norm_into_its_launch(monkeypatch):
    """linear(x, m, norm): one gemv launch for m(norm(x)) at a bf16 row, within its output's rounding of
    float64; a norm that is not exactly `RMSNorm` (a subclass) runs first, and under autograd the modules."""
    import dsv3.model.gemv as gv

    g = torch.Generator().manual_seed(13)
    m = torch.nn.Linear(768, 3072, bias=False).cuda().bfloat16()  # `bench`'s q_b_proj after q_a_layernorm
    norm = RMSNorm(768).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(768, generator=g) * 0.1)
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a, **k: calls.append(k.get("norm") is not None) or real(*a, **k))
    with torch.no_grad():
        x = (torch.randn(1, 1, 768, generator=g) * 3).to("cuda", torch.bfloat16)
        y = linear(x, m, norm=norm)
        assert calls == [True]
        xd = x[0].double().cpu()
        a = xd * (xd.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt() * norm.weight.double().cpu()
        w = m.weight.double().cpu()
        assert within_output_rounding(y[0], a @ w.T, a.abs() @ w.abs().T, torch.bfloat16)

        class Scaled(RMSNorm):  # may compute something else: its own forward
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) * 2

        other = Scaled(768).cuda().bfloat16()
        assert torch.equal(linear(x, m, norm=other), linear(other(x), m)) and calls == [True, False, False]
        hooked = []
        handle = norm.register_forward_hook(lambda *a: hooked.append(1))  # a hook must see its norm run
        assert torch.equal(linear(x, m, norm=norm), linear(norm(x), m)) and len(hooked) == 2
        assert calls == [True, False, False, False, False]
        handle.remove()
    norm.weight.requires_grad_(True)
    assert linear(x, m, norm=norm).requires_grad and calls == [True, False, False, False, False]


def test_extra_matrix_must_match():
    w = torch.randn(3, 32, 64, device="cuda", dtype=torch.bfloat16)
    x, idx = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long, device="cuda")
    for extra in [Extra(torch.randn(31, 64, device="cuda", dtype=torch.bfloat16)),  # rows
                  Extra(torch.randn(32, 64, device="cuda")),  # dtype
                  Extra(torch.randn(64, 32, device="cuda", dtype=torch.bfloat16).T),  # row stride
                  Extra(w[0, :16], None, w[0, 16:])]:  # two halves without the indexed weight's split
        with pytest.raises(ValueError, match="extra matrix"):
            gemv(x, w, idx, extra=extra, extra_rows=2)
    q = w.to(torch.float8_e4m3fn)
    s = torch.ones(3, 1, 1, device="cuda")
    with pytest.raises(ValueError, match="extra matrix"):  # E4M3 extra without its scales
        gemv(x, q, idx, s, extra=Extra(q[0]), extra_rows=2)
    with pytest.raises(ValueError, match="extra matrix"):
        gemv(x, q, idx, torch.ones(3, 2, 1, device="cuda"), split=16, extra=Extra(q[0, :16], s[0], q[0, 16:]),
             extra_rows=2)
    with pytest.raises(ValueError, match="extra matrix"):  # halves of the indexed weights, one extra matrix
        gemv(x, w, idx, split=16, extra=Extra(w[0]), extra_rows=2)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(x, w, idx, extra=Extra(w[0]), extra_rows=3)


def test_e4m3_weights_need_sm89(monkeypatch):
    x, q = torch.randn(2, 32, device="cuda"), torch.zeros(16, 32, device="cuda").to(torch.float8_e4m3fn)
    assert gemv_supported(x, q)  # the H200
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert not gemv_supported(x, q) and gemv_supported(x, q.to(torch.bfloat16))


def test_bad_shapes_are_refused():
    w = torch.randn(2, 16, 32, device="cuda")
    zeros = torch.zeros(3, dtype=torch.long, device="cuda")
    for x, kw in [(torch.randn(3, 31), {}), (torch.randn(3, 32), {"swiglu": True}), (torch.randn(2, 32), {}),
                  (torch.randn(1, 3, 32), {}), (torch.randn(2, 32), {"rows_per_x": 2})]:
        with pytest.raises(ValueError, match="do not fit"):
            gemv(x.cuda(), w, zeros, **kw)
    q = w.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block grid"):
        gemv(torch.randn(3, 32, device="cuda"), q, zeros, torch.ones(2, 2, 1, device="cuda"))
    # halves of 100 and 200 rows: 1 + 2 block rows, not 2 x ceil(100/128) (the last rows would read the next
    # expert's scales)
    q3 = torch.zeros(2, 300, 32, device="cuda").to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block grid"):
        gemv(torch.randn(3, 32, device="cuda"), q3, zeros, torch.ones(2, 2, 1, device="cuda"), split=100)
    gemv(torch.randn(3, 32, device="cuda"), q3, zeros, torch.ones(2, 3, 1, device="cuda"), split=100)
    for tiles in [(4, 0, 4), (0, 128, 4), (3, 128, 4), (4, 192, 4), (4, 64, 4)]:  # K steps: powers of two >= 128
        with pytest.raises(ValueError, match="tiles"):
            gemv(torch.randn(3, 32, device="cuda"), w, zeros, tiles=tiles)
    assert not gemv_supported(torch.randn(2, 32, device="cuda", requires_grad=True))
    assert not gemv_supported(torch.randn(2, 32, device="cuda"), w.requires_grad_())  # a weight being trained
    with torch.no_grad():
        assert gemv_supported(torch.randn(2, 32, device="cuda", requires_grad=True), w)


def test_experts_take_it_for_fewer_pairs_than_a_third_of_the_experts(monkeypatch):
    # and from E // 3 pairs on, expert_gemm (each chosen expert read once for all its tokens)
    g = torch.Generator().manual_seed(2)
    E, d, inter, topk = 16, 256, 96, 2
    experts = Experts(tiny_config(n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=topk,
                                  hidden_size=d, moe_intermediate_size=inter))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * inter, d, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(E, d, inter, generator=g) * 0.1)
    experts.cuda().bfloat16()
    calls = record_few_pairs(monkeypatch)
    for T in (1, 2, 3):  # 2, 4 pairs stream; 6 >= 16 // 3 take expert_gemm
        x = torch.randn(T, d, generator=g).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
        w = torch.rand(T, topk, generator=g)
        r = RouterOutput(idx.cuda(), w.cuda(), torch.zeros(T, E, device="cuda"),
                         torch.bincount(idx.flatten(), minlength=E).cuda())
        with torch.no_grad():
            got = experts(x.cuda(), r).double().cpu()
        want = experts_reference(x, experts.gate_up_proj.cpu(), experts.down_proj.cpu(), idx, w)
        assert ((got - want).norm() / want.norm()).item() < 8e-3, T
    assert calls == [(1, True), (2, True), (3, False)]


@pytest.mark.parametrize("tokens", [1, 12])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_shared_expert_rides_in_the_routed_launches(fp8, tokens, monkeypatch):
    # decode's MoE: the shared expert is computed in the routed experts' two launches (gemv's at 1 token,
    # expert_gemm's at 12: 36 pairs of 16 experts; its own forward never runs) and the result is routed + shared
    # against float64; a shared expert of another width (two shared experts fused) keeps its own forward
    from dsv3.fp8.modules import to_fp8_
    from dsv3.model.layers import MLP
    from dsv3.model.moe import MoE

    g = torch.Generator().manual_seed(6)
    calls, real = [], MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(1) or real(self, x))
    paths = record_few_pairs(monkeypatch)
    for n_shared, rides in ((1, True), (2, False)):
        calls.clear()
        cfg = tiny_config(n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=3, hidden_size=256,
                          moe_intermediate_size=200, n_shared_experts=n_shared)
        moe = MoE(cfg)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ref_moe = MoE(cfg).double()
        ref_moe.load_state_dict(moe.state_dict())
        moe = moe.cuda().bfloat16()
        if fp8:
            names = [n for n, m in moe.named_modules() if isinstance(m, torch.nn.Linear)] + ["experts"]
            to_fp8_(moe, names)
        x = torch.randn(tokens, 256, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            got, r = moe(x.cuda())
        # the reference: the same routing, float64 experts (dequantised E4M3 ones for the FP8 model)
        if fp8:
            gate_up, down = moe.experts.weights(torch.float64)
            shared = {n: dequantize_blockwise(m.weight, m.weight_scale_inv, torch.float64).cpu()
                      for n, m in moe.shared_experts.named_children()}
        else:
            gate_up, down = moe.experts.gate_up_proj.double(), moe.experts.down_proj.double()
            shared = {n: m.weight.double().cpu() for n, m in moe.shared_experts.named_children()}
        xd = x.double()
        want = experts_reference(xd, gate_up.cpu(), down.cpu(), r.topk_idx.cpu(), r.weights.cpu())
        want += (F.silu(xd @ shared["gate_proj"].T) * (xd @ shared["up_proj"].T)) @ shared["down_proj"].T
        assert ((got.double().cpu() - want).norm() / want.norm()).item() < 8e-3, (n_shared, fp8, tokens)
        assert (not calls) == rides, (n_shared, calls)
        assert paths == [(tokens, tokens == 1)], paths  # gemv per pair at 1 token, expert_gemm at 12
        paths.clear()


def test_moe_shared_expert_falls_back_when_it_cannot_ride(monkeypatch):
    # FP8 routed experts beside a bf16 shared expert, and a shared expert being trained (gemv has no
    # backward): the shared expert runs its own forward, and a trainable one gets its gradient
    from dsv3.fp8.modules import to_fp8_
    from dsv3.model.layers import MLP
    from dsv3.model.moe import MoE

    calls, real = [], MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(1) or real(self, x))
    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3, hidden_size=256,
                      moe_intermediate_size=128, n_shared_experts=1)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe = moe.cuda().bfloat16()
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        rides, _ = moe(x)
    assert not calls
    moe.experts.requires_grad_(False)
    moe.gate.requires_grad_(False)
    out, _ = moe(x)  # grad enabled, only the shared expert trainable: the routed ones still take decode's kernels
    assert calls and out.requires_grad
    out.float().square().sum().backward()
    assert moe.shared_experts.down_proj.weight.grad.abs().sum() > 0
    # the same sum up to bf16 roundings (the fallback rounds the shared expert's hidden and output once more)
    assert ((out.detach().float() - rides.float()).norm() / rides.float().norm()) < 1e-2
    calls.clear()
    to_fp8_(moe, ["experts"])  # routed E4M3, shared bf16
    with torch.no_grad():
        mixed, _ = moe(x)
    assert calls and ((mixed.float() - rides.float()).norm() / rides.float().norm()) < 0.05


def test_fp8_linear_streams_few_rows_and_gemms_more(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(576, 768, generator=g)  # K = 768: not a multiple of 512, so cuBLAS's FP8 GEMM refuses it
    q, s = quantize_blockwise(w)
    wd = dequantize_blockwise(q, s, torch.float64)
    rows = []
    monkeypatch.setattr(gemm, "gemv", lambda x, *a, **kw: rows.append(x.shape[0]) or gemv(x, *a, **kw))
    for m in (1, gemm.GEMV_MAX_ROWS):
        x = torch.randn(2, m, 768, generator=g).to(torch.bfloat16)  # leading dims are flattened into rows
        got = gemm.fp8_linear(x[0].cuda(), q.cuda(), s.cuda())
        assert within_output_rounding(got, x[0].double() @ wd.T, x[0].double().abs() @ wd.abs().T, torch.bfloat16)
    gemm.fp8_linear(torch.randn(gemm.GEMV_MAX_ROWS + 1, 768, device="cuda", dtype=torch.bfloat16), q.cuda(),
                    s.cuda())
    assert rows == [1, gemm.GEMV_MAX_ROWS]
