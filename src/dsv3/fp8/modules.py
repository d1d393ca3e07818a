"""FP8 twins of the model's linear layers, swapped in from outside (shared/STYLE.md 2): serving with the
weights kept as the FP8 checkpoint stores them, E4M3 with float32 128x128 block scales (SPEC 6).

- `FP8Linear` replaces a bias-free nn.Linear: `weight` E4M3 [out, in] and `weight_scale_inv` float32
  [ceil(out/128), ceil(in/128)], the checkpoint's own names, so the HF name table maps them unchanged.
  Its forward is `fp8_linear` (on CUDA the few-row kernel for <= 8 rows, else cuBLAS's blockwise FP8 GEMM;
  dequantise + matmul elsewhere).
- `FP8Experts` replaces the stacked routed experts: `gate_up_proj` E4M3 [E, 2I, d] with
  `gate_up_proj_scale_inv` [E, 2 ceil(I/128), ceil(d/128)] (the gate's block rows, then the up
  projection's: each half keeps its own checkpoint grid, which the concatenation would not have when I is
  not a multiple of 128), `down_proj` [E, d, I] with `down_proj_scale_inv` [E, ceil(d/128), ceil(I/128)].
  On CUDA, decode's `few_pairs` path takes up to 64 tokens: below 5E / 8 (token, expert) pairs its kernel
  (`dsv3.model.gemv`) streams the E4M3 bytes of each pair's expert and applies the block scales itself, from
  there `dsv3.model.expert_gemm` reads each chosen expert's E4M3 bytes once for all its tokens, on E4M3 MMAs
  (V3's 256 experts at top-8: streaming up to 19 tokens). Larger forwards dequantise all E experts to the
  activation dtype and run the model's own grouped GEMMs; on the CPU that path always runs, so a kept model's
  CPU logits stay identical to the dequantised load's. (F.scaled_grouped_mm in torch 2.11 takes rowwise or MX
  scales, not DeepSeek's 128x128 blocks.)
- `dense_weight(dtype)` gives the dequantised matrix to code that multiplies by a weight directly (MLA's
  absorbed decode path reads kv_b_proj's W_UK and W_UV); `to_fp8_` keeps that one cached, dequantised
  once after loading (1/64 of V3's weights).

`model.to(dtype)` leaves the E4M3 values and their float32 scales as they are (a cast would turn the codes
into plain numbers or round the scales); moves between devices apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from dsv3.fp8.gemm import fp8_linear
from dsv3.fp8.quant import dequantize_blockwise, quantize_blockwise
from dsv3.model.moe import Experts

FP8 = torch.float8_e4m3fn
BLOCK = 128


def _grid(n: int) -> int:
    return -(-n // BLOCK)


def _frozen(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _KeepDtypes(nn.Module):
    """Module whose parameters keep their dtypes through `.to(dtype)`, `.half()` and the like."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # param.data is replaced in place, so hold the old tensors to re-derive from the originals
        old = {n: p.data for n, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for n, p in self._parameters.items():
            if p is not None and p.dtype != old[n].dtype:
                p.data = old[n].to(p.device)
        return self


class FP8Linear(_KeepDtypes):
    """y = x W^T with W = weight * weight_scale_inv per 128x128 block; no bias (DeepSeek-V3 has none)."""

    gemv_streamable = True  # forward is exactly that product: decode's fused launches may read the weight

    def __init__(
        self, in_features: int, out_features: int, device: torch.device | str | None = None,
        keep_dense: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.keep_dense = keep_dense  # whether cache_dense_weights_ keeps a dequantised copy of this one
        self.weight = _frozen((out_features, in_features), FP8, device)
        self.weight_scale_inv = _frozen((_grid(out_features), _grid(in_features)), torch.float32, device)
        self.register_buffer("dense", None, persistent=False)  # the dequantised copy, if kept

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_dense: bool = False) -> FP8Linear:
        """An FP8Linear on linear's device; real weights are quantised (and with keep_dense, the dequantised
        copy cached in the dtype they had), meta ones left for a loader."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; DeepSeek-V3's linear layers have none")
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, device=w.device, keep_dense=keep_dense)
        if not w.is_meta:
            q, s = quantize_blockwise(w.detach())
            new.weight.data.copy_(q)
            new.weight_scale_inv.data.copy_(s)
            if keep_dense:
                new.cache_dense_(w.dtype)
        return new

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        cached = None if self.dense is None else self.dense.dtype
        super()._apply(fn, recurse)
        if self.dense is not None and self.dense.dtype != cached:  # re-derive from E4M3, not by a cast
            self.cache_dense_(self.dense.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised [out, in] weight in `dtype` (the cached copy when there is one of that dtype)."""
        if self.dense is not None and self.dense.dtype == dtype:
            return self.dense
        return dequantize_blockwise(self.weight, self.weight_scale_inv, dtype)

    def cache_dense_(self, dtype: torch.dtype) -> None:
        """Keep the dequantised weight in `dtype` beside the FP8 one (refresh after changing the weight)."""
        self.dense = dequantize_blockwise(self.weight, self.weight_scale_inv, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn 128x128 blocks"


class FP8Experts(_KeepDtypes, Experts):
    """The routed experts with E4M3 stacked weights; routing, sorting and combining are Experts' own."""

    def __init__(self, n_experts: int, dim: int, inter: int, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: its float parameters are what this replaces
        self.inter = inter
        self.gate_up_proj = _frozen((n_experts, 2 * inter, dim), FP8, device)
        self.gate_up_proj_scale_inv = _frozen((n_experts, 2 * _grid(inter), _grid(dim)), torch.float32, device)
        self.down_proj = _frozen((n_experts, dim, inter), FP8, device)
        self.down_proj_scale_inv = _frozen((n_experts, _grid(dim), _grid(inter)), torch.float32, device)

    @classmethod
    def from_experts(cls, experts: Experts) -> FP8Experts:
        """FP8 experts on experts' device; real weights are quantised (gate and up each on its own grid)."""
        n, two_i, dim = experts.gate_up_proj.shape
        new = cls(n, dim, two_i // 2, device=experts.gate_up_proj.device)
        if not experts.gate_up_proj.is_meta:
            gate, up = experts.gate_up_proj.detach().split(two_i // 2, dim=1)
            (qg, sg), (qu, su) = quantize_blockwise(gate), quantize_blockwise(up)
            qd, sd = quantize_blockwise(experts.down_proj.detach())
            new.gate_up_proj.data.copy_(torch.cat([qg, qu], dim=1))
            new.gate_up_proj_scale_inv.data.copy_(torch.cat([sg, su], dim=1))
            new.down_proj.data.copy_(qd)
            new.down_proj_scale_inv.data.copy_(sd)
        return new

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantised to `dtype`: gate_up [E, 2I, d], down [E, d, I]."""
        q, s = self.gate_up_proj, self.gate_up_proj_scale_inv
        if self.inter % BLOCK == 0:  # the halves' block grids line up: one pass over the stack
            gate_up = dequantize_blockwise(q, s, dtype)
        else:
            rows = s.shape[1] // 2
            gate_up = torch.cat([
                dequantize_blockwise(q[:, : self.inter], s[:, :rows], dtype),
                dequantize_blockwise(q[:, self.inter :], s[:, rows:], dtype),
            ], dim=1)
        return gate_up, dequantize_blockwise(self.down_proj, self.down_proj_scale_inv, dtype)

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv

    def max_streamed_pairs(self) -> int:
        # E4M3 experts: streaming per pair below 5/8 as many pairs as experts. expert_gemm's E4M3 x E4M3 MMAs
        # reach 52-62% of copy bandwidth on half the bytes, so its crossover with per-pair streaming comes later
        # than for bf16: on `bench` (64 experts, top-8; `python -m benchmarks.experts --e4m3`, H200) per-pair
        # 34.9 us against 37.1 at 4 tokens (32 pairs), 41.8 against 37.6 at 5 (40 pairs).
        return self.gate_up_proj.shape[0] * 5 // 8


def _absorbed(name: str) -> bool:
    """MLA's absorbed decode path multiplies by kv_b_proj's weight directly, every step."""
    return name.rsplit(".", 1)[-1] == "kv_b_proj"


def to_fp8_(model: nn.Module, names: Iterable[str], dense: Callable[[str], bool] = _absorbed) -> nn.Module:
    """Replace the named submodules of `model` (bias-free nn.Linear or routed Experts) by FP8 twins on the
    same device, in place. Real weights are quantised here (with dense copies cached in the dtype they had
    for the names `dense` selects); meta ones stay meta for a loader, which then calls `cache_dense_weights_`."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, nn.Linear):
            new: nn.Module = FP8Linear.from_linear(old, keep_dense=dense(name))
        elif isinstance(old, Experts):
            new = FP8Experts.from_experts(old)
        else:
            raise TypeError(f"{name}: no FP8 twin for {type(old).__name__}")
        setattr(parent, attr, new)
    return model


def cache_dense_weights_(model: nn.Module, dtype: torch.dtype) -> None:
    """Fill the dense copies `to_fp8_` chose to keep (after a loader has written the FP8 weights)."""
    for m in model.modules():
        if isinstance(m, FP8Linear) and m.keep_dense:
            m.cache_dense_(dtype)

