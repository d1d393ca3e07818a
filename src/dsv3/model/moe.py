"""DeepSeekMoE (paper §2.1.2, eqs. 12-16): shared experts plus fine-grained routed experts.

The router computes in at least float32 (SPEC 1.4): sigmoid affinities, a selection-only bias, group-limited top-k
with -inf masking, gates = unbiased affinities normalised and scaled. Routed experts are stacked weights
run by grouped GEMM over tokens sorted by expert: no Python loop over experts, no host sync. At decode fewer
(token, expert) pairs than `Experts.max_streamed_pairs` (E // 3; FP8: 5E / 8) stream each pair's expert through
`dsv3.model.gemv` instead, from there up to 64 tokens read each chosen expert once for all its tokens
(`dsv3.model.expert_gemm`), and decode's router runs as two Triton launches (`dsv3.model.router_kernel`) held
to `route` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.expert_gemm import expert_gemm, expert_gemm_supported
from dsv3.model.gemv import Extra, extra_fits, gemv, gemv_supported, plain_linear
from dsv3.model.layers import MLP, defer_norm, norm_inside
from dsv3.model.router_kernel import fused_router, router_kernel_supported
from dsv3.model.swiglu import swiglu

_grouped_mm_kernel = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of x [N, k] times w[e] [k, n]. grouped_mm has no float64 kernel; float64 (the
    reference numerics of the tests) multiplies each row by its own expert's matrix instead."""
    if torch.is_autocast_enabled(x.device.type):
        # autocast does not cover grouped_mm: cast both operands as it casts a linear's (fp32 master weights
        # would otherwise run the experts in fp32, and the compiled graph refuses non-bf16 grouped_mm)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if x.dtype != torch.float64:
        return _grouped_mm_kernel(x, w, offs=offs)
    expert = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device, dtype=offs.dtype), right=True)
    return torch.bmm(x.unsqueeze(1), w[expert]).squeeze(1)


class _Gather(torch.autograd.Function):
    """rows = x.index_select(0, src) where every row of x is read `K` times and `back` inverts the reading:
    rows[back[t*K + k]] are the K copies of x[t] (K=1: `src` is a permutation and `back` its inverse).

    The backward sums each row's K gradients through `back` (a gather, summed in float32 or wider), where
    index_select's own backward scatters with atomic adds: ~18% of a compiled training step on an H200, and
    thread-order dependent on the CPU. Here the sum runs in a fixed order on every device.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, back: torch.Tensor, K: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(back)
        ctx.K = K
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205 - autograd.Function signature
        (back,) = ctx.saved_tensors
        g_rows = g.index_select(0, back)
        if ctx.K > 1:
            g_rows = combine(g_rows.view(-1, ctx.K, g.shape[-1]), None, g.dtype)
        return g_rows, None, None, None


@dataclass
class RouterOutput:
    """What one MoE layer's router decided for its T tokens (all float32 / int64)."""

    topk_idx: torch.Tensor  # [T, K] experts dispatched to (top-K of the biased scores)
    weights: torch.Tensor  # [T, K] gate values g_i (normalised unbiased s_i times routed_scaling_factor)
    scores: torch.Tensor  # [T, E] affinities s_i = sigmoid(u . e_i), for the sequence-wise balance loss
    load: torch.Tensor  # [E] tokens dispatched to each expert (int64), for the aux-free bias update


def route(
    scores: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k over biased scores (eqs. 13-16 with the aux-free bias). Returns (weights, idx).

    Group score = sum of the top-2 biased scores of each contiguous group; experts outside the `topk_group`
    best groups are masked with -inf (not 0: with negative biases a 0 could still be selected). Decode's
    `router_kernel._select_kernel` runs this same selection; tests/model/test_router_kernel.py holds it to this.
    """
    T, E = scores.shape
    biased = scores + bias
    if n_group > 1:
        grouped = biased.view(T, n_group, E // n_group)
        # top-2 sum as max + runner-up (exactly one maximum removed, so tied maxima count twice): plain
        # reductions that torch.compile fuses, where topk launches a selection kernel per call
        best, arg = grouped.max(-1)
        group_scores = best
        if E // n_group > 1:
            group_scores = best + grouped.scatter(-1, arg.unsqueeze(-1), float("-inf")).amax(-1)  # [T, G]
        # keep the topk_group best groups: rank = number of groups ahead (higher score, or equal score and a
        # lower index, so ties resolve to the lower group index and exactly topk_group groups survive)
        s_g, s_h = group_scores.unsqueeze(-1), group_scores.unsqueeze(-2)  # [T, G, 1], [T, 1, G]
        lower = torch.arange(n_group, device=scores.device)
        ahead = (s_h > s_g) | ((s_h == s_g) & (lower.unsqueeze(0) < lower.unsqueeze(1)))
        group_mask = ahead.sum(-1) < topk_group  # [T, G]
        biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    idx = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)  # the bias only selects; gates use the unbiased affinities
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, idx


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 a and b, accumulated and returned in float32: one tensor-core GEMM on CUDA (the products
    of two bf16 numbers are exact in float32; mm.dtype has no autocast rule), the same sums in float32 on the
    CPU (no mm.dtype kernel there; autocast off, or it would run this matmul in bf16)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    with torch.autocast("cpu", enabled=False):
        return torch.mm(a.float(), b.float())


class _Bf16Logits(torch.autograd.Function):
    """x [T, d] @ w [E, d]^T in float32 for bf16 x and w: `_mm_f32`, equal to F.linear(x.float(), w.float()) up
    to the order of the float32 sums, where that runs on CUDA cores (~25 TFLOP/s on an H200: 3% of a `bench`
    training step in pure bf16). The backward keeps the float32 gradient g [T, E] to 16 bits of mantissa by
    splitting it as g_hi + g_lo (both bf16) and multiplying [g_hi | g_lo] by [w; w]: one GEMM with the sum of
    the two halves inside its float32 accumulation, then one rounding to x's bf16 (dW likewise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return _mm_f32(x, w.t())

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205 - autograd.Function signature
        x, w = ctx.saved_tensors
        hi = g.to(torch.bfloat16)
        g2 = torch.cat([hi, (g - hi.float()).to(torch.bfloat16)], dim=1)  # [T, 2E]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm_f32(g2, torch.cat([w, w])).to(x.dtype)
        if ctx.needs_input_grad[1]:
            E = w.shape[0]
            dw2 = _mm_f32(g2.t(), x)  # [2E, d]
            dw = (dw2[:E] + dw2[E:]).to(w.dtype)
        return dx, dw


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u . e_i [T, E] for tokens x [T, d] and router weights w [E, d], in at least float32 whatever the autocast
    (SPEC 1.4): the sigmoid scores decide routing, and bf16 rounding flips near-ties between experts. A float64
    model stays float64, so float64 references hold the router to float64 rounding too."""
    if x.dtype == w.dtype == torch.bfloat16 and x.is_cuda:
        return _Bf16Logits.apply(x, w)
    acc = torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # autocast would run this linear in bf16
        return F.linear(x.to(acc), w.to(acc))


class Router(nn.Module):
    """`mlp.gate`: weight [E, d] and the fp32 buffer `e_score_correction_bias` [E] (not a parameter)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Keep the bias in float32 whatever dtype the model is cast to: aux-free updates of gamma=1e-3 would
        # vanish in bf16. Re-derive from the float32 original rather than round-tripping the value.
        old = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:
            self.e_score_correction_bias = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        if router_kernel_supported(x, self.weight):  # decode: two launches instead of ~28 (router_kernel.py)
            return self._fused(x)[1]
        scores = router_logits(x, self.weight).sigmoid()
        weights, idx = route(
            scores, self.e_score_correction_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
            cfg.norm_topk_prob, cfg.routed_scaling_factor,
        )
        load = torch.zeros(scores.shape[1], dtype=torch.int64, device=x.device)
        load.scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))  # bincount would sync the host
        return RouterOutput(idx, weights, scores, load)

    def normed(self, x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, RouterOutput]:
        """(norm(x), the routing of it) for an RMSNorm `norm`: at decode in the router's one launch, whose
        programs normalise the rows they read and write them for the experts (one launch fewer a layer). A
        router whose forward is not this class's, or that has hooks, is called on norm(x) instead."""
        plain = type(self).forward is Router.forward and not (self._forward_hooks or self._forward_pre_hooks)
        if plain and router_kernel_supported(x, self.weight) and norm_inside(norm):
            return self._fused(x, norm)
        x = norm(x)
        return x, self(x)

    def _fused(self, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """`router_kernel.fused_router` on x (normalised by `norm` inside its launch when given): (the
        normalised rows, empty without a norm, and the routing)."""
        cfg = self.cfg
        weights, idx, scores, load, normed = fused_router(
            x, self.weight, self.e_score_correction_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
            cfg.norm_topk_prob, cfg.routed_scaling_factor, norm_weight=None if norm is None else norm.weight,
            norm_eps=0.0 if norm is None else norm.eps,
        )
        return normed, RouterOutput(idx, weights, scores, load)


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights: gate_up_proj [E, 2I, d] (gate rows first), down_proj [E, d, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, inter))

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as the grouped GEMMs read them; dsv3.fp8's FP8Experts dequantises here."""
        return self.gate_up_proj, self.down_proj

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(gate_up_proj, its scale_inv, down_proj, its scale_inv) as `gemv` streams them; no scales here."""
        return self.gate_up_proj, None, self.down_proj, None

    def max_streamed_pairs(self) -> int:
        """Below this many (token, expert) pairs `few_pairs` streams each pair's expert (`gemv`); from here to
        EXPERT_GEMM_MAX_TOKENS tokens it reads each chosen expert once (`expert_gemm`). A third of the experts:
        below it few pairs share an expert, so both read about the same bytes and streaming's lighter programs win;
        on `bench` (64 experts, top-8; `python -m benchmarks.experts`, H200) per-pair 27.4 us against 28.3 at 2
        tokens (16 pairs), 35.3 against 33.9 at 3 (24 pairs), 75.3 against 60.3 at 8."""
        return max(1, self.gate_up_proj.shape[0] // 3)

    def forward(self, x: torch.Tensor, r: RouterOutput, shared: nn.Module | None = None) -> torch.Tensor:
        """sum_k g_k * expert_{idx_k}(x) (+ shared(x)) for x [T, d]. At decode on CUDA (`few_pairs`): fewer
        (token, expert) pairs than `max_streamed_pairs` stream each pair's expert; up to EXPERT_GEMM_MAX_TOKENS
        tokens read each chosen expert once for all its tokens. Otherwise (`grouped`): sort the T*K pairs by
        expert, run two grouped GEMMs over the contiguous per-expert segments (each pair's gate g_k scaling its
        SwiGLU activations in between), unsort, and sum the K outputs."""
        T, K = r.topk_idx.shape
        if T * K < self.max_streamed_pairs() and gemv_supported(x, self.gate_up_proj, self.down_proj):
            return self.few_pairs(x, r, shared)
        if expert_gemm_supported(x, self.gate_up_proj, self.down_proj):
            return self.few_pairs(x, r, shared, per_pair=False)
        return self.grouped(x, r, shared)

    def grouped(self, x: torch.Tensor, r: RouterOutput, shared: nn.Module | None = None) -> torch.Tensor:
        """`forward`'s sum through grouped GEMMs over the pairs sorted by expert (training, prefill, CPU)."""
        T, K = r.topk_idx.shape
        gate_up_proj, down_proj = self.weights(x.dtype)
        order = r.topk_idx.flatten().argsort(stable=True)  # pair p = t*K + k, sorted by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, device=order.device))
        offs = r.load.cumsum(0).to(torch.int32)  # segment ends, as grouped_mm wants them
        xs = _Gather.apply(x, order // K, inverse, K)  # each token's K copies, in expert order
        h = _grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs)
        # each pair's gate scales its SwiGLU activations (down_proj is linear), so the unsort below is a plain
        # sum and the gates' gradient a sum over I columns there rather than over d here: on an H200 the
        # weighted combine's backward was a 0.5 ms pass per layer over all T*K expert outputs (`bench`, 32K
        # tokens)
        gates = _Gather.apply(r.weights.reshape(-1, 1), order, inverse, 1)  # [T*K, 1], in expert order
        ys = _grouped_mm(swiglu(h, gates), down_proj.transpose(1, 2), offs=offs)
        # unsort with one gather (an index_copy scatter ran ~3x slower on an H200; its backward is the gather
        # by `order`)
        out = combine(_Gather.apply(ys, inverse, order, 1).view(T, K, -1), None, x.dtype)
        return out if shared is None else out + shared(x)

    def few_pairs(
        self, x: torch.Tensor, r: RouterOutput, shared: nn.Module | None = None, per_pair: bool = True,
    ) -> torch.Tensor:
        """The same sum at decode (CUDA, no autograd), without sorting: each pair's expert streamed once by
        `gemv` (per_pair), or each chosen expert read once for all its tokens by `expert_gemm`; gate_up on the
        token's row, down on the SwiGLU of that output computed as it is read, gates applied in the float32
        combine. A shared expert shaped like a routed one rides in the same two launches as one more row per
        token (at batch 1 its own three GEMVs and SwiGLU were four more latency-bound kernels per layer)."""
        T, K = r.topk_idx.shape
        gate_up, gate_up_s, down, down_s = self.gemv_operands()
        inter = gate_up.shape[1] // 2
        ride = shared is not None and _shared_operands(shared, gate_up, gate_up_s, down, down_s)
        extra_gate_up, extra_down = ride if ride else (None, None)
        if per_pair:
            idx = r.topk_idx.flatten()
            h = gemv(x, gate_up, idx, gate_up_s, rows_per_x=K, split=inter, extra=extra_gate_up,
                     extra_rows=T)  # [T*K (+ T), 2I]
            y = gemv(h, down, idx, down_s, swiglu=True, extra=extra_down, extra_rows=T)
        else:
            h = expert_gemm(x, gate_up, r.topk_idx, gate_up_s, split=inter, extra=extra_gate_up)
            y = expert_gemm(h, down, r.topk_idx, down_s, swiglu=True, extra=extra_down)
        if ride:
            return combine(y[: T * K].view(T, K, -1), r.weights, x.dtype, plus=y[T * K :])
        out = combine(y.view(T, K, -1), r.weights, x.dtype)
        return out if shared is None else out + shared(x)


def _shared_operands(
    shared: nn.Module, gate_up: torch.Tensor, gate_up_s: torch.Tensor | None, down: torch.Tensor,
    down_s: torch.Tensor | None,
) -> tuple[Extra, Extra] | None:
    """A shared expert's weights as `gemv` extras beside the routed stacks gate_up [E, 2I, d] and down [E, d, I]
    (gate_proj and up_proj as the two halves of gate_up), or None when they do not fit them (several shared
    experts fused into a wider one; an FP8 model keeping some of them in bf16) or gemv must not read them."""
    if type(shared) is not MLP or shared._forward_hooks or shared._forward_pre_hooks:
        return None  # a subclass or a hook may compute something else: run its own forward
    parts = [shared.gate_proj, shared.up_proj, shared.down_proj]
    if not all(plain_linear(m) for m in parts):
        return None
    if torch.is_grad_enabled() and any(m.weight.requires_grad for m in parts):
        return None  # gemv has no backward
    (g, gs), (u, us), (dn, ds) = [(m.weight, getattr(m, "weight_scale_inv", None)) for m in parts]
    gate_up_extra, down_extra = Extra(g, gs, u, us), Extra(dn, ds)
    inter = gate_up.shape[1] // 2
    # gemv makes the routed scales contiguous, so they are compared as such
    if (extra_fits(gate_up_extra, gate_up, gate_up_s, gate_up.shape[1], split=inter)
            and extra_fits(down_extra, down, down_s, down.shape[1])):
        return gate_up_extra, down_extra
    return None


def combine(
    y: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype, plus: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k weights[:, k] * y[:, k] (a plain sum when `weights` is None) for each token's K rows y [T, K, d],
    plus `plus` [T, d] if given, in float32 (float64 for float64 models), returned in `dtype`. Unrolled over
    the static K so torch.compile emits one pointwise kernel with coalesced row reads; a [T, K, d] reduction
    over K compiled to a 4x slower kernel. Serves the gated combine of the expert outputs and the dispatch's
    backward."""
    acc = torch.promote_types(y.dtype, torch.float32)

    def term(k: int) -> torch.Tensor:
        row = y[:, k].to(acc)
        return row if weights is None else row * weights[:, k : k + 1]

    out = term(0) if plus is None else plus.to(acc) + term(0)
    for k in range(1, y.shape[1]):
        out = out + term(k)
    return out.to(dtype)


class MoE(nn.Module):
    """MoE(u) = shared(u) + sum_{i in TopK} g_i expert_i(u) (eq. 12 without the residual, which the block adds)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """MoE(x), or MoE(norm(x)) for the block's RMSNorm `norm` (at decode inside the router's launch)."""
        x, norm = defer_norm(x, norm)  # a hooked or subclassed norm sees the block's shape
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if norm is None:
            r = self.gate(flat)
        else:
            flat, r = self.gate.normed(flat, norm)
        return self.experts(flat, r, self.shared_experts).view(shape), r
