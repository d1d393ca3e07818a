"""Auxiliary-loss-free load balancing (paper §2.1.2, eq. 16 and the bias rule after it; SPEC 1.5).

Once per optimiser step, for every MoE layer (main layers, then the MTP blocks, the order of
`DeepSeekV3Output.router`), count the tokens each expert was actually dispatched over the whole step
(all micro-batches, and all data-parallel ranks through the `all_reduce` hook), then

    b_i += gamma * sign(mean_load - load_i)

on the router's float32 buffer `e_score_correction_bias`: under-loaded experts become easier to select,
over-loaded ones harder; an expert exactly at the mean is left alone (sign 0). The bias is not a
parameter: no gradient, no weight decay, no optimiser state; it is saved with the model.

Balance is reported as MaxVio = max_i load_i / mean_load - 1 (Wang et al. 2024), per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dsv3.model.moe import Router, RouterOutput


def routers(model: nn.Module) -> list[Router]:
    """The model's routers in forward order (module registration order): main MoE layers, then MTP blocks."""
    return [m for m in model.modules() if isinstance(m, Router)]


class LoadAccumulator:
    """Sums the dispatched loads [L, E] of every micro-batch of one optimiser step, on the device.

    `add` only stacks and adds device tensors (no `.item()`, no host synchronisation); `take` returns the
    step's total and starts the next step from zero.
    """

    def __init__(self) -> None:
        self.loads: torch.Tensor | None = None

    def add(self, router: Sequence[RouterOutput]) -> None:
        if not router:
            return
        step = torch.stack([r.load.detach() for r in router])
        if self.loads is not None and self.loads.shape != step.shape:
            raise ValueError(
                f"micro-batch loads {tuple(step.shape)} do not match the step's {tuple(self.loads.shape)}"
            )
        self.loads = step if self.loads is None else self.loads + step

    def take(self) -> torch.Tensor | None:
        loads, self.loads = self.loads, None
        return loads


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def update_bias(
    model: nn.Module,
    loads: torch.Tensor,
    gamma: float,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """b_i += gamma * sign(mean_load - load_i) for each MoE layer; returns the (all-reduced) loads [L, E].

    `loads` [L, E] is this rank's sum over the step's micro-batches (LoadAccumulator). `all_reduce` turns it
    into the global count before the update, e.g. `lambda t: (dist.all_reduce(t), t)[1]` under data
    parallelism (this module imports no torch.distributed); every rank then applies the same update.
    The sign is computed in integers, sign(sum_j load_j - E * load_i), so ties at the mean are exact.
    """
    rs = routers(model)
    loads = all_reduce(loads)
    if loads.shape != (len(rs), rs[0].e_score_correction_bias.numel() if rs else 0):
        raise ValueError(f"loads have shape {tuple(loads.shape)}; the model has {len(rs)} MoE routers")
    if gamma == 0:
        return loads
    E = loads.shape[1]
    if loads.dtype.is_floating_point:
        direction = torch.sign(loads.double().sum(-1, keepdim=True) - E * loads.double())
    else:
        direction = torch.sign(loads.sum(-1, keepdim=True) - E * loads)
    for r, d in zip(rs, direction, strict=True):
        b = r.e_score_correction_bias
        b.add_(d.to(device=b.device, dtype=b.dtype), alpha=gamma)
    return loads


def max_vio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: max_i load_i / mean_load - 1 for loads [..., E] (0 = perfect balance).

    Average over layers (`.mean()`) for the single number the paper plots; a layer that saw no tokens
    reports 0.
    """
    loads = loads.double()
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp_min(1e-30) - 1.0, torch.zeros_like(mean))
