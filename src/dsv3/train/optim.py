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


class AdamW(torch.optim.Optimizer):
    """Decoupled AdamW (Loshchilov & Hutter) with moments stored in `moment_dtype`, math in float32.

    Per parameter p with gradient g at step t (as torch.optim.AdamW, so the float32 variant matches it):
        p  <- p * (1 - lr * wd)
        m  <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        p  <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    With bf16 moments each store rounds m and v by at most 2^-9 relative; old roundings decay with beta, so
    m stays within 2^-9 / (1 - beta1) ~ 2% and v within 2^-9 / (1 - beta2) ~ 4% of the float32 moments,
    and in practice far closer as the roundings are unbiased (bounded against float32 AdamW in
    tests/train/test_optim.py).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2.2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        moment_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: bad hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded floating state to each parameter's dtype (fp32); restore the storage dtype
        # (exact: bf16 -> fp32 -> bf16 round-trips).
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                t = int(st["step"].item())  # a CPU scalar: no device sync
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - beta1)
                v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                bc1 = 1 - beta1**t
                bc2_sqrt = math.sqrt(1 - beta2**t)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                pf = p.float()
                if wd:
                    pf.mul_(1 - lr * wd)
                pf.addcdiv_(m, denom, value=-lr / bc1)
                if pf is not p:
                    p.copy_(pf)
        return loss


def build_optimizer(
    model: nn.Module,
    lr: float = 2.2e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    bf16_moments: bool = False,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)`: torch's own with float32 moments, or ours with bf16 moments.
    `fused` (torch's AdamW only) runs the whole update as one kernel per parameter group on the GPU."""
    groups = param_groups(model, weight_decay)
    if bf16_moments:
        return AdamW(groups, lr, betas, eps, weight_decay, moment_dtype=torch.bfloat16)
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

    With a fused torch AdamW as `optimizer` the gradients are not rewritten here: the optimiser's next step
    divides them by `grad_scale` inside its one kernel (the hook GradScaler uses), which saves a read and a
    write of every gradient (~1.5 ms a step for the 2B `bench` model on an H200). Same update either way:
    g * c with c = max_norm / (norm + 1e-6) when below 1, as torch.nn.utils.clip_grad_norm_ computes it.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    fused = isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)
    if not fused:  # (groups, not defaults: load_state_dict restores each group's saved `fused`)
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
