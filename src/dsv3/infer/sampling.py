"""Sampling: request parameters, logits -> probabilities, and drawing tokens from uniforms.

Every random choice is made by inverse-CDF sampling from uniforms drawn with the request's own
`torch.Generator`: a request draws the same number of uniforms per step whatever else is in the batch, so a
seeded request gives the same tokens alone or batched (with MTP speculation, only while the cache never has to
preempt it: its recomputing prefill draws 1 uniform where a decode step draws 2k + 1, so the draws shift; the
distribution is the same either way), and all the tensor math is batched over rows. Greedy
(temperature 0) rows get a one-hot distribution, so greedy decoding and the speculative acceptance rule
(dsv3/infer/speculative.py) run through the same code as sampling, with no special case (the engine only
short-cuts batches whose rows are all greedy, where that code reduces to the argmax).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


def _python_int(value: object) -> object:
    """int(value) for any integer type but bool (numpy's, torch's), else value unchanged for validate() to judge."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy (deterministic). top_k 0 keeps every token; top_p 1 keeps every token. seed None
    draws a fresh seed. Generation stops at `max_tokens` new tokens, at the tokenizer's EOS (unless
    `ignore_eos`), at any id in `stop_token_ids`, or when the text contains one of `stop` (cut before it).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"{name} must be a list (got {value!r})")
            setattr(self, name, list(value))
        # numpy's and torch's integers are integers here too: stored as Python ints, as validate() checks them
        for name in ("max_tokens", "top_k", "seed"):
            setattr(self, name, _python_int(getattr(self, name)))
        self.stop_token_ids = [_python_int(t) for t in self.stop_token_ids]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first parameter whose value cannot be used."""
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, 0 meaning greedy "
                             f"(got {self.temperature!r})")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, 0 meaning no limit (got {self.top_k!r})")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be a 64-bit integer or None (got {self.seed!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings (got {self.stop!r})")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers (got {self.stop_token_ids!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """The request's RNG (CPU: uniforms are a few numbers per step, cheap to copy to any device)."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator().manual_seed(seed)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor on `device` without a host sync: staged in pinned memory for a non-blocking copy
    (a plain torch.tensor(..., device="cuda") from Python data waits for the copy)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Columns a chunk of `argmax`'s first pass: a decode step's V-wide rows reduced by many programs at once
ARGMAX_CHUNK = 256


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), the first index on ties and NaN counting as the largest, as torch.argmax: in two
    passes where the last dimension is a multiple of ARGMAX_CHUNK, the largest value and its index in every
    chunk, then the first chunk holding the largest of those. A decode step's few rows of a 32K+ vocabulary
    are one long reduction each otherwise (one program a row under torch.compile: 6.9 us for `bench`'s row)."""
    V = logits.shape[-1]
    if V % ARGMAX_CHUNK or V == ARGMAX_CHUNK:
        return logits.argmax(-1)
    top, at = logits.unflatten(-1, (V // ARGMAX_CHUNK, ARGMAX_CHUNK)).max(-1)  # first index in each chunk
    chunk = top.argmax(-1, keepdim=True)  # the first chunk holding the maximum
    return (chunk * ARGMAX_CHUNK + at.gather(-1, chunk)).squeeze(-1)


_TINY = torch.finfo(torch.float32).tiny


def _largest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of float32 x [..., V] and their indices, in descending order with ties
    to the lower index: one total order whatever k is. topk's own choice among tied values (which of them make
    the cut, in what order) changes with k, and k is the batch's largest top_k, so a seeded request's tokens
    would depend on its neighbours wherever logits tie (bf16 logits often do)."""
    V = x.shape[-1]
    if k >= V or x.is_cuda:  # an H200 sorts 8 rows of 129K stably in 0.14 ms, where topk takes 0.21
        xs, idx = x.sort(dim=-1, descending=True, stable=True)
        return xs[..., :k], idx[..., :k]
    # on the CPU (40 ms for that sort) one topk over int64 keys, unique and ordered as (value, -index): a float's
    # bits, its magnitude bits flipped where it is negative, order as the floats do (+ 0.0 first: -0.0 == 0.0
    # must tie too)
    bits = (x + 0.0).view(torch.int32)
    value = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    idx = (value * 2**32 + (V - 1 - torch.arange(V, device=x.device))).topk(k, dim=-1).indices
    return x.gather(-1, idx), idx


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, ..., V] -> float32 probabilities after temperature, top-k then top-p (row b uses params[b]).

    Greedy rows become one-hot at the argmax (the first one on ties, as torch.argmax). Top-k/top-p look at the
    largest max(top_k) logits of each row (ties to the lower index, as greedy; `_largest`), the nucleus's mass in
    float64. Per-row values are decided on the host and copied without a sync.
    """
    shape = logits.shape
    B, V = shape[0], shape[-1]
    x = logits.reshape(B, -1, V).float()
    dev = x.device
    # at least float32's smallest normal: a temperature below it would round to 0 there and 0 / 0 the top logit
    temp = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float64).clamp(min=_TINY)
    temp = to_device(temp.float(), dev).view(B, 1, 1)
    x = (x - x.amax(-1, keepdim=True)) / temp  # shifted first: a tiny temperature gives -inf, never inf - inf
    if any(p.top_k or p.top_p < 1 for p in params):
        kmax = max(p.top_k or V for p in params)
        rows = to_device(torch.tensor([[p.top_k or V, p.top_p] for p in params], dtype=torch.float64), dev)
        top_k, top_p = rows[:, 0].view(B, 1, 1), rows[:, 1].view(B, 1, 1)
        xs, order = _largest(x, kmax)
        rank = torch.arange(xs.shape[-1], device=dev)
        keep = rank < top_k
        # the nucleus's masses in float64: float32 sums over a large vocabulary round differently with the batch's
        # shape on a GPU (another scan kernel), enough to move the cut among tied tokens
        ps = xs.double().masked_fill(~keep, float("-inf")).softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        # (top_p = 1 keeps all: rounding can put the mass before a tail token at 1.0; the top token always stays,
        # also where a top_p below the top token's mass would keep nothing)
        keep = keep & (((ps.cumsum(-1) - ps) < top_p) | (top_p >= 1) | (rank == 0))
        x = torch.full_like(x, float("-inf")).scatter_(-1, order, xs.masked_fill(~keep, float("-inf")))
    probs = x.softmax(-1)
    if any(p.greedy for p in params):  # decided on the host: no device sync
        greedy = to_device(torch.tensor([p.greedy for p in params]), dev).view(B, 1, 1)
        onehot = torch.zeros_like(probs).scatter_(-1, logits.reshape(B, -1, V).argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs.view(shape)


def uniforms(generators: Sequence[torch.Generator], n: int, device: torch.device | str) -> torch.Tensor:
    """[B, n] uniforms in [0, 1), row b from generators[b] (float64: inverse-CDF sampling stays exact)."""
    return to_device(torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]), device)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [..., V] (need not be normalised), u [...] uniforms -> token ids [...].

    The first index whose cumulative mass exceeds u * total: a zero-probability token is never chosen, and a
    one-hot row always yields its argmax.
    """
    cdf = probs.double().cumsum(-1)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
