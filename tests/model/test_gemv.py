"""The few-row Triton GEMV (dsv3.model.gemv) against float64: stacked experts picked per row, the fused SwiGLU
input, E4M3 weights with 128x128 block scales (ragged shapes, gate_up's two grids), and the model paths that
take it (decode's routed experts, FP8 linears of <= GEMV_MAX_ROWS rows). CUDA only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.fp8 import dequantize_blockwise, gemm, quantize_blockwise
from dsv3.model.gemv import gemv, gemv_supported
from dsv3.model.moe import Experts, RouterOutput
from tests.conftest import tiny_config
from tests.model.test_moe import experts_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def within_output_rounding(got: torch.Tensor, ref: torch.Tensor, absum: torch.Tensor, dtype: torch.dtype) -> bool:
    """|got - ref| <= one ulp of the output dtype (RNE is half of it; the float32 sum adds <= K 2^-24 absum)."""
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}[dtype]
    return bool(((got.double().cpu() - ref).abs() <= ulp * ref.abs() + 2.0**-14 * absum + 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stacked_rows_and_swiglu_match_float64(dtype):
    g = torch.Generator().manual_seed(0)
    E, N, K, T, topk = 6, 200, 333, 3, 2  # N and K off every tile size
    w = torch.randn(E, N, K, generator=g).to(dtype)
    x = torch.randn(T, K, generator=g).to(dtype)
    idx = torch.randint(0, E, (T * topk,), generator=g)
    got = gemv(x.cuda(), w.cuda(), idx.cuda(), rows_per_x=topk)
    rows = x.double().repeat_interleave(topk, 0)
    ref = torch.einsum("pnk,pk->pn", w[idx].double(), rows)
    absum = torch.einsum("pnk,pk->pn", w[idx].double().abs(), rows.abs())
    assert got.dtype == dtype and within_output_rounding(got, ref, absum, dtype)

    h = torch.randn(len(idx), 2 * K, generator=g).to(dtype)  # the down projection's input: SwiGLU while loading
    got = gemv(h.cuda(), w.cuda(), idx.cuda(), swiglu=True)
    a = F.silu(h[:, :K].double()) * h[:, K:].double()
    ref = torch.einsum("pnk,pk->pn", w[idx].double(), a)
    absum = torch.einsum("pnk,pk->pn", w[idx].double().abs(), a.abs())
    assert within_output_rounding(got, ref, absum, dtype)


def test_e4m3_block_scales_match_float64_including_split_grids():
    g = torch.Generator().manual_seed(1)
    # one weight, ragged in both dims: the last block row and column are partial
    w = torch.randn(300, 260, generator=g)
    q, s = quantize_blockwise(w)
    x = torch.randn(5, 260, generator=g).to(torch.bfloat16)
    got = gemv(x.cuda(), q.cuda(), scale_inv=s.cuda())
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
    got = gemv(x.cuda(), q.cuda(), idx.cuda(), s.cuda(), rows_per_x=2, split=inter)
    rows = x.double().repeat_interleave(2, 0)
    ref = torch.einsum("pnk,pk->pn", wd[idx], rows)
    absum = torch.einsum("pnk,pk->pn", wd[idx].abs(), rows.abs())
    assert within_output_rounding(got, ref, absum, torch.float32)
    wrong = torch.einsum("pnk,pk->pn", dequantize_blockwise(q, s[:, :4], torch.float64)[idx], rows)  # one grid
    assert not torch.allclose(wrong, ref)  # the case tells the two grids apart

    # the down projection [E, d, I] with E4M3 weights, ragged K = I = 200, SwiGLU on the loaded gate_up output;
    # index tensor and scales handed over as non-contiguous views
    qd, sd = quantize_blockwise(torch.randn(E, d, inter, generator=g))
    wd = dequantize_blockwise(qd, sd, torch.float64)
    h = torch.randn(len(idx), 2 * inter, generator=g).to(torch.bfloat16)
    idx2 = torch.stack([idx, idx], 1)[:, 0]  # stride 2
    got = gemv(h.cuda(), qd.cuda(), idx2.cuda(), sd.cuda().transpose(1, 2).contiguous().transpose(1, 2), swiglu=True)
    a = F.silu(h[:, :inter].double()) * h[:, inter:].double()
    ref = torch.einsum("pnk,pk->pn", wd[idx], a)
    absum = torch.einsum("pnk,pk->pn", wd[idx].abs(), a.abs())
    assert within_output_rounding(got, ref, absum, torch.bfloat16)


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
    assert not gemv_supported(torch.randn(2, 32, device="cuda", requires_grad=True))
    assert not gemv_supported(torch.randn(2, 32, device="cuda"), w.requires_grad_())  # a weight being trained
    with torch.no_grad():
        assert gemv_supported(torch.randn(2, 32, device="cuda", requires_grad=True), w)


def test_experts_take_it_for_fewer_pairs_than_experts(monkeypatch):
    g = torch.Generator().manual_seed(2)
    E, d, inter, topk = 8, 256, 96, 3
    experts = Experts(tiny_config(n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=topk,
                                  hidden_size=d, moe_intermediate_size=inter))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * inter, d, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(E, d, inter, generator=g) * 0.1)
    experts.cuda().bfloat16()
    calls = []
    real = Experts.few_pairs
    monkeypatch.setattr(Experts, "few_pairs", lambda self, x, r: calls.append(x.shape[0]) or real(self, x, r))
    for T in (1, 2, 3):  # 3, 6 pairs stream; 9 >= 8 experts take the grouped GEMMs
        x = torch.randn(T, d, generator=g).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
        w = torch.rand(T, topk, generator=g)
        r = RouterOutput(idx.cuda(), w.cuda(), torch.zeros(T, E, device="cuda"),
                         torch.bincount(idx.flatten(), minlength=E).cuda())
        with torch.no_grad():
            got = experts(x.cuda(), r).double().cpu()
        want = experts_reference(x, experts.gate_up_proj.cpu(), experts.down_proj.cpu(), idx, w)
        assert ((got - want).norm() / want.norm()).item() < 8e-3, T
    assert calls == [1, 2]


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
