"""AdamW groups, bf16-moment AdamW against float32 AdamW, clipping, init std, and a tiny model learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dsv3.train.balance import LoadAccumulator, update_bias
from dsv3.train.objective import ObjectiveConfig, compute_loss
from dsv3.train.optim import (
    AdamW,
    build_optimizer,
    clip_grad_norm,
    init_model,
    init_std,
    load_optimizer_state,
    param_groups,
    set_lr,
)


def test_no_decay_group_is_exactly_the_1d_params(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in tiny_model.named_parameters()}
    no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
    decay_names = {by_id[id(p)] for p in decay["params"]}
    assert no_decay_names == {n for n, p in tiny_model.named_parameters() if p.dim() == 1}
    assert all(n.endswith(("norm.weight", "layernorm.weight")) for n in no_decay_names)
    assert decay_names == {n for n, p in tiny_model.named_parameters() if p.dim() >= 2}
    assert "layers.1.mlp.experts.gate_up_proj" in decay_names  # stacked experts are matrices too
    assert not any("e_score_correction_bias" in n for n in decay_names | no_decay_names)
    for bf16 in (False, True):
        opt = build_optimizer(tiny_model, lr=1e-3, bf16_moments=bf16)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
        set_lr(opt, 5e-4)
        assert all(g["lr"] == 5e-4 for g in opt.param_groups)


def _regression(opt_fn, steps: int, lr: float):
    """Least squares 64 x 16 -> 4 from a fixed start; returns (final W, W0, losses)."""
    g = torch.Generator().manual_seed(0)
    A, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
    W0 = torch.randn(16, 4, generator=g) * 0.1
    W = W0.clone().requires_grad_()
    opt = opt_fn([W], lr)
    losses = []
    for _ in range(steps):
        loss = ((A @ W - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return W.detach(), W0, losses, opt


def _torch_adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_float32_moment_adamw_equals_torch_adamw():
    """The slow twin: with float32 moments our AdamW is torch's AdamW step for step."""
    W_ref, _, _, _ = _regression(_torch_adamw, 50, 1e-2)
    W, _, _, _ = _regression(lambda p, lr: AdamW(p, lr=lr, moment_dtype=torch.float32), 50, 1e-2)
    assert torch.allclose(W, W_ref, atol=1e-6, rtol=0)


def test_bf16_moments_stay_close_to_float32_adamw():
    """Bound on bf16 moments vs float32 AdamW over N = 200 steps at lr = 1e-2.

    Worst case: each stored moment is rounded to 2^-9 relative per step, and the rounding errors decay with
    beta, so m is off by at most 2^-9 / (1 - 0.9) ~ 2% and v by 2^-9 / (1 - 0.95) ~ 4% (2% after the sqrt):
    each step's update is off by at most ~4% of lr, so |W_bf16 - W_fp32| <= 0.04 * N * lr = 0.08. Rounding
    errors are unbiased, so in practice the gap is far smaller: we also require < 1% of the distance the
    weights travel and the loss curves to agree to 1e-3 relative at every step.
    """
    N, lr = 200, 1e-2
    W_ref, W0, loss_ref, _ = _regression(_torch_adamw, N, lr)
    W, _, losses, opt = _regression(lambda p, lr: AdamW(p, lr=lr, moment_dtype=torch.bfloat16), N, lr)
    st = next(iter(opt.state.values()))
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    assert W.dtype == torch.float32  # the master weights
    gap = (W - W_ref).abs().max().item()
    travel = (W_ref - W0).abs().max().item()
    assert 0 < gap <= 0.04 * N * lr  # nonzero: the moments really were rounded
    assert gap < 0.01 * travel, f"gap {gap:.2e} vs travel {travel:.2e}"
    assert max(abs(a - b) / a for a, b in zip(losses, loss_ref, strict=True)) < 1e-3
    assert losses[-1] < 0.7 * losses[0]  # it did optimise


def test_bf16_adamw_state_dict_round_trip_is_exact():
    """Resuming from a state dict continues bit-identically and keeps the moments in bf16 (torch's
    load_state_dict would otherwise cast them to the parameters' float32)."""
    torch.manual_seed(0)
    A, y = torch.randn(32, 8), torch.randn(32, 2)

    def steps(W, opt, n):
        for _ in range(n):
            opt.zero_grad()
            ((A @ W - y) ** 2).mean().backward()
            opt.step()

    W = torch.zeros(8, 2, requires_grad=True)
    opt = AdamW([W], lr=1e-2)
    steps(W, opt, 5)
    saved_W, saved = W.detach().clone(), copy.deepcopy(opt.state_dict())  # as if saved to disk
    steps(W, opt, 5)
    W2 = saved_W.clone().requires_grad_()
    opt2 = AdamW([W2], lr=1e-2)
    opt2.load_state_dict(saved)
    st = opt2.state[W2]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    steps(W2, opt2, 5)
    assert torch.equal(W2, W)


def test_clip_grad_norm_returns_the_pre_clip_norm():
    a = torch.nn.Linear(2, 1, bias=False)
    b = torch.nn.Linear(1, 1, bias=False)
    model = torch.nn.ModuleList([a, b])
    a.weight.grad = torch.tensor([[3.0, 0.0]])
    b.weight.grad = torch.tensor([[4.0]])
    norm = clip_grad_norm(model, 1.0)
    assert abs(norm.item() - 5.0) < 1e-6  # sqrt(3^2 + 4^2)
    assert torch.allclose(a.weight.grad, torch.tensor([[0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(b.weight.grad, torch.tensor([[0.8]]), atol=1e-6)
    a.weight.grad = torch.tensor([[0.3, 0.0]])
    b.weight.grad = torch.tensor([[0.4]])
    assert abs(clip_grad_norm(model, 1.0).item() - 0.5) < 1e-6
    assert torch.allclose(a.weight.grad, torch.tensor([[0.3, 0.0]]))  # below the threshold: untouched


@pytest.mark.parametrize("impl", ["torch fused", "dsv3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_clips_inside_its_step_as_clip_grad_norm_does(dtype, impl):
    # The fused path only computes the norm and hands 1/c to the optimiser's step as `grad_scale` (torch's fused
    # AdamW, and ours on any device). Adam is blind to one step's gradient scale, so two steps: a clipped one
    # (norm ~30), then one below the threshold.
    g = torch.Generator().manual_seed(0)
    w0 = [torch.randn(5, 7, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    grads = [[(torch.randn(w.shape, generator=g) * s).to(dtype) for w in w0] for s in (5.0, 0.1)]
    params = {}
    for mode in ("clip_", "fused", "unclipped"):
        model = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in w0])
        if impl == "dsv3":
            opt = AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, moment_dtype=None)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        for step_grads in grads:
            for p, gr in zip(model, step_grads, strict=True):
                p.grad = gr.clone()
            if mode != "unclipped":  # "clip_": torch's in-place clipping, then the same fused step
                norm = clip_grad_norm(model, 1.0, opt if mode == "fused" else None)
                want = math.sqrt(sum((gr.double() ** 2).sum().item() for gr in step_grads))
                assert norm.item() == pytest.approx(want, rel=1e-6 if dtype == torch.float32 else 2**-8)
            opt.step()
            opt.grad_scale = None
        params[mode] = torch.cat([p.detach().flatten() for p in model])
    # g * c against g / (1/c) inside the kernel: float32 roundings apart, then the same update
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: at most one ulp of parameters of order 1
    assert torch.allclose(params["fused"].float(), params["clip_"].float(), rtol=0, atol=tol)
    assert (params["unclipped"].float() - params["clip_"].float()).abs().max().item() > 2 * tol  # clipping mattered


@pytest.mark.parametrize("loader", ["load_state_dict", "load_optimizer_state"])
def test_resuming_a_non_fused_state_with_a_fused_adamw(loader):
    # A CPU run's state (fused=None) resumed by a fused AdamW (the loop on CUDA; CPU fused stands in here).
    # Plain load_state_dict restores the groups' fused=None: the step is then not fused and clip_grad_norm must
    # clip in place, not hand over grad_scale. load_optimizer_state (what the loop uses) gives the groups this
    # optimiser's flag before torch places the step counters, and the fused step gets grad_scale.
    def make(fused):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 4)
        return m, torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused)

    m0, o0 = make(None)
    for p in m0.parameters():
        p.grad = torch.randn_like(p) * 10
    o0.step()
    m1, o1 = make(True)
    m1.load_state_dict(m0.state_dict())
    if loader == "load_state_dict":
        o1.load_state_dict(o0.state_dict())
    else:
        load_optimizer_state(o1, o0.state_dict())
        assert o0.state_dict()["param_groups"][0]["fused"] is None  # the saved state itself is left alone
    fused = loader == "load_optimizer_state"
    assert o1.defaults["fused"] and all(bool(g["fused"]) == fused for g in o1.param_groups)
    for p in m1.parameters():
        p.grad = torch.randn_like(p) * 10
    clip_grad_norm(m1, 1.0, o1)
    assert (getattr(o1, "grad_scale", None) is not None) == fused
    if not fused:
        norm = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in m1.parameters()))
        assert norm == pytest.approx(1.0, rel=1e-5)
    o1.step()
    assert all(o1.state[p]["step"].item() == 2 for p in m1.parameters())


def test_init_std_scales_with_width(tiny_cfg):
    assert init_std(tiny_cfg.replace(hidden_size=7168)) == pytest.approx(0.006, rel=1e-12)
    assert init_std(tiny_cfg.replace(hidden_size=256)) == pytest.approx(0.006 * math.sqrt(28), rel=1e-12)
    assert init_std(tiny_cfg) == pytest.approx(0.006 * math.sqrt(224), rel=1e-12)  # 0.0898 at hidden 32
    # 0.006 x sqrt(7168) = 0.508: std x sqrt(fan-in) is the same at every width
    for d in (32, 256, 2048, 7168):
        assert init_std(tiny_cfg.replace(hidden_size=d)) * math.sqrt(d) == pytest.approx(0.50797, rel=1e-4)


def test_init_model(tiny_model):
    with torch.no_grad():
        for r in tiny_model.modules():
            if hasattr(r, "e_score_correction_bias"):
                r.e_score_correction_bias.fill_(0.5)
    std = init_model(tiny_model)
    assert std == pytest.approx(0.006 * math.sqrt(7168 / 32))
    big = tiny_model.layers[1].mlp.experts.gate_up_proj  # 8 x 32 x 32 = 8192 samples
    assert abs(big.std().item() - std) < 0.05 * std and abs(big.mean().item()) < 0.05 * std
    assert all(torch.equal(p, torch.ones_like(p)) for p in tiny_model.parameters() if p.dim() == 1)
    assert all(not r.e_score_correction_bias.any() for r in tiny_model.modules()
               if hasattr(r, "e_score_correction_bias"))


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_tiny_model_loss_decreases_on_a_fixed_batch(tiny_model, bf16_moments):
    """Sanity: the whole step (loss with MTP and balance, backward, clip, AdamW, bias update) learns."""
    init_model(tiny_model)
    opt = build_optimizer(tiny_model, lr=1e-2, bf16_moments=bf16_moments)
    objective = ObjectiveConfig()
    torch.manual_seed(0)
    tokens = torch.randint(0, tiny_model.cfg.vocab_size, (4, 17))
    acc = LoadAccumulator()
    ntp = []
    for _ in range(30):
        out = tiny_model(tokens[:, :-1])
        parts = compute_loss(out, tokens, objective, mtp_lambda=0.3)
        acc.add(out.router)
        opt.zero_grad()
        parts.loss.backward()
        norm = clip_grad_norm(tiny_model, 1.0)
        assert math.isfinite(norm.item())
        opt.step()
        update_bias(tiny_model, acc.take(), gamma=0.001)
        ntp.append(parts.ntp.item())
    assert ntp[0] == pytest.approx(math.log(tiny_model.cfg.vocab_size), rel=0.1)  # uniform at init
    assert ntp[-1] < 0.5 * ntp[0], ntp


def test_a_torch_adamw_state_resumes_in_ours():
    # Runs saved before the GPU loop moved from torch's fused AdamW to ours: the same state keys; the step
    # counters (on the device in a fused checkpoint) come back as CPU scalars, and the run continues as torch's
    # own AdamW would have continued it.
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 3)
    grads = [[torch.randn_like(p) for p in ref.parameters()] for _ in range(4)]
    ours = copy.deepcopy(ref)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)

    def step(model, opt, gs):  # noqa: ANN001, ANN202
        for p, g in zip(model.parameters(), gs, strict=True):
            p.grad = g.clone()
        opt.step()

    for gs in grads[:2]:
        step(ref, t_opt, gs)
    ours.load_state_dict(ref.state_dict())
    o_opt = AdamW(ours.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, moment_dtype=None)
    o_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    assert all(st["step"].device.type == "cpu" and st["step"].item() == 2 for st in o_opt.state.values())
    for gs in grads[2:]:
        step(ref, t_opt, gs)
        step(ours, o_opt, gs)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_a_copied_adamw_keeps_its_moment_dtype_and_steps():
    # torch pickles an optimiser's defaults, state and groups only; ours also needs moment_dtype and its caches
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([w], lr=0.1, moment_dtype=torch.float32)
    twin = copy.deepcopy(opt)
    assert twin.moment_dtype == torch.float32 and twin.grad_scale is None
    w2 = twin.param_groups[0]["params"][0]
    w2.grad = torch.ones(3)
    twin.step()
    assert twin.state[w2]["exp_avg"].dtype == torch.float32 and torch.all(w2 < 1)
