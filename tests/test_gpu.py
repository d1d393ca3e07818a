"""CUDA checks (`make test-gpu`): bf16 numerics against float64, no host sync in the forward, torch.compile.

The CPU suite covers the math; these cover what only the GPU path has: cuDNN attention, bf16 grouped GEMM,
inductor kernels, and the absence of host synchronisation that would stall a CUDA-graph decode step.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_model, tiny_config

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg():
    # bf16 grouped GEMM wants 16-byte aligned strides: widths are multiples of 8
    return tiny_config(hidden_size=128, moe_intermediate_size=64, intermediate_size=192, v_head_dim=32,
                       qk_nope_head_dim=32, qk_rope_head_dim=16, kv_lora_rank=64, q_lora_rank=64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _token_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative error of each token's logit vector: a bf16 rounding that flips a near-tie in the router sends
    that one token to other experts, so MoE numerics are judged per token, by quantiles."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@cuda
def test_bf16_forward_matches_float64_reference():
    cfg = _cfg()
    ref = random_model(cfg, torch.float64, std=0.05, bias_std=0.0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ref.to("cuda", torch.bfloat16)(tokens.cuda()).logits.cpu()
    # bf16 operands carry 8 mantissa bits: ~4e-3 relative per rounding, a few layers deep. Most tokens keep
    # their experts and stay within 3e-2; unrelated logits would be ~1.4 apart. A few tokens may flip a
    # near-tie in the router, so the bound is on the median and the 80th percentile.
    err = _token_rel(got, want)
    assert err.median() < 3e-2 and err.quantile(0.8) < 6e-2, err.quantile(torch.tensor([0.5, 0.8, 1.0]).double())


@cuda
def test_forward_has_no_host_sync():
    cfg = _cfg()
    model = random_model(cfg, torch.bfloat16).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        model(tokens)  # warm-up: lazy cuBLAS/cuDNN initialisation may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
def test_compiled_forward_matches_eager():
    cfg = _cfg()
    model = random_model(cfg, torch.bfloat16, std=0.05).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        eager = model(tokens).logits
        compiled = torch.compile(model)(tokens).logits
    # same bf16 operands, different fusion and accumulation order (and so, rarely, a flipped router near-tie)
    err = _token_rel(compiled, eager)
    assert err.median() < 2e-2 and err.quantile(0.8) < 4e-2, err.quantile(torch.tensor([0.5, 0.8, 1.0]).double())


@cuda
def test_absorbed_equals_expanded_on_gpu():
    cfg = _cfg()
    model = random_model(cfg, torch.float32).cuda()
    attn = model.layers[1].self_attn
    x = torch.randn(2, 48, cfg.hidden_size, device="cuda")
    cos, sin = model.rope(torch.arange(48, device="cuda").unsqueeze(0))
    with torch.no_grad():
        q_nope, q_pe = attn.query(x, cos, sin)
        c_kv, k_pe = attn.latent(x, cos, sin)
        a = attn.expanded(q_nope, q_pe, c_kv, k_pe, 0)
        b = attn.absorbed(q_nope, q_pe, c_kv, k_pe, 0)
    # float32 with TF32 off by default in matmul; the two paths associate the products differently
    assert _rel(b, a) < 1e-4


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_few_query_decode_attention_matches_float64(dtype):
    from dsv3.model.attention import _FEW_QUERIES, attend

    # absorbed decode shapes: S*H queries against one latent key head (C + rope wide), value c_kv (C wide)
    g = torch.Generator().manual_seed(0)
    B, SH, T, C, R = 3, 32, 300, 128, 16
    assert SH <= _FEW_QUERIES
    q, k = torch.randn(B, 1, SH, C + R, generator=g), torch.randn(B, 1, T, C + R, generator=g)
    v = k[..., :C] * 2
    pos = torch.tensor([[T - 1], [150], [7]]).expand(B, SH)  # rows of different lengths, padded keys beyond
    scale = (C + R) ** -0.5
    # per-row positions, the same positions for every row ([1, S]), no mask, one offset for every row
    for q_pos in (pos, pos[1:2], None, T - 4):
        with torch.no_grad():
            got = attend(q.to("cuda", dtype), k.to("cuda", dtype), v.to("cuda", dtype), scale, q_pos.cuda()
                         if isinstance(q_pos, torch.Tensor) else q_pos).cpu().double()
        s = torch.einsum("bhsd,bhtd->bhst", q.double(), k.double()) * scale
        if isinstance(q_pos, torch.Tensor):
            s = s.masked_fill(torch.arange(T) > q_pos[:, None, :, None], float("-inf"))
        elif isinstance(q_pos, int):
            s = s.masked_fill(torch.arange(T) > torch.arange(q_pos, q_pos + SH)[:, None], float("-inf"))
        want = torch.einsum("bhst,bhtd->bhsd", s.softmax(-1), v.double())
        # bf16: operands and probabilities rounded to 8 bits (~4e-3 each); float32: TF32 off, ~1e-6; float64
        # stays float64 throughout
        tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        assert _rel(got, want) < tol, q_pos
    # queries == keys from position 0: SDPA's is_causal (query i sees keys <= i)
    kc, vc = k[:, :, :SH], v[:, :, :SH]
    with torch.no_grad():
        got = attend(q.to("cuda", dtype), kc.to("cuda", dtype), vc.to("cuda", dtype), scale, 0).cpu().double()
    s = (torch.einsum("bhsd,bhtd->bhst", q.double(), kc.double()) * scale).masked_fill(
        torch.ones(SH, SH, dtype=torch.bool).triu(1), float("-inf"))
    assert _rel(got, torch.einsum("bhst,bhtd->bhsd", s.softmax(-1), vc.double())) < tol
