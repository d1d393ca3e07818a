"""Decode's router (eqs. 13-16 with the aux-free bias) in two Triton launches: affinities, then selection.

Eagerly, routing a few tokens is a chain of ~28 small launches per MoE layer (the aten ops of a bf16 token:
weight cast, GEMV, sigmoid, group maxima, rank mask, topk, gather, normalise, scale, load scatter), each a few
microseconds of almost no work. Here, for at most ROUTER_MAX_ROWS tokens:

1. `_logits_kernel`: u . e_i in float32, the gate weight read once in its stored dtype (no float32 copy per
   step). Program (expert tile, split) dots its [BLOCK_E, d / SPLIT] slab with every token's row; the split
   over d spreads V3's E=256 x d=7168 gate over as many programs as the device has SMs. Given the block's
   RMSNorm, each program first sums its rows' squares over the whole of d (a few KB from L2) and normalises
   the columns it reads as `layers.RMSNorm` does, and the first expert tile's programs write the normalised
   rows for the experts: the norm needs no launch of its own.
2. `_select_kernel`: a program per token sums the splits, writes s_i = sigmoid(.), and runs `moe.route` on
   [groups, experts per group] tiles: per-group top-2 sums of the biased scores, the `topk_group` best groups
   kept (ties to the lower group index), -inf elsewhere, then K rounds of argmax (ties to the lower expert
   index) gathering the unbiased s_i, normalised and scaled; the per-expert load is counted in registers and
   added to counts the logits kernel zeroed (integers: any order gives the same sum; one token stores its own).
   One token's ~3 us on an H200 are the launch's wait and memory round trips, not the K rounds: neither top-K
   as one rank count nor selecting in the logits kernel's last program (an atomic count of finished programs)
   was faster (BENCHMARKS.md, eleventh session). One program for all of 8 tokens took 23 us: the rounds'
   reductions are serial within a program (BENCHMARKS.md, seventeenth session).

`moe.route` is the reference (CPU, training, many tokens); tests/model/test_router_kernel.py holds this to it.
CUDA only (Triton); `Router.forward` keeps the general path elsewhere (`router_kernel_supported`). Not
differentiable: decode only.
"""

from __future__ import annotations

import torch

from dsv3.model import pdl
from dsv3.model.pdl import pdl_prefetch_rows, pdl_release, pdl_wait

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: Router.forward's general path runs
    triton = None

# One selection program holds [T, E] tiles, so the fused path stops here (small-batch decode); more rows
# take `moe.route`, whose launches no longer dominate there.
ROUTER_MAX_ROWS = 16
# Accumulator elements of a logits program ([BLOCK_T, BLOCK_E, BLOCK_K] float32): 32 registers a thread at 8 warps.
_ACC_ELEMS = 8192


@torch.compiler.assume_constant_result
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device. A constant of the device: torch.compile folds it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    """The least power of two >= n (Triton's tiles are powers of two). Plain Python, so torch.compile folds it."""
    p = 1
    while p < n:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _select_warps(elems: int) -> int:
    """Warps of the selection program over `elems` scores: its K rounds of max / min / sum reductions stay
    within one warp's shuffles up to 16 values a lane (a decode token's 64 or 256 experts), where more warps
    would meet in shared memory at every reduction."""
    return 1 if elems <= 512 else 4 if elems <= 4096 else 8


def router_kernel_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fused_router` runs for activations x [T, d] and gate weight [E, d]: CUDA with Triton, 1 to
    ROUTER_MAX_ROWS tokens, 16- or 32-bit floats (the router computes in float32 there; float64 models route
    in float64 through `moe.route`), and nothing autograd would need a gradient for (no backward)."""
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if triton is None or not x.is_cuda or x.dim() != 2 or not 1 <= x.shape[0] <= ROUTER_MAX_ROWS:
        return False
    if x.dtype not in floats or weight.dtype not in floats:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


if triton is not None:

    @triton.jit
    def _logits_kernel(
        x_ptr, w_ptr, z_ptr, nw_ptr, hn_ptr, load_ptr, T, E, D, CHUNK, stride_xt, stride_we, eps,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RMS_BLOCK: tl.constexpr,
        NORM: tl.constexpr, ZERO_LOAD: tl.constexpr, BLOCK_LOAD: tl.constexpr, LINE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        split = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        t_ok, e_ok = offs_t < T, offs_e < E
        x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt
        w_rows = w_ptr + offs_e[:, None].to(tl.int64) * stride_we
        # the gate weight is constant: this split's columns on their way to L2 before waiting for x
        pdl_prefetch_rows(tl.where(e_ok[:, None], w_rows, w_ptr) + split * CHUNK,
                          tl.minimum(CHUNK, D - split * CHUNK), LINE, PDL)
        pdl_wait(PDL)
        if ZERO_LOAD:  # the selection's programs, one a token, add their counts to these (after this kernel)
            if (tl.program_id(0) == 0) & (split == 0):
                offs_l = tl.arange(0, BLOCK_LOAD)
                tl.store(load_ptr + offs_l, tl.zeros([BLOCK_LOAD], dtype=tl.int64), mask=offs_l < E)
        if NORM:  # each program sums its rows' squares over the whole of d itself (a few KB from L2)
            sq = tl.zeros([BLOCK_T, RMS_BLOCK], dtype=tl.float32)
            for r0 in range(0, D, RMS_BLOCK):
                offs_r = r0 + tl.arange(0, RMS_BLOCK)
                v = tl.load(x_rows + offs_r[None, :], mask=t_ok[:, None] & (offs_r < D)[None, :], other=0.0)
                sq += v.to(tl.float32) * v.to(tl.float32)
            rstd = tl.rsqrt((tl.sum(sq, axis=1) / D + eps).to(tl.float32))  # eps: a float64 under torch.compile
        # elementwise products summed over d, one cross-lane sum at the end (gemv.py: a sum per step left the
        # kernel latency-bound); each weight tile is loaded once and serves every token
        acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, CHUNK, BLOCK_K):
            offs_k = split * CHUNK + k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D
            w = tl.load(w_rows + offs_k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_rows + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:  # layers.RMSNorm's roundings: to x's dtype after 1/rms, to the output's after the weight
                x = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
                x = (tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :] * x).to(
                    hn_ptr.dtype.element_ty)
                if tl.program_id(0) == 0:  # the first expert tile's programs hand the rows on to the experts
                    tl.store(hn_ptr + offs_t[:, None] * D + offs_k[None, :], x, mask=t_ok[:, None] & k_ok[None, :])
            x = x.to(tl.float32)
            acc += x[:, None, :] * w[None, :, :]
        pdl_release(PDL)
        z = tl.sum(acc, axis=2)
        tl.store(z_ptr + (split * T + offs_t[:, None]) * E + offs_e[None, :], z, mask=t_ok[:, None] & e_ok[None, :])

    @triton.jit
    def _select_kernel(
        z_ptr, bias_ptr, scores_ptr, weights_ptr, idx_ptr, load_ptr, T, routed_scaling_factor,
        SPLIT: tl.constexpr, E: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
        TOP_K: tl.constexpr, NORM_TOPK_PROB: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
        ADD_LOAD: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        pdl_release(PDL)
        # [token, group, expert in group] tiles; powers of two, so lanes past the real shape are masked (their
        # e = g * GROUP_SIZE + j can alias a real expert of the next group: every use below masks with e_ok).
        # Program i selects for tokens i * BLOCK_T on (one token a program: see fused_router)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
        g = tl.arange(0, BLOCK_G)[None, :, None]
        j = tl.arange(0, BLOCK_S)[None, None, :]
        e = g * GROUP_SIZE + j
        e_ok = (g < N_GROUP) & (j < GROUP_SIZE)
        ok = e_ok & (t < T)
        z = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_S], dtype=tl.float32)
        for split in tl.static_range(SPLIT):  # unrolled: the loads issue together, not one latency each
            z += tl.load(z_ptr + (split * T + t) * E + e, mask=ok, other=0.0)
        # s_i = sigmoid(z) as torch writes it, 1 / (1 + exp(-z)), with an IEEE division (Triton's `/` is 2 ulp)
        s = tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp(-z))
        tl.store(scores_ptr + t * E + e, s, mask=ok)
        biased = tl.where(ok, s + tl.load(bias_ptr + e, mask=e_ok, other=0.0), float("-inf"))

        if TOPK_GROUP < N_GROUP:  # route() keeps every group when all are kept (n_group = 1 included)
            # group score: max + the max after removing exactly one maximum (tied maxima count twice)
            best = tl.max(biased, axis=2)
            group_score = best
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(biased == best[:, :, None], j, BLOCK_S), axis=2)
                group_score = best + tl.max(tl.where(j == first[:, :, None], float("-inf"), biased), axis=2)
            # keep groups with fewer than topk_group groups ahead (higher score, or equal and a lower index)
            s_g, s_h = group_score[:, :, None], group_score[:, None, :]
            h = tl.arange(0, BLOCK_G)[None, None, :]
            ahead = ((s_h > s_g) | ((s_h == s_g) & (h < g))) & (h < N_GROUP)
            kept = tl.sum(ahead.to(tl.int32), axis=2) < TOPK_GROUP
            biased = tl.where(kept[:, :, None], biased, float("-inf"))  # -inf, not 0: SPEC 1.4

        # top-K of the biased scores, in descending order as topk returns them; padding lanes start taken
        taken = ~ok
        k = tl.arange(0, BLOCK_K)[None, :]
        gates = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        picks = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        load = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.int32)
        for r in tl.static_range(TOP_K):
            top = tl.max(tl.max(tl.where(taken, float("-inf"), biased), axis=2), axis=1)
            hit = ~taken & (biased == top[:, None, None])
            pick = tl.min(tl.min(tl.where(hit, e, E), axis=2), axis=1)  # ties to the lower expert index
            chosen = (e == pick[:, None, None]) & e_ok
            taken = taken | chosen
            gate = tl.sum(tl.sum(tl.where(chosen, s, 0.0), axis=2), axis=1)  # the bias only selects
            gates = tl.where(k == r, gate[:, None], gates)
            picks = tl.where(k == r, pick[:, None], picks)
            load += tl.sum(chosen.to(tl.int32), axis=0)
        if NORM_TOPK_PROB:
            gates = tl.math.div_rn(gates, tl.sum(gates, axis=1)[:, None] + 1e-20)
        gates = gates * routed_scaling_factor

        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        out_ok = (rows < T) & (k < TOP_K)
        tl.store(weights_ptr + rows * TOP_K + k, gates, mask=out_ok)
        tl.store(idx_ptr + rows * TOP_K + k, picks.to(tl.int64), mask=out_ok)
        g2, j2 = tl.arange(0, BLOCK_G)[:, None], tl.arange(0, BLOCK_S)[None, :]
        load_ok = (g2 < N_GROUP) & (j2 < GROUP_SIZE)
        if ADD_LOAD:  # integer counts: the sum is the same in any order
            tl.atomic_add(load_ptr + g2 * GROUP_SIZE + j2, load.to(tl.int64), mask=load_ok, sem="relaxed")
        else:
            tl.store(load_ptr + g2 * GROUP_SIZE + j2, load.to(tl.int64), mask=load_ok)


def _outputs(
    x: torch.Tensor, n_experts: int, top_k: int, norm_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (weights [T, K] float32, idx [T, K] int64, scores [T, E] float32, load [E] int64, normed: [T, d] in
    RMSNorm's output dtype, or [0, d] without a norm): what `fused_router` returns, for it and its fake alike."""
    T, d = x.shape
    f32, i64 = torch.float32, torch.int64
    normed = x.new_empty(0 if norm_weight is None else T, d,
                         dtype=x.dtype if norm_weight is None else torch.promote_types(norm_weight.dtype, x.dtype))
    return (x.new_empty(T, top_k, dtype=f32), x.new_empty(T, top_k, dtype=i64), x.new_empty(T, n_experts, dtype=f32),
            x.new_empty(n_experts, dtype=i64), normed)


def _fused_router_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
    norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0, split: int | None = None,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _outputs(x, weight.shape[0], top_k, norm_weight)


@pdl.launched_here("fused_router", _fused_router_shape)
def fused_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    split: int | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, idx [T, K] int64, scores [T, E] float32, load [E] int64, normed) of
    `Router.forward`: s = sigmoid(x weight^T) in float32, then `moe.route(s, bias, ...)` and the per-expert
    token counts.

    norm_weight, norm_eps: route RMSNorm(x) instead (`layers.RMSNorm` with this weight and eps, its roundings
    included), returned as `normed` [T, d] for the experts; without them `normed` is empty ([0, d]).
    split: programs along d per expert tile (default: enough to give every SM one); tests force ragged ones.
    """
    T, d = x.shape
    E = weight.shape[0]
    if (weight.shape[1] != d or bias.shape != (E,) or E % n_group or not 1 <= topk_group <= n_group
            or (norm_weight is not None and norm_weight.shape != (d,))):
        raise ValueError(f"fused_router: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                         f"n_group={n_group}, topk_group={topk_group}"
                         + ("" if norm_weight is None else f", RMSNorm weight {tuple(norm_weight.shape)}")
                         + " do not fit")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.to(torch.float32).contiguous()
    # tile sizes are first guesses, not yet swept on a GPU: 8 experts a program share each token row's load
    block_t = _pow2(T)
    block_e = min(8, _pow2(E))
    block_k = max(32, min(256, _ACC_ELEMS // (block_t * block_e)))
    tiles, k_blocks = _cdiv(E, block_e), _cdiv(d, block_k)
    if split is None:
        split = max(1, _sm_count(x.device) // tiles)
    chunk = _cdiv(k_blocks, max(1, min(split, k_blocks))) * block_k  # a multiple of block_k
    split = _cdiv(d, chunk)  # no empty splits
    z = torch.empty(split, T, E, dtype=torch.float32, device=x.device)
    norm = norm_weight is not None
    weights, idx, scores, load, normed = _outputs(x, E, top_k, norm_weight)
    add_load = T > 1  # the selection's programs add their counts to `load`, which the logits kernel zeroes
    _logits_kernel[(tiles, split)](
        x, weight, z, norm_weight.contiguous() if norm else x, normed if norm else x, load, T, E, d, chunk,
        x.stride(0), weight.stride(0), float(norm_eps), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
        RMS_BLOCK=min(_pow2(d), max(block_k, _ACC_ELEMS // block_t)), NORM=norm, ZERO_LOAD=add_load,
        BLOCK_LOAD=_pow2(E),
        num_warps=4 if block_t * block_e * block_k <= 1024 else 8, LINE=128 // weight.element_size(),
        **pdl.launch(x.device),
    )
    group_size = E // n_group
    block_g, block_s = _pow2(n_group), _pow2(group_size)
    # one program a token: the K rounds are serial reductions, so a single program over all T tokens took
    # 23 us at `bench`'s 8 tokens on an H200 (3 us at one)
    _select_kernel[(T,)](
        z, bias, scores, weights, idx, load, T, float(routed_scaling_factor),
        SPLIT=split, E=E, N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group, TOP_K=top_k,
        NORM_TOPK_PROB=norm_topk_prob, BLOCK_T=1, BLOCK_G=block_g, BLOCK_S=block_s,
        BLOCK_K=_pow2(top_k), ADD_LOAD=add_load, num_warps=_select_warps(block_g * block_s), **pdl.launch(x.device),
    )
    return weights, idx, scores, load, normed
