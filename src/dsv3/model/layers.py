"""Small layers shared by attention, MoE and the blocks: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in float32 and cast back before the weight (SPEC 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32; float64 stays float64
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def plain_rmsnorm(m: nn.Module) -> bool:
    """Whether `m` computes exactly `RMSNorm` from its weight and eps (the class itself, no hooks), so a fused
    kernel may apply those instead of calling it; a subclass or a hooked norm keeps its forward."""
    return type(m) is RMSNorm and not (m._forward_hooks or m._forward_pre_hooks)


def norm_inside(m: nn.Module) -> bool:
    """Whether a decode kernel may apply RMSNorm `m` inside its own launch: a `plain_rmsnorm` (the kernel reads
    its weight and eps) whose weight autograd does not need (the kernels have no backward)."""
    return plain_rmsnorm(m) and not (torch.is_grad_enabled() and m.weight.requires_grad)


def defer_norm(x: torch.Tensor, norm: nn.Module | None) -> tuple[torch.Tensor, nn.Module | None]:
    """(x, norm) where a kernel may still apply `norm` inside its launch (`norm_inside`), else (norm(x), None):
    a hooked or subclassed norm, or one being trained, runs as a module first."""
    if norm is not None and not norm_inside(norm):
        return norm(x), None
    return x, norm


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN of the first layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's [out, in] matrix, for code that multiplies by the weight directly (MLA's absorbed path).

    A plain nn.Linear gives its weight as it is; a layer storing its weight in another form (dsv3.fp8's
    FP8Linear: E4M3 values with block scales) provides the matrix in `dtype` through its own `dense_weight`.
    """
    own = getattr(linear, "dense_weight", None)
    return linear.weight if own is None else own(dtype)
