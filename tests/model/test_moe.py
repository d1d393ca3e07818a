"""DeepSeekMoE (SPEC 1.4): the router against hand-computed cases, a float64 loop reference and transformers'
router; grouped-GEMM experts against a plain per-expert loop; the float32 router and bias under bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Experts, MoE, Router, RouterOutput, _Bf16Logits, combine, route, router_logits
from tests.conftest import randomize_bias_, tiny_config

# Hand cases are float32 sums of a few numbers of order 1: 1e-6 absolute covers their rounding.
HAND_ATOL = 1e-6


def _route1(scores, bias, **kw):
    """route() on one token given as Python lists; returns (experts in selection order, gates)."""
    w, idx = route(torch.tensor([scores]), torch.tensor(bias), **kw)
    return idx[0].tolist(), w[0]


def _as_dict(idx, w):
    return {e: float(g) for e, g in zip(idx, w.detach(), strict=True)}


def test_route_plain_topk_gates_are_normalised_scores_times_scaling():
    idx, w = _route1([0.9, 0.1, 0.5, 0.7], [0.0] * 4, n_group=1, topk_group=1, top_k=2,
                     routed_scaling_factor=2.5)
    assert sorted(idx) == [0, 3]
    got = _as_dict(idx, w)
    assert got[0] == pytest.approx(0.9 / 1.6 * 2.5, abs=HAND_ATOL)
    assert got[3] == pytest.approx(0.7 / 1.6 * 2.5, abs=HAND_ATOL)


def test_route_negative_bias_changes_selection_but_gates_use_unbiased_scores():
    # biased = [0.4, 0.1, 0.5, 0.7]: expert 0 (best unbiased) drops out, experts 3 and 2 win
    idx, w = _route1([0.9, 0.1, 0.5, 0.7], [-0.5, 0.0, 0.0, 0.0], n_group=1, topk_group=1, top_k=2,
                     routed_scaling_factor=2.5)
    assert sorted(idx) == [2, 3]
    got = _as_dict(idx, w)
    assert got[3] == pytest.approx(0.7 / 1.2 * 2.5, abs=HAND_ATOL)  # not (0.7 + 0) / ...: bias never enters
    assert got[2] == pytest.approx(0.5 / 1.2 * 2.5, abs=HAND_ATOL)


def test_route_group_score_is_sum_of_top2():
    # three groups of four. Rank groups by max -> g0 (0.95); by sum of all -> g2 (1.66); by the SPEC's sum of
    # the top two -> g1 (1.15 vs g0 1.05 vs g2 0.85). Keeping one group, the two experts must come from g1.
    scores = [0.95, 0.10, 0.10, 0.10, 0.60, 0.55, 0.04, 0.05, 0.40, 0.41, 0.42, 0.43]
    idx, w = _route1(scores, [0.0] * 12, n_group=3, topk_group=1, top_k=2, routed_scaling_factor=1.0)
    assert sorted(idx) == [4, 5]
    got = _as_dict(idx, w)
    assert got[4] == pytest.approx(0.60 / 1.15, abs=HAND_ATOL)
    assert got[5] == pytest.approx(0.55 / 1.15, abs=HAND_ATOL)


def test_route_masks_dropped_groups_with_minus_inf_not_zero():
    scores = [0.50, 0.40, 0.30, 0.20, 0.60, 0.10, 0.35, 0.15]
    bias = [-0.60, -0.70, -0.80, -0.90, -0.75, -0.65, -0.55, -0.95]
    # biased = [-.10, -.30, -.50, -.70, -.15, -.55, -.20, -.80]; groups of two score -.40, -1.20, -.70, -1.00,
    # so groups 0 and 2 are kept and the top 3 of {0: -.10, 1: -.30, 4: -.15, 5: -.55} are experts 0, 4, 1.
    idx, w = _route1(scores, bias, n_group=4, topk_group=2, top_k=3, routed_scaling_factor=2.5)
    assert sorted(idx) == [0, 1, 4]
    got = _as_dict(idx, w)
    for e, s in ((0, 0.50), (4, 0.60), (1, 0.40)):
        assert got[e] == pytest.approx(s / 1.5 * 2.5, abs=HAND_ATOL)

    # the case discriminates: masking with 0 would let the dropped groups' experts (0 > every kept score) win
    biased = torch.tensor(scores) + torch.tensor(bias)
    keep = torch.tensor([True, True, False, False, True, True, False, False])
    zero_masked = biased.masked_fill(~keep, 0.0).topk(3).indices.tolist()
    assert not set(zero_masked) & {0, 1, 4}


def test_route_tied_groups_keep_exactly_topk_group_lower_indices_first():
    # four groups of two, every group score 0.75 (exact in binary): the two kept are groups 0 and 1, so the
    # top 3 come from {0: .5, 1: .25, 2: .625, 3: .125}; keeping every tied group would pick expert 7 (.75),
    # keeping the higher indices experts 7 and 4 / 5
    scores = [0.5, 0.25, 0.625, 0.125, 0.375, 0.375, 0.0, 0.75]
    idx, w = _route1(scores, [0.0] * 8, n_group=4, topk_group=2, top_k=3, routed_scaling_factor=1.0)
    assert idx == [2, 0, 1]
    torch.testing.assert_close(w, torch.tensor([0.625, 0.5, 0.25]) / 1.375, rtol=0, atol=HAND_ATOL)


def test_route_batch_of_tokens_each_routed_independently():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.6, 0.1]])
    w, idx = route(scores, torch.tensor([-0.5, 0.0, 0.0, 0.0]), n_group=2, topk_group=1, top_k=2,
                   routed_scaling_factor=1.0)
    # token 0: biased [.4,.1,.5,.7], groups (.5, 1.2) -> group 1 -> experts 2, 3
    # token 1: biased [-.3,.8,.6,.1], groups (.5, .7) -> group 1 -> experts 2, 3
    assert sorted(idx[0].tolist()) == [2, 3] and sorted(idx[1].tolist()) == [2, 3]
    assert _as_dict(idx[0].tolist(), w[0]) == pytest.approx({2: 0.5 / 1.2, 3: 0.7 / 1.2}, abs=HAND_ATOL)
    assert _as_dict(idx[1].tolist(), w[1]) == pytest.approx({2: 0.6 / 0.7, 3: 0.1 / 0.7}, abs=HAND_ATOL)


def test_bias_never_changes_gate_values_for_the_same_selection():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 16, generator=g)
    kw = dict(n_group=4, topk_group=2, top_k=4, routed_scaling_factor=2.5)
    w0, i0 = route(scores, torch.zeros(16), **kw)
    # a constant bias shifts every biased score and every group score alike: the same experts are selected,
    # and the gates must be bit-identical
    w1, i1 = route(scores, torch.full((16,), -0.37), **kw)
    assert torch.equal(i0, i1)
    assert torch.equal(w0, w1)


def route_reference(scores, bias, n_group, topk_group, top_k, scale):
    """SPEC 1.4 token by token in float64 with Python loops: returns a list of {expert: gate} per token."""
    T, E = scores.shape
    size = E // n_group
    out = []
    for t in range(T):
        s = scores[t].double().tolist()
        b = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(b[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cands = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen = sorted(cands, key=lambda e: -b[e])[:top_k]
        total = sum(s[e] for e in chosen)
        out.append({e: s[e] / total * scale for e in chosen})
    return out


@pytest.mark.parametrize("E,G,TG,K", [(8, 1, 1, 2), (16, 4, 2, 4), (32, 8, 4, 8), (12, 3, 3, 5)])
def test_route_matches_float64_loop_reference_on_random_scores(E, G, TG, K):
    g = torch.Generator().manual_seed(E * 100 + K)
    scores = torch.rand(50, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.2  # mixed-sign biases of the size aux-free balancing reaches
    w, idx = route(scores, bias, n_group=G, topk_group=TG, top_k=K, routed_scaling_factor=2.5)
    ref = route_reference(scores, bias, G, TG, K, 2.5)
    for t in range(50):
        got = _as_dict(idx[t].tolist(), w[t])
        assert got.keys() == ref[t].keys(), f"token {t}"
        # float32 gates vs float64: a few float32 roundings of numbers below 2.5
        assert got == pytest.approx(ref[t], abs=1e-6)


def _random_router(cfg, seed: int) -> Router:
    """A router with N(0, 0.3) weights (well-separated scores) and random biases."""
    torch.manual_seed(seed)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.3)
    randomize_bias_(router, 0.1)
    return router


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_transformers_router(make_cfg, norm_topk_prob):
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                   norm_topk_prob=norm_topk_prob)
    ours = _random_router(cfg, seed=0)
    hf = DeepseekV3TopkRouter(DeepseekV3Config(**cfg.to_dict()))
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(40, cfg.hidden_size)
    r = ours(x)
    _, hf_w, hf_idx = hf(x)
    for t in range(40):
        assert _as_dict(r.topk_idx[t].tolist(), r.weights[t]) == pytest.approx(
            _as_dict(hf_idx[t].tolist(), hf_w[t]), abs=1e-6  # same float32 ops, possibly reordered
        )


def test_router_load_is_bincount_of_dispatched_experts(make_cfg):
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = _random_router(cfg, seed=1)
    r = router(torch.randn(37, cfg.hidden_size))
    assert r.load.dtype == torch.int64
    assert torch.equal(r.load, torch.bincount(r.topk_idx.flatten(), minlength=16))
    assert int(r.load.sum()) == 37 * 4
    # no token dropped, no expert twice for one token
    assert all(len(set(row)) == 4 for row in r.topk_idx.tolist())


def test_router_runs_in_float32_inside_a_bf16_model(make_cfg):
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    torch.manual_seed(2)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    randomize_bias_(moe, 0.1)
    moe.to(torch.bfloat16)
    x = torch.randn(64, cfg.hidden_size).bfloat16()
    _, r = moe(x)
    assert r.scores.dtype == torch.float32 and r.weights.dtype == torch.float32
    # the bf16 inputs and weights multiplied exactly (float64): a float32 router is within a few float32 ulps,
    # a bf16 GEMM or sigmoid would be off by ~1e-3
    ref = torch.sigmoid(x.double() @ moe.gate.weight.double().T)
    assert (r.scores.double() - ref).abs().max().item() < 1e-6
    expected = route_reference(ref, moe.gate.e_score_correction_bias, 4, 2, 4, cfg.routed_scaling_factor)
    for t in range(64):
        assert set(r.topk_idx[t].tolist()) == expected[t].keys()


def test_router_stays_float32_under_autocast(make_cfg):
    # bf16 autocast (float32 master weights, the GPU training recipe) would run a plain F.linear in bf16
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = _random_router(cfg, seed=3)
    x = torch.randn(64, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    ref = torch.sigmoid(x.double() @ router.weight.double().T)
    assert r.scores.dtype == torch.float32
    assert (r.scores.double() - ref).abs().max().item() < 1e-6  # a bf16 GEMM is off by ~1e-3


def _check_bf16_logits(device: str) -> None:
    """_Bf16Logits against float64: forward within float32 rounding; dx and dW the float64 products rounded to
    bf16 in all but a few elements (rounding a float32 sum within a hair of a bf16 tie), and never more than
    one bf16 step (and the split's 2^-17) off. Rounding g to bf16 first (no split) leaves ~40% of them off."""
    torch.manual_seed(0)
    T, d, E = 512, 256, 16
    x = torch.randn(T, d, device=device).bfloat16().requires_grad_()
    w = (torch.randn(E, d, device=device) * 0.05).bfloat16().requires_grad_()
    g = torch.randn(T, E, device=device) * torch.rand(T, 1, device=device) * 0.01
    out = _Bf16Logits.apply(x, w)
    assert out.dtype == torch.float32
    out.backward(g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    bound = (x64.abs() @ w64.abs().T) * 2**-22  # float32 accumulation over d terms, with slack
    assert ((out.detach().double() - x64 @ w64.T).abs() <= bound).all()
    for got, want, mag in ((x.grad, g64 @ w64, g64.abs() @ w64.abs()), (w.grad, g64.T @ x64, g64.abs().T @ x64.abs())):
        assert got.dtype == torch.bfloat16
        assert (got == want.to(torch.bfloat16)).double().mean().item() > 0.99
        # one bf16 step of the result, plus g's dropped bits (2^-17 relative) and float32 sums, over the terms
        assert ((got.double() - want).abs() <= want.abs() * 2**-7 + mag * 2**-15).all()


def test_bf16_router_logits_match_float64():
    # the CPU runs the same split backward with float32 matmuls (the model routes there with F.linear in float32)
    _check_bf16_logits("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_router_logits_match_float64_on_cuda():
    x = torch.randn(4, 8, device="cuda").bfloat16().requires_grad_()
    assert "_Bf16Logits" in type(router_logits(x, torch.randn(3, 8, device="cuda").bfloat16()).grad_fn).__name__
    _check_bf16_logits("cuda")


def test_correction_bias_stays_float32_and_exact_under_bf16_and_fp16(make_cfg, make_model):
    model = make_model(make_cfg(), bias_std=1e-3)  # aux-free updates are gamma = 1e-3 steps
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert before
    # the values are not bf16-representable, so a cast would show
    assert any(not torch.equal(b.bfloat16().float(), b) for b in before.values())
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert model.embed_tokens.weight.dtype == dtype
        for n, b in model.named_buffers():
            if n in before:
                assert b.dtype == torch.float32, n
                assert torch.equal(b, before[n]), n


def experts_reference(x, gate_up, down, idx, weights):
    """sum_k g_k * down_e(silu(gate_e x) * up_e x), one token and one expert at a time, in float64."""
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    inter = down.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += weights[t, k] * (down[e] @ (F.silu(gate) * up))
    return out


def record_few_pairs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Spy on `Experts.few_pairs` (the CUDA decode paths): (tokens, per_pair) of every call, each call run as is."""
    calls, real = [], Experts.few_pairs

    def spy(self, x, r, shared=None, per_pair=True):  # noqa: ANN001, ANN202 - the method's own signature
        calls.append((x.shape[0], per_pair))
        return real(self, x, r, shared, per_pair)

    monkeypatch.setattr(Experts, "few_pairs", spy)
    return calls


def _router_output(idx: torch.Tensor, weights: torch.Tensor, E: int) -> RouterOutput:
    load = torch.bincount(idx.flatten(), minlength=E)
    return RouterOutput(idx, weights, torch.zeros(idx.shape[0], E), load)


def _random_experts(make_cfg, dtype: torch.dtype, K: int, seed: int):
    """An MoE of 6 experts (one group) picking K, with N(0, 0.2) expert weights; returns (cfg, moe, generator)."""
    cfg = make_cfg(n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=K)
    g = torch.Generator().manual_seed(seed)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(torch.randn(moe.experts.gate_up_proj.shape, generator=g) * 0.2)
        moe.experts.down_proj.copy_(torch.randn(moe.experts.down_proj.shape, generator=g) * 0.2)
    return cfg, moe, g


@pytest.mark.parametrize(
    "dtype,tol",
    # float32: grouped GEMM vs float64, sums of 64 products of O(1) numbers -> ~1e-6 relative; float64 (the
    # per-row fallback grouped_mm needs there) agrees to rounding
    [(torch.float32, 1e-5), (torch.float64, 1e-12)],
)
@pytest.mark.parametrize("allowed", [[1, 2, 4], [0, 5], [3]], ids=["middle-gaps", "ends", "one-expert"])
def test_grouped_experts_match_per_expert_loop(make_cfg, dtype, tol, allowed):
    K = min(2, len(allowed))
    cfg, moe, g = _random_experts(make_cfg, dtype, K, seed=3)
    T = 11
    x = torch.randn(T, cfg.hidden_size, generator=g).to(dtype)
    # only `allowed` experts receive tokens: the others (including the first/last) get empty segments
    pool = torch.tensor(allowed)
    idx = torch.stack([pool[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    weights = torch.rand(T, K, generator=g) * 2
    r = _router_output(idx, weights, 6)
    assert (r.load == 0).any()
    got = moe.experts(x, r)
    ref = experts_reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, idx, weights)
    assert got.dtype == dtype
    assert (got.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_grouped_experts_gradients_match_per_expert_loop(make_cfg, dtype, tol):
    # the dispatch and unsort gathers have hand-written backwards (sum of each token's K row gradients, the
    # inverse permutation): every gradient against autograd through the float64 loop
    cfg, moe, g = _random_experts(make_cfg, dtype, 3, seed=5)
    T = 13
    x = torch.randn(T, cfg.hidden_size, generator=g).to(dtype).requires_grad_()
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(T)])
    weights = (torch.rand(T, 3, generator=g, dtype=dtype) * 2).requires_grad_()
    cot = torch.randn(T, cfg.hidden_size, generator=g, dtype=torch.float64)
    (moe.experts(x, _router_output(idx, weights, 6)).double() * cot).sum().backward()
    leaves = [x.detach().double().requires_grad_(), moe.experts.gate_up_proj.detach().double().requires_grad_(),
              moe.experts.down_proj.detach().double().requires_grad_(), weights.detach().double().requires_grad_()]
    (experts_reference(leaves[0], leaves[1], leaves[2], idx, leaves[3]) * cot).sum().backward()
    for got, ref in zip([x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, weights.grad], leaves,
                        strict=True):
        assert (got.double() - ref.grad).abs().max().item() <= tol * ref.grad.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_grouped_experts_gradients_on_cuda(make_cfg):
    # the training path on the GPU: bf16 grouped_mm and the Triton SwiGLU backward, float32 gates as the router
    # gives them; every gradient within bf16 error of autograd through the float64 loop
    cfg, moe, g = _random_experts(make_cfg, torch.bfloat16, 3, seed=6)
    moe.cuda()
    T = 64
    x = torch.randn(T, cfg.hidden_size, generator=g).bfloat16().cuda().requires_grad_()
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(T)]).cuda()
    weights = (torch.rand(T, 3, generator=g) * 2).cuda().requires_grad_()
    cot = torch.randn(T, cfg.hidden_size, generator=g, dtype=torch.float64).cuda()
    (moe.experts(x, _router_output(idx, weights, 6)).double() * cot).sum().backward()
    leaves = [t.detach().double().cpu().requires_grad_()
              for t in (x, moe.experts.gate_up_proj, moe.experts.down_proj, weights)]
    (experts_reference(leaves[0], leaves[1], leaves[2], idx.cpu(), leaves[3]) * cot.cpu()).sum().backward()
    for got, ref in zip([x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, weights.grad], leaves,
                        strict=True):
        err = (got.double().cpu() - ref.grad).abs().max().item()
        assert err <= 3e-2 * ref.grad.abs().max().item(), err


@pytest.mark.parametrize("n_shared", [0, 2])
def test_moe_is_shared_plus_gated_routed_experts(make_cfg, n_shared):
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                   n_shared_experts=n_shared)
    torch.manual_seed(4)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    randomize_bias_(moe, 0.1)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        y, r = moe(x)
    flat = x.reshape(10, -1)
    scores = torch.sigmoid(flat @ moe.gate.weight.T)
    routes = route_reference(scores, moe.gate.e_score_correction_bias, 4, 2, 4, cfg.routed_scaling_factor)
    idx = torch.tensor([list(rt) for rt in routes])
    w = torch.tensor([list(rt.values()) for rt in routes], dtype=torch.float64)
    ref = experts_reference(flat, moe.experts.gate_up_proj, moe.experts.down_proj, idx, w)
    if n_shared:
        s = moe.shared_experts
        assert s.gate_proj.weight.shape[0] == n_shared * cfg.moe_intermediate_size
        ref = ref + (F.silu(flat @ s.gate_proj.weight.T) * (flat @ s.up_proj.weight.T)) @ s.down_proj.weight.T
    else:
        assert moe.shared_experts is None
    # the router's float32 scores give gates within ~1e-7 of the float64 reference
    assert (y.reshape(10, -1) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_moe_with_its_norm_is_moe_of_the_normalised_input(make_cfg):
    """MoE(x, norm=) = MoE(norm(x)) (the block hands the norm over so decode can apply it in the router's launch);
    a hooked norm runs as a module on the block's [B, S, d] input, as it would in the block."""
    cfg = make_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1)
    torch.manual_seed(5)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    norm = RMSNorm(cfg.hidden_size).double()
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64) * 3
    with torch.no_grad():
        want, r_want = moe(norm(x))
        got, r = moe(x, norm=norm)
        assert torch.equal(got, want) and torch.equal(r.topk_idx, r_want.topk_idx)
        shapes = []
        norm.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        assert torch.equal(moe(x, norm=norm)[0], want) and shapes == [(2, 5, cfg.hidden_size)]


def test_route_without_norm_topk_prob_scales_raw_affinities():
    w, idx = route(torch.tensor([[0.9, 0.1, 0.5, 0.7]]), torch.zeros(4), n_group=1, topk_group=1, top_k=2,
                   norm_topk_prob=False, routed_scaling_factor=2.5)
    assert _as_dict(idx[0].tolist(), w[0]) == pytest.approx({0: 0.9 * 2.5, 3: 0.7 * 2.5}, abs=1e-6)


def test_route_groups_of_one_expert():
    # a group of one expert scores that expert (the top-2 sum of one element); SPEC's rule then keeps the best
    g = torch.Generator().manual_seed(0)
    scores, bias = torch.rand(50, 8, generator=g), torch.randn(8, generator=g) * 0.2
    _, idx = route(scores, bias, n_group=8, topk_group=3, top_k=3, routed_scaling_factor=2.5)
    ref = route_reference(scores, bias, 8, 3, 3, 2.5)
    assert all(set(idx[t].tolist()) == set(ref[t]) for t in range(50))


def test_shared_expert_rides_in_the_routed_launches_only_when_its_forward_is_the_plain_product():
    # decode's few_pairs reads the shared expert's weights instead of calling it: only for an MLP of plain
    # bias-free linears without hooks (a LoRA-style wrapper or a hook would be skipped silently), of the routed
    # experts' shape and dtype, and with nothing to train
    from dsv3.fp8.modules import FP8Linear
    from dsv3.model.gemv import plain_linear
    from dsv3.model.moe import _shared_operands

    class Adapted(torch.nn.Linear):  # adds to the product, as a LoRA adapter does
        def forward(self, x):
            return super().forward(x) + 1

    lin = torch.nn.Linear(8, 4, bias=False)
    assert plain_linear(lin) and plain_linear(FP8Linear.from_linear(torch.nn.Linear(128, 128, bias=False)))
    assert not plain_linear(Adapted(8, 4, bias=False)) and not plain_linear(torch.nn.Linear(8, 4))
    hook = lin.register_forward_hook(lambda *a: None)
    assert not plain_linear(lin)
    hook.remove()

    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, hidden_size=32,
                      moe_intermediate_size=16)
    moe = MoE(cfg)

    def rides() -> bool:
        e = moe.experts
        return _shared_operands(moe.shared_experts, e.gate_up_proj, None, e.down_proj, None) is not None

    assert not rides()  # its weights require grad and grad is on
    with torch.no_grad():
        assert rides()
        hook = moe.shared_experts.register_forward_hook(lambda *a: None)
        assert not rides()
        hook.remove()
        moe.shared_experts.up_proj = Adapted(32, 16, bias=False)
        assert not rides()
        moe.shared_experts.up_proj = torch.nn.Linear(32, 16, bias=False).to(torch.float64)
        assert not rides()  # another dtype than the routed experts'


def test_combine_weights_each_of_the_k_rows_and_adds_plus_against_float64():
    # few_pairs' combine (the CUDA decode path): sum_k w[:, k] * y[:, k] + plus, every k with its own gate
    g = torch.Generator().manual_seed(0)
    T, K, d = 5, 4, 12
    y = torch.randn(T, K, d, generator=g)
    w = torch.rand(T, K, generator=g)
    plus = torch.randn(T, d, generator=g)
    want = (y.double() * w.double().unsqueeze(-1)).sum(1)
    torch.testing.assert_close(combine(y, w, torch.float64), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine(y, w, torch.float64, plus=plus), want + plus.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine(y, None, torch.float64), y.double().sum(1), rtol=1e-6, atol=1e-6)


def test_combine_of_bf16_rows_sums_in_float32_and_rounds_once():
    # 8 bf16 rows sum exactly in float32 (and in float64): the result is the exact sum rounded once to bf16,
    # where a bf16 accumulation rounds after every addition
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 8, 32, generator=g).to(torch.bfloat16)
    want = y.double().sum(1).to(torch.bfloat16)
    torch.testing.assert_close(combine(y, None, torch.bfloat16), want, rtol=0, atol=0)
