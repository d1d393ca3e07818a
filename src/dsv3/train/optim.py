"""Optimiser, gradient clipping and initialisation (paper §3.3.4 and §4.2; SPEC 2 and 4).

AdamW with beta = (0.9, 0.95) and weight decay 0.1, none on the 1-D parameters (RMSNorm weights; the model
has no linear biases). The aux-free `e_score_correction_bias` is a buffer, so it is never in a group.
The paper keeps the AdamW moments in BF16 and the master weights, gradients and the update in FP32
(§3.3.4); `AdamW(moment_dtype=torch.bfloat16)` does exactly that: the model's own float32 parameters are
the master weights (autocast makes the bf16 copies for the matmuls), each moment is read into float32,
updated, and rounded back to bf16 for storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: AdamW runs its torch path
    triton = None

from dsv3.config import ModelConfig

V3_INIT_STD = 0.006
V3_HIDDEN = 7168


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups: matrices (and the stacked [E, out, in] experts) with decay, 1-D parameters without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        p_base, m_base, off_tab, numel_tab, blk_tensor, blk_start, scale_ptr, n_tensors,
        decay, step_size, w1, beta2, w2, eps, bc2_sqrt,
        HAS_SCALE: tl.constexpr, P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        # Program b updates elements [start, start + BLOCK) of tensor t. Every tensor is addressed as an offset
        # (in elements) from an argument pointer of its dtype: p and g from p_base, m and v from m_base. Their
        # 16-byte alignment (checked on the host) lets the loads vectorise as for argument pointers; a tensor's
        # full blocks run unmasked, only its last one masked.
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        start = tl.load(blk_start + b)
        n = tl.load(numel_tab + t)
        lane = tl.arange(0, BLOCK)
        p_off, g_off = tl.load(off_tab + t), tl.load(off_tab + n_tensors + t)
        m_off, v_off = tl.load(off_tab + 2 * n_tensors + t), tl.load(off_tab + 3 * n_tensors + t)
        for i in range(ITERS):  # ITERS blocks per program: the table lookups above are paid once
            s = start + i * BLOCK
            po = tl.max_contiguous(tl.multiple_of(p_off + s + lane, P_ALIGN), BLOCK)
            go = tl.max_contiguous(tl.multiple_of(g_off + s + lane, P_ALIGN), BLOCK)
            mo = tl.max_contiguous(tl.multiple_of(m_off + s + lane, M_ALIGN), BLOCK)
            vo = tl.max_contiguous(tl.multiple_of(v_off + s + lane, M_ALIGN), BLOCK)
            if s + BLOCK <= n:
                _adamw_update(p_base + po, p_base + go, m_base + mo, m_base + vo, None, scale_ptr,
                              decay, step_size, w1, beta2, w2, eps, bc2_sqrt, HAS_SCALE)
            elif s < n:
                _adamw_update(p_base + po, p_base + go, m_base + mo, m_base + vo, s + lane < n, scale_ptr,
                              decay, step_size, w1, beta2, w2, eps, bc2_sqrt, HAS_SCALE)

    @triton.jit
    def _adamw_update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, ok, scale_ptr, decay, step_size, w1, beta2, w2, eps,
                      bc2_sqrt, HAS_SCALE: tl.constexpr):
        g = tl.load(g_ptrs, mask=ok).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(scale_ptr))
        m = tl.load(m_ptrs, mask=ok).to(tl.float32)
        v = tl.load(v_ptrs, mask=ok).to(tl.float32)
        p = tl.load(p_ptrs, mask=ok).to(tl.float32)
        # torch.optim.AdamW's single-tensor step, operation for operation (w1 = 1 - beta1: lerp's small-weight
        # form; w2 = 1 - beta2), rounded to float32 on the host as torch does
        m = m + w1 * (g - m)
        v = v * beta2 + w2 * (g * g)
        p = p * decay
        p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=ok)
        tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty), mask=ok)
        tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=ok)


# (elements per inner step, inner steps per program, warps) by (parameter, moment) element size, the fastest of
# a sweep on the H200 (benchmarks/optim.py): ~8 bf16 elements per thread (16 ran ~1.8x slower)
_KERNEL_CONFIG = {(2, 2): (1024, 8, 4), (4, 2): (8192, 1, 16), (4, 4): (1024, 1, 4)}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class AdamW(torch.optim.Optimizer):
    """Decoupled AdamW (Loshchilov & Hutter) with moments stored in `moment_dtype`, math in float32.

    Per parameter p with gradient g at step t (as torch.optim.AdamW, so the float32 variant matches it):
        p  <- p * (1 - lr * wd)
        m  <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        p  <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    With bf16 moments each store rounds m and v by at most 2^-9 relative; old roundings decay with beta, so
    m stays within 2^-9 / (1 - beta1) ~ 2% and v within 2^-9 / (1 - beta2) ~ 4% of the float32 moments,
    and in practice far closer as the roundings are unbiased (bounded against float32 AdamW in
    tests/train/test_optim.py). `moment_dtype=None` stores the moments in each parameter's dtype (torch's
    choice: a pure-bf16 model gets bf16 moments).

    On CUDA (with Triton) one kernel launch updates a whole parameter group: a table of tensor offsets lets
    every program find its slice. On the H200 `bench`'s 2.3B-parameter step takes 10.5 ms in pure bf16 (75% of
    copy bandwidth; torch's fused AdamW 14.9 ms, 53%) and 17.7 ms in float32 (89%; torch 22.6 ms), measured by
    `python -m benchmarks.optim`. Elsewhere the same
    arithmetic runs per parameter with torch ops. A gradient-clipping factor set as `grad_scale` (a device
    scalar, what `clip_grad_norm` hands over) divides every gradient inside the step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2.2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        moment_dtype: torch.dtype | None = torch.bfloat16,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: bad hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype
        self.grad_scale: torch.Tensor | None = None
        self._blocks: dict[tuple, tuple] = {}  # per parameter list: the kernel's block table (shapes only)
        self._addrs: dict[tuple, tuple] = {}  # per parameter list: its tensors' addresses, on the device

    def __getstate__(self) -> dict:  # torch pickles defaults, state and groups only
        return {**super().__getstate__(), "moment_dtype": self.moment_dtype}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("moment_dtype", torch.bfloat16)
        self.grad_scale, self._blocks, self._addrs = None, {}, {}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded floating state to each parameter's dtype (fp32); restore the storage dtype
        # (exact: bf16 -> fp32 -> bf16 round-trips). Step counters live on the CPU (a fused torch AdamW's
        # checkpoint has them on the device).
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    if st[key].shape != p.shape:  # torch checks the group sizes only (a reordered model)
                        raise ValueError(f"AdamW.load_state_dict: {key} of shape {tuple(st[key].shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}: the state is another model's")
                    st[key] = st[key].to(self.moment_dtype or p.dtype)
            if "step" in st:
                st["step"] = st["step"].detach().to("cpu", torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        used = set()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}  # params skipped on some step (no grad) lag behind
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype or p.dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype or p.dtype)
                st["step"] += 1
                by_step.setdefault(int(st["step"].item()), []).append(p)  # a CPU scalar: no device sync
            for t, params in by_step.items():
                batches: dict[tuple, list[torch.Tensor]] = {}  # one launch per (device, dtypes)
                for p in params:
                    if self._kernel_ok(p):
                        batches.setdefault((p.device, p.dtype, self.state[p]["exp_avg"].dtype), []).append(p)
                    else:
                        self._torch_step(p, group, t)
                for batch in batches.values():
                    used.add(self._kernel_step(batch, group, t))
        for cache in (self._blocks, self._addrs):  # tables of parameter lists this step did not update go
            for key in cache.keys() - used:
                del cache[key]
        return loss

    def _torch_step(self, p: torch.Tensor, group: dict, t: int) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state[p]
        g = p.grad.float()
        if self.grad_scale is not None:
            g = g / self.grad_scale.to(g.device, torch.float32)
        m = st["exp_avg"].float().lerp_(g, 1 - beta1)
        v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        pf = p.float()
        if wd:
            pf.mul_(1 - lr * wd)
        pf.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        if pf is not p:
            p.copy_(pf)

    def _kernel_ok(self, p: torch.Tensor) -> bool:
        st = self.state[p]
        if triton is None or not p.is_cuda or not {p.dtype, st["exp_avg"].dtype} <= set(_KERNEL_DTYPES):
            return False
        if not p.shape == st["exp_avg"].shape == st["exp_avg_sq"].shape:  # the kernel trusts p's numel
            return False
        return all(x.is_contiguous() and x.data_ptr() % 16 == 0 and x.device == p.device and x.dtype == want
                   for x, want in ((p, p.dtype), (p.grad, p.dtype), (st["exp_avg"], st["exp_avg"].dtype),
                                   (st["exp_avg_sq"], st["exp_avg"].dtype)))

    def _kernel_step(self, params: list[torch.Tensor], group: dict, t: int) -> tuple:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        dev = params[0].device
        p0, m0 = params[0], self.state[params[0]]["exp_avg"]
        block, iters, warps = _KERNEL_CONFIG.get((p0.element_size(), m0.element_size()), (4096, 1, 8))
        key = (dev, block * iters, *((id(p), p.numel()) for p in params))
        if key not in self._blocks:  # which tensor and offset each program takes: fixed by the shapes
            numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
            chunk = block * iters
            nblk = (numels + chunk - 1) // chunk
            first = torch.cumsum(nblk, 0) - nblk
            blk_start = (torch.arange(int(nblk.sum())) - first.repeat_interleave(nblk)) * chunk
            blk_tensor = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), nblk)
            self._blocks[key] = tuple(x.to(dev) for x in (numels, blk_tensor, blk_start))
        numels, blk_tensor, blk_start = self._blocks[key]
        sts = [self.state[p] for p in params]
        addrs = tuple(x.data_ptr() for x in (*params, *(p.grad for p in params), *(st["exp_avg"] for st in sts),
                                             *(st["exp_avg_sq"] for st in sts)))
        if self._addrs.get(key, (None,))[0] != addrs:  # new tensors (gradients): upload their offsets
            off = torch.tensor(addrs, dtype=torch.int64).view(4, -1)
            off[:2] = (off[:2] - p0.data_ptr()) // p0.element_size()
            off[2:] = (off[2:] - m0.data_ptr()) // m0.element_size()
            self._addrs[key] = (addrs, (off.pin_memory() if dev.type == "cuda" else off).to(dev, non_blocking=True))
        off = self._addrs[key][1]
        scale = self.grad_scale
        with torch.cuda.device(-1 if dev.index is None else dev.index):  # launches go to the current device
            _adamw_kernel[(blk_tensor.numel(),)](
                p0, m0, off, numels, blk_tensor, blk_start, numels if scale is None else scale.to(dev, torch.float32),
                len(params), 1 - lr * wd, lr / (1 - beta1**t), 1 - beta1, beta2, 1 - beta2, eps,
                math.sqrt(1 - beta2**t), HAS_SCALE=scale is not None, P_ALIGN=16 // p0.element_size(),
                M_ALIGN=16 // m0.element_size(), BLOCK=block, ITERS=iters, num_warps=warps,
            )
        return key

def build_optimizer(
    model: nn.Module,
    lr: float = 2.2e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    bf16_moments: bool = False,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)`: moments in bf16 (`bf16_moments`, the paper's split: float32 master
    weights, bf16 moments) or in the parameters' dtype. `fused` (the GPU) runs our AdamW, whose update is one
    kernel per parameter group; otherwise bf16 moments need ours (torch ops per parameter) and float32 moments
    get torch.optim.AdamW (foreach). Without Triton `fused` falls back to torch's fused AdamW."""
    groups = param_groups(model, weight_decay)
    if bf16_moments or (fused and triton is not None):
        return AdamW(groups, lr, betas, eps, weight_decay, moment_dtype=torch.bfloat16 if bf16_moments else None)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimiser's kernel choice (`fused`): the saved groups
    carry the saving run's (a CPU run saves fused=None), and torch places each parameter's `step` counter by the
    loaded group's flag, so a CPU run resumed on CUDA must be told before loading, not after."""
    if "fused" in optimizer.defaults:
        state = {**state, "param_groups": [{**g, "fused": optimizer.defaults["fused"]} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (the schedule's value for this step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(
    model: nn.Module, max_norm: float = 1.0, optimizer: torch.optim.Optimizer | None = None
) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most `max_norm` (1.0 in V3); returns the norm before
    clipping (a device tensor: log it without forcing a sync every step).

    With our AdamW or a fused torch AdamW as `optimizer` the gradients are not rewritten here: the optimiser's
    next step divides them by `grad_scale` inside its kernel (the hook GradScaler uses), which saves a read and a
    write of every gradient (~1.5 ms a step for the 2B `bench` model on an H200). Same update either way:
    g * c with c = max_norm / (norm + 1e-6) when below 1, as torch.nn.utils.clip_grad_norm_ computes it.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    takes_scale = isinstance(optimizer, AdamW) or (  # (groups, not defaults: load_state_dict restores each
        isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups))  # group's)
    if not takes_scale:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)  # divides by 1/c; float32 (bf16 models)
    return norm


def init_std(cfg: ModelConfig, base_std: float = V3_INIT_STD, base_hidden: int = V3_HIDDEN) -> float:
    """V3's init std 0.006 (paper §4.2) at hidden 7168, scaled by sqrt(7168 / hidden_size) for other widths.

    Why: a weight of std sigma with fan-in d gives outputs of variance d * sigma^2, so keeping the V3
    model's activation scale at another width needs sigma proportional to 1/sqrt(d) (fan-in scaling, as
    in LeCun / muP initialisation): 0.006 * sqrt(7168) = 0.508 / sqrt(d). At d = 256 this is 0.0317; an
    unscaled 0.006 there would start every projection 5.3x too small. Most matrices' fan-in is d or a
    fixed fraction of it (the LoRA ranks and expert widths shrink with d in our presets), so one scale per
    model is used, as the paper uses one std for all weights.
    """
    return base_std * math.sqrt(base_hidden / cfg.hidden_size)


def init_model(model: nn.Module, std: float | None = None) -> float:
    """Initialise a DeepSeekV3 for pre-training: N(0, init_std(cfg)) matrices, unit norms, zero balance bias.
    Returns the std used."""
    std = init_std(model.cfg) if std is None else std
    model.init_weights(std)
    return std
