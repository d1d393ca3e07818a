"""AdamW's one-launch CUDA kernel (dsv3.train.optim.AdamW on the GPU) against AdamW written in float64:
float32 and bf16 parameters, float32 and bf16 moments, tensor sizes around the kernel's block, two groups,
the clipping factor, parameters that skipped a step, and parameters the kernel cannot take. CUDA only."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3.train.optim import AdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BETAS, EPS = (0.9, 0.95), 1e-8
SIZES = [(1,), (1023,), (1024,), (1025,), (8193,), (3, 5000), (64, 129)]  # around the 1024/8192 blocks


def adamw64(p, g, m, v, t: int, lr: float, wd: float, scale: float = 1.0):  # noqa: ANN001, ANN201
    """One AdamW step in float64 from the given state (the paper's formula, not torch's operation order)."""
    p, g, m, v = (x.double().cpu() for x in (p, g, m, v))
    g = g / scale
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    upd = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
    return p * (1 - lr * wd) - lr * upd, m, v


def half_ulp_bound(got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor) -> bool:
    """bf16 round-to-nearest of the float64 value: within half an ulp, plus float32 arithmetic's error, a few
    2^-24 of the magnitudes summed (`terms`: where terms cancel, a value next to a rounding boundary may round
    either way). Truncation, or float64 values rounded twice, would be off by up to a whole ulp."""
    got = got.double().cpu()
    _, exp = torch.frexp(ref)
    half_ulp = torch.ldexp(torch.ones_like(ref), exp - 9)  # ref = mant 2^exp, mant in [0.5, 1): ulp = 2^(exp-8)
    return bool(((got - ref).abs() <= half_ulp + 2.0**-20 * terms + 1e-30).all())


def make(sizes, dtype, gen):  # noqa: ANN001, ANN201
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).cuda()) for s in sizes]


def test_float32_parameters_match_float64_adamw_over_steps():
    gen = torch.Generator().manual_seed(0)
    lr, wd = 0.01, 0.1
    ps = make(SIZES, torch.float32, gen)
    norms = make([(33,)], torch.float32, gen)  # the no-decay group
    opt = AdamW([{"params": ps, "weight_decay": wd}, {"params": norms, "weight_decay": 0.0}], lr=lr,
                betas=BETAS, eps=EPS, moment_dtype=torch.float32)
    ref = {id(p): (p.detach().double().cpu(), torch.zeros(p.shape, dtype=torch.float64),
                   torch.zeros(p.shape, dtype=torch.float64)) for p in ps + norms}
    for t, scale in ((1, None), (2, 3.0), (3, None)):
        opt.grad_scale = None if scale is None else torch.tensor(scale, device="cuda")
        for p in ps + norms:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
            decay = wd if any(p is q for q in ps) else 0.0
            ref[id(p)] = adamw64(*ref[id(p)][:1], p.grad, *ref[id(p)][1:], t, lr, decay, scale or 1.0)
        opt.step()
    assert len(opt._blocks) == 2  # both groups went through the kernel
    for p in ps + norms:
        p64, m64, v64 = ref[id(p)]
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["step"].item() == 3
        # float32 arithmetic: an ulp or two of p per step, plus a few ulps of each update (of size <= ~lr)
        assert torch.allclose(p.detach().double().cpu(), p64, rtol=2.0**-21, atol=3 * lr * 2.0**-18)
        for got, want in ((st["exp_avg"], m64), (st["exp_avg_sq"], v64)):  # sums of terms up to max|want|
            assert torch.allclose(got.double().cpu(), want, rtol=2.0**-20, atol=2.0**-20 * want.abs().max().item())


@pytest.mark.parametrize("dtype,moments", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_bf16_stores_round_to_nearest_from_float64(dtype, moments):
    # One step from a non-zero bf16 state, as in the middle of a run (several steps would let the float32 and
    # float64 moments round to different bf16 neighbours and drift apart by design); large lr and wd, so
    # that each term of the update is many bf16 ulps. Pure bf16 (the peer's setting) and the paper's split.
    gen = torch.Generator().manual_seed(1)
    lr, wd, t = 0.05, 0.5, 5
    ps = make(SIZES, dtype, gen)
    opt = AdamW([{"params": ps, "weight_decay": wd}], lr=lr, betas=BETAS, eps=EPS, moment_dtype=moments)
    want = {}
    for p in ps:
        m0 = (torch.randn(p.shape, generator=gen) * 0.1).to(torch.bfloat16).cuda()
        v0 = (torch.rand(p.shape, generator=gen) * 0.01).to(torch.bfloat16).cuda()
        opt.state[p] = {"step": torch.tensor(float(t - 1)), "exp_avg": m0, "exp_avg_sq": v0}
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype).cuda()
        p64, m64, v64 = adamw64(p.detach(), p.grad, m0, v0, t, lr, wd, scale=2.0)
        decayed = p.detach().double().cpu() * (1 - lr * wd)
        g64 = p.grad.double().cpu() / 2
        p_terms = decayed.abs() + (p64 - decayed).abs()
        m_terms = BETAS[0] * m0.double().cpu().abs() + (1 - BETAS[0]) * g64.abs()
        want[id(p)] = (p64, m64, v64, p_terms, m_terms)
    opt.grad_scale = torch.tensor(2.0, device="cuda")
    opt.step()
    assert len(opt._blocks) == 1
    for p in ps:
        p64, m64, v64, p_terms, m_terms = want[id(p)]
        st = opt.state[p]
        assert p.dtype == dtype and st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        assert half_ulp_bound(st["exp_avg"], m64, m_terms) and half_ulp_bound(st["exp_avg_sq"], v64, v64)
        if dtype == torch.bfloat16:
            assert half_ulp_bound(p.detach(), p64, p_terms)
        else:
            assert torch.allclose(p.detach().double().cpu(), p64, rtol=2.0**-22, atol=lr * 2.0**-18)


def test_skipped_and_unaligned_parameters():
    # a parameter without a gradient on step 1 is one step behind (its own bias correction); a parameter at an
    # address that is not 16-byte aligned (a view 1 element into a buffer) takes the torch path in its step.
    gen = torch.Generator().manual_seed(2)
    lr = 0.01
    a, b = make([(5000,), (300,)], torch.float32, gen)
    buf = torch.randn(1001, generator=gen).cuda()
    c = torch.nn.Parameter(buf[1:])
    assert c.data_ptr() % 16
    opt = AdamW([a, b, c], lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, moment_dtype=torch.float32)
    state = {id(p): (p.detach().double().cpu(), torch.zeros(p.shape, dtype=torch.float64),
                     torch.zeros(p.shape, dtype=torch.float64), 0) for p in (a, b, c)}
    for stepping, scale in (((a, c), None), ((a, b, c), 4.0)):  # the clipping factor reaches both paths
        opt.grad_scale = None if scale is None else torch.tensor(scale, device="cuda")
        for p in (a, b, c):
            p.grad = torch.randn(p.shape, generator=gen).cuda() if any(p is q for q in stepping) else None
        for p in stepping:
            p64, m64, v64, t = state[id(p)]
            state[id(p)] = (*adamw64(p64, p.grad, m64, v64, t + 1, lr, 0.0, scale or 1.0), t + 1)
        opt.step()
    assert [opt.state[p]["step"].item() for p in (a, b, c)] == [2, 1, 2]
    for p in (a, b, c):
        assert torch.allclose(p.detach().double().cpu(), state[id(p)][0], rtol=2.0**-21, atol=2 * lr * 2.0**-18)
    assert len(opt._blocks) == 2  # this step's launches: over (a) and over (b); c always takes the torch path


def test_resume_continues_the_kernel_run_and_a_torch_fused_one():
    # the moments are new tensors after load_state_dict: the kernel must take them, not the old addresses;
    # a torch fused AdamW's state (step counters on the GPU) continues as torch itself would continue it
    gen = torch.Generator().manual_seed(3)
    w0 = make([(3000,), (70,)], torch.float32, gen)
    grads = [[torch.randn(w.shape, generator=gen).cuda() for w in w0] for _ in range(4)]

    def run(opt, ps, steps):  # noqa: ANN001, ANN202
        for gs in steps:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    for first in ("dsv3", "torch fused"):
        ps = [torch.nn.Parameter(w.detach().clone()) for w in w0]
        kw = dict(lr=0.01, betas=BETAS, eps=EPS, weight_decay=0.1)
        opt = AdamW(ps, moment_dtype=None, **kw) if first == "dsv3" else torch.optim.AdamW(ps, fused=True, **kw)
        run(opt, ps, grads[:2])
        saved, at = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]  # as if saved to disk
        run(opt, ps, grads[2:])  # the uninterrupted run
        qs = [torch.nn.Parameter(x) for x in at]
        resumed = AdamW(qs, moment_dtype=None, **kw)
        resumed.load_state_dict(saved)
        run(resumed, qs, grads[2:])
        assert len(resumed._blocks) == 1
        for p, q in zip(ps, qs, strict=True):
            if first == "dsv3":
                assert torch.equal(p, q)  # the same kernel on the same state
            else:
                assert torch.allclose(p, q, rtol=2.0**-21, atol=0.01 * 2.0**-18)


def test_a_state_of_other_shapes_is_refused():
    gen = torch.Generator().manual_seed(4)
    a, b = make([(16,), (4096,)], torch.float32, gen)
    opt = AdamW([a, b], lr=0.01)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    swapped = AdamW([b, a], lr=0.01)  # same group size, the parameters in another order
    with pytest.raises(ValueError, match="another model"):
        swapped.load_state_dict(opt.state_dict())
