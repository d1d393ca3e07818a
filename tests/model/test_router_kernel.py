"""Decode's fused router (dsv3.model.router_kernel) against `moe.route` in float64: the same experts in the same
order, scores within the float32 GEMV's rounding, gates within float32 rounding of the float64 gates, loads
equal; `bench`- and V3-shaped gates, one group, all groups kept, padded tiles, no normalisation, bf16 and float32
weights, 1 to 16 tokens, a top expert in a dropped group; and Router.forward's dispatch to it. CUDA only.

`check` takes the device and the split over d, so the kernels also run in the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.model import moe
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Router, route
from dsv3.model.router_kernel import fused_router
from tests.conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# name: (E, n_group, topk_group, K, d, norm_topk_prob)
SHAPES = {
    "bench": (64, 8, 4, 8, 1536, True),
    "v3": (256, 8, 4, 8, 7168, True),
    "one-group": (64, 1, 1, 6, 1536, True),
    "all-groups-kept": (64, 8, 8, 8, 512, True),
    "no-norm": (64, 8, 4, 8, 1536, False),
    "padded-tiles": (18, 3, 2, 5, 200, True),  # groups of 6 in tiles of 8, 3 groups in 4, d off every tile
    "singleton-groups": (16, 16, 4, 3, 96, True),  # a group score is its one expert's score
}
SCALE = 2.5  # V3's routed_scaling_factor


def scores_tolerance(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """|s - sigmoid(z)| for z = x w^T summed in float32: up to 256 sequential additions lose 2^-16 sum |x w|,
    through sigmoid's slope <= 1/4; exp (an approximation on the GPU), the add and the division a few ulps more."""
    return 2.0**-18 * (x.double().abs() @ w.double().abs().T) + 2.0**-21 * (1 + z.abs())


def assert_rmsnorm_rows(got: torch.Tensor, x: torch.Tensor, nw: torch.Tensor, eps: float) -> None:
    """got = layers.RMSNorm(x) with weight nw and eps, against float64: within its two roundings to the output's
    dtype (after 1/rms, after the weight; subnormals round absolutely) and a float32 1/rms of a few ulps; for 16-bit
    outputs, equal to float64 rounded the same two times but for a few elements a float32 1/rms puts on the other
    side of a rounding boundary (one rounding fewer moves a fifth of them)."""
    assert got.shape == x.shape
    got = got.double().cpu()
    xd = x.double().cpu()
    rstd = (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    want = xd * rstd * nw.double().cpu()
    out = torch.promote_types(nw.dtype, x.dtype)
    fi = torch.finfo(out)
    u = fi.eps / 2
    assert ((got - want).abs() <= (2 * u + 2.0**-20) * want.abs() + 4 * fi.tiny * u).all()
    if fi.bits == 16:
        inner = (xd * rstd).to(x.dtype).double()
        twice = (nw.double().cpu() * inner).to(out).double()
        off = got != twice
        assert off.sum() <= max(2, got.numel() // 200), f"{off.sum()} of {got.numel()} off RMSNorm's roundings"
        # where 1/rms tipped the first rounding: an ulp of the normalised value (times the weight), then of the output
        w_ulp = nw.double().cpu().abs().expand_as(got) * (2 * u * inner.abs() + 2 * fi.tiny * u)
        assert ((got - twice).abs() <= w_ulp + 2 * u * twice.abs() + 2 * fi.tiny * u)[off].all()


def check(E, G, TG, K, d, norm, T, dtype, device, split=None, seed=0, x=None, w=None, bias=None, rmsnorm=None):
    """Runs fused_router on random inputs (or the given ones) and compares it with route() in float64; with
    `rmsnorm` (weight, eps) the kernel normalises x first: its normalised rows against float64 within the two
    roundings of `layers.RMSNorm`, and its routing against route() of those rows.
    Returns the float64 reference (weights, idx, scores) for further checks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype) if x is None else x
    w = (torch.randn(E, d, generator=g) * 1.5 / d**0.5).to(dtype) if w is None else w  # z ~ N(0, 1.5^2)
    bias = torch.randn(E, generator=g) * 0.1 if bias is None else bias  # mixed signs, as aux-free balancing makes
    kw = {} if rmsnorm is None else {"norm_weight": rmsnorm[0].to(device), "norm_eps": rmsnorm[1]}
    got_w, got_idx, got_s, got_load, got_n = fused_router(
        x.to(device), w.to(device), bias.to(device), G, TG, K, norm, SCALE, split=split, **kw)
    got_w, got_idx, got_s, got_load, got_n = got_w.cpu(), got_idx.cpu(), got_s.cpu(), got_load.cpu(), got_n.cpu()
    assert (got_w.dtype, got_idx.dtype, got_s.dtype, got_load.dtype) == (
        torch.float32, torch.int64, torch.float32, torch.int64)  # what Router.forward returns
    if rmsnorm is None:
        assert got_n.shape == (0, d)
    else:
        assert got_n.dtype == torch.promote_types(rmsnorm[0].dtype, x.dtype)
        assert_rmsnorm_rows(got_n, x, *rmsnorm)
        x = got_n  # the rows it routed: its own, checked above

    z = x.double() @ w.double().T  # bf16 and float32 products are exact in float64
    s = z.sigmoid()
    ref_w, ref_idx = route(s, bias.double(), G, TG, K, norm, SCALE)
    assert ((got_s.double() - s).abs() <= scores_tolerance(x, w, z)).all()
    # random continuous inputs leave no near-ties, so float32 scores select the float64 experts, in order
    assert torch.equal(got_idx, ref_idx)
    assert torch.equal(got_load, torch.bincount(ref_idx.flatten(), minlength=E))
    # gates: route() in float64 on the kernel's own scores; the float32 sum of K, the division and the scaling
    # round (K + 2) times
    own_w, own_idx = route(got_s.double(), bias.double(), G, TG, K, norm, SCALE)
    assert torch.equal(own_idx, ref_idx)
    assert ((got_w.double() - own_w).abs() <= (K + 2) * 2.0**-24 * own_w.abs()).all()
    return ref_w, ref_idx, s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_route_in_float64(shape, T, dtype):
    check(*SHAPES[shape], T, dtype, "cuda")


@pytest.mark.parametrize("rms", [4.0, 1e-3])  # 1e-3: mean(x^2) = eps, so a lost eps shows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("shape", ["bench", "v3", "padded-tiles"])
def test_rmsnorm_inside_routes_the_normalised_rows(shape, T, dtype, rms, device="cuda", split=None):
    E, G, TG, K, d, norm = SHAPES[shape]
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(T, d, generator=g) * rms).to(dtype)
    nw = (1 + torch.randn(d, generator=g) * 0.1).to(dtype)
    check(E, G, TG, K, d, norm, T, dtype, device, split=split, x=x, rmsnorm=(nw, 1e-6))
    with pytest.raises(ValueError, match="RMSNorm"):
        fused_router(x.to(device), torch.ones(E, d, dtype=dtype, device=device), torch.zeros(E, device=device), G, TG,
                     K, norm_weight=nw[:-1].to(device), norm_eps=1e-6)


@pytest.mark.parametrize("split", [1, 5, 100])  # one program along d; 6 tiles of d over 5 (3 used); more than tiles
def test_any_split_over_d(split):
    check(*SHAPES["bench"], 4, torch.bfloat16, "cuda", split=split)


def test_float32_activations_with_bf16_weight():
    E, G, TG, K, d, norm = SHAPES["bench"]
    g = torch.Generator().manual_seed(1)
    check(E, G, TG, K, d, norm, 5, None, "cuda", x=torch.randn(5, d, generator=g),
          w=(torch.randn(E, d, generator=g) / d**0.5).bfloat16())


def dropped_group_inputs(T: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, w, bias for E=64 in 8 groups, where expert 0 has every token's top affinity but group 0's top-2 sum is
    the lowest (its other experts score ~0), and bias -1 puts every biased score below 0: route drops group 0, a
    0.0 mask would pick a dropped expert over every kept one, and no group limit would pick expert 0 first."""
    g = torch.Generator().manual_seed(2)
    z = torch.rand(T, 64, generator=g) * 2  # affinities 0.5-0.88
    z[:, 0], z[:, 1:8] = 4.0, -4.0 - torch.rand(T, 7, generator=g)  # 0.98, then < 0.02
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = (torch.linalg.pinv(x) @ z.double()).T  # the least-norm w with x w^T = z
    return x.to(dtype), w.to(dtype), torch.full((64,), -1.0)


@pytest.mark.parametrize("T", [1, 16])
def test_expert_with_the_top_score_in_a_dropped_group_is_not_chosen(T):
    x, w, bias = dropped_group_inputs(T, 256, torch.float32)
    _, idx, s = check(64, 8, 4, 8, 256, True, T, None, "cuda", x=x, w=w, bias=bias)
    assert (s.argmax(-1) == 0).all() and not (idx < 8).any()  # expert 0 tops every row, group 0 is dropped
    assert (s.gather(1, idx) + bias[0] < 0).all()  # so 0.0-masked experts would beat the chosen ones


def tied_inputs(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = e_0 and w[:, 0] = these logits, so the GEMV is exact and equal logits give bit-equal scores. Groups of
    4: group 1's two maxima tie (and count twice: the best group); groups 0 and 2 tie for the second slot."""
    z = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, -3.0, -3.0, 1.0, 0.0, -1.0, -1.0, 0.0, -1.0, -1.0, -1.0])
    w = torch.randn(16, d, generator=torch.Generator().manual_seed(4))
    w[:, 0] = z
    return torch.eye(1, d), w


def test_ties_go_to_the_lower_group_and_expert(device="cuda", split=None):
    x, w = tied_inputs(64)
    weights, idx, _, _, _ = fused_router(x.to(device), w.to(device), torch.zeros(16, device=device), 4, 2, 3, True,
                                         SCALE, split=split)
    ref_w, ref_idx = route((x.double() @ w.double().T).sigmoid(), torch.zeros(16), 4, 2, 3, True, SCALE)
    assert ref_idx[0].sort().values.tolist() == [0, 4, 5]  # route keeps group 0 over group 2 (expert 8)
    assert idx.tolist() == [[4, 5, 0]]  # the same experts; of the tied pair the lower index first
    want = dict(zip(ref_idx[0].tolist(), ref_w[0].tolist(), strict=True))
    assert weights[0].tolist() == pytest.approx([want[e] for e in (4, 5, 0)], rel=5 * 2.0**-24)


@torch.no_grad()
def test_router_forward_dispatches_decode_to_it(monkeypatch):
    cfg = tiny_config(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8, hidden_size=256)
    router = Router(cfg)
    g = torch.Generator().manual_seed(3)
    router.weight.copy_(torch.randn(64, 256, generator=g) / 16)
    router.e_score_correction_bias.copy_(torch.randn(64, generator=g) * 0.1)
    router.cuda().bfloat16()
    calls = []
    real = moe.fused_router
    monkeypatch.setattr(moe, "fused_router", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    for T in (1, 16, 17):  # 17 rows: the general path
        x = torch.randn(T, 256, generator=g).bfloat16().cuda()
        r = router(x)
        s = (x.double() @ router.weight.double().T).sigmoid()
        w, idx = route(s, router.e_score_correction_bias.double(), 8, 4, 8, True, cfg.routed_scaling_factor)
        assert torch.equal(r.topk_idx, idx) and torch.allclose(r.weights.double(), w, rtol=1e-5, atol=0)
        assert torch.equal(r.load, torch.bincount(idx.flatten(), minlength=64))
    assert calls == [1, 16]
    with torch.enable_grad():  # a router being trained (its weight requires grad) keeps the differentiable path
        router(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [1, 16]
    # normed(x, norm): RMSNorm(x) and its routing, the norm inside the launch at decode
    norm = RMSNorm(256).cuda().bfloat16()
    norm.weight.copy_(1 + torch.randn(256, generator=g) * 0.1)
    for T in (1, 17):
        x = (torch.randn(T, 256, generator=g) * 3).bfloat16().cuda()
        h, r = router.normed(x, norm)
        assert_rmsnorm_rows(h, x, norm.weight, norm.eps)
        want = router(h)  # the rows it routed, routed again without the norm
        assert torch.equal(r.topk_idx, want.topk_idx) and torch.equal(r.weights, want.weights)
    assert calls == [1, 16, 1, 1]
    seen = []
    router.register_forward_hook(lambda *a: seen.append(1))  # a hooked router is called, on the normalised rows
    x = torch.randn(1, 256, generator=g).bfloat16().cuda()
    h, r = router.normed(x, norm)
    assert seen == [1] and calls == [1, 16, 1, 1, 1] and torch.equal(r.topk_idx, router(h).topk_idx)


@torch.no_grad()
def test_compiles_into_a_graph_with_the_same_routing():
    cfg = tiny_config(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8, hidden_size=256)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1 / 16)
    router.cuda().bfloat16()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)

    def fields(x):
        r = router(x)
        return r.topk_idx, r.weights, r.scores, r.load

    want = fields(x)
    got = torch.compile(fields, fullgraph=True)(x)  # fullgraph: the Triton launches trace, no graph break
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    norm = RMSNorm(256, eps=1.0).cuda().bfloat16()  # eps of the rows' mean square: a lost eps would show
    norm.weight.copy_(1 + torch.randn(256, device="cuda") * 0.1)

    def normed(x):
        h, r = router.normed(x[:1], norm)
        return h, r.topk_idx, r.weights

    want = normed(x)
    got = torch.compile(normed, fullgraph=True)(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert_rmsnorm_rows(got[0], x[:1], norm.weight, norm.eps)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 8])
def test_load_counts_start_from_zero_at_every_graph_replay(T):
    # a CUDA graph reuses its buffers: the per-expert counts the per-token selection programs add to must be
    # zeroed in every replay (filled with garbage here first), not only in the first call
    E, G, TG, K, d = 64, 8, 4, 8, 256
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, d, generator=g).bfloat16().cuda()
    w = (torch.randn(E, d, generator=g) / 16).bfloat16().cuda()
    bias = torch.zeros(E, device="cuda")
    fused_router(x, w, bias, G, TG, K, True, SCALE)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, idx, _, load, _ = fused_router(x, w, bias, G, TG, K, True, SCALE)
    for fill in (7, -3):
        load.fill_(fill)
        graph.replay()
        torch.cuda.synchronize()
        ref = route((x.double() @ w.double().T).sigmoid().cpu(), bias.double().cpu(), G, TG, K, True, SCALE)[1]
        assert torch.equal(idx.cpu(), ref)
        assert torch.equal(load.cpu(), torch.bincount(ref.flatten(), minlength=E)), fill
