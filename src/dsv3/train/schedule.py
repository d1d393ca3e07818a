"""Pre-training schedules of DeepSeek-V3 (paper §4.2; SPEC 1.5, 1.6, 4), as fractions of the run.

The paper's run is 14.8T tokens of 4K-token sequences. Its schedules, re-expressed as fractions of the run
so that a 10-minute CPU run has the same shape:

  learning rate   linear warm-up 0 -> peak over 2K steps (0.824% of the run's ~242.8K steps);
                  constant to 10T (0.6757 of the tokens); cosine decay to 10% of peak over the next 4.3T
                  (to 0.9662); 10% of peak (2.2e-5) for 333B (to 0.9887); 7.3e-6 / 2.2e-4 = 3.32% of peak
                  for the last 167B tokens.
  batch size      3072 -> 15360 sequences, linear in tokens over the first 469B (0.0317 of the tokens),
                  then constant; whole sequences, a multiple of `batch_multiple` (micro-batch x DP ranks).
  bias gamma      0.001 for the first 14.3T tokens (0.9662), then 0 (SPEC 1.5).
  MTP lambda      0.3 for the first 10T tokens (0.6757), then 0.1 (SPEC 1.6).

Every function is pure: (step and/or tokens seen before the step, ScheduleConfig) -> value.
`ScheduleConfig()` is the paper's run; `ScheduleConfig.scaled(...)` keeps its shape at another size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

V3_TOKENS = 14.8e12
V3_PEAK_LR = 2.2e-4
# 2K warm-up steps of the paper's ~242.8K: the ramp takes 469B / (4096 x 12288) x ln(15360 / 3072) = 15.0K
# steps, then 14.331T tokens at 15360 x 4096 per step take 227.8K (`total_steps(ScheduleConfig())` = 242,785).
V3_WARMUP = 2000 / 242_785


@dataclass(frozen=True)
class ScheduleConfig:
    """Run size and the schedules' shape.

    Fields named `*_until` / `*_from` are fractions of total_tokens, `lr_*_ratio` fractions of peak_lr,
    `warmup` a fraction of the run's optimiser steps (`warmup_steps`, when set, is the count itself).
    """

    total_tokens: float = V3_TOKENS
    seq_len: int = 4096
    peak_lr: float = V3_PEAK_LR
    warmup: float = V3_WARMUP
    warmup_steps: int | None = None  # overrides `warmup` when set
    lr_constant_until: float = 10.0 / 14.8
    lr_decay_until: float = 14.3 / 14.8
    lr_min_ratio: float = 0.1  # the cosine's end and the first final stage: 2.2e-5 / 2.2e-4
    lr_last_from: float = (14.8 - 0.167) / 14.8
    lr_last_ratio: float = 7.3e-6 / 2.2e-4
    batch_min: int = 3072
    batch_max: int = 15360
    batch_ramp_until: float = 469e9 / V3_TOKENS
    batch_multiple: int = 1
    gamma: float = 0.001
    gamma_until: float = 14.3 / 14.8
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_until: float = 10.0 / 14.8

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"schedule field `{name}`: {msg} (got {getattr(self, name)!r})")

        need(self.total_tokens > 0, "total_tokens", "must be > 0")
        need(self.seq_len > 0, "seq_len", "must be > 0")
        need(self.peak_lr >= 0, "peak_lr", "must be >= 0")
        need(0 <= self.warmup <= 1, "warmup", "must be a fraction of the run in [0, 1]")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(0 <= self.lr_constant_until <= self.lr_decay_until, "lr_constant_until",
             f"must be in [0, lr_decay_until={self.lr_decay_until}]")
        need(self.lr_decay_until <= self.lr_last_from <= 1, "lr_last_from",
             f"must be in [lr_decay_until={self.lr_decay_until}, 1]")
        need(self.batch_multiple >= 1, "batch_multiple", "must be >= 1")
        for name in ("batch_min", "batch_max"):
            v = getattr(self, name)
            need(v >= self.batch_multiple and v % self.batch_multiple == 0, name,
                 f"must be a positive multiple of batch_multiple={self.batch_multiple}")
        need(self.batch_min <= self.batch_max, "batch_min", f"must be <= batch_max={self.batch_max}")
        for name in ("batch_ramp_until", "gamma_until", "mtp_lambda_until"):
            need(0 <= getattr(self, name) <= 1, name, "must be a fraction of the run in [0, 1]")

    @classmethod
    def scaled(
        cls, total_tokens: float, seq_len: int, batch_max: int, batch_multiple: int = 1, **overrides: float
    ) -> ScheduleConfig:
        """The paper's shape for a run of `total_tokens`: batch ramp from batch_max / 5 (V3's 3072 / 15360),
        rounded down to a multiple of batch_multiple and at least one multiple; other fields overridable."""
        batch_min = max(batch_multiple, (batch_max // 5) // batch_multiple * batch_multiple)
        fields = dict(total_tokens=total_tokens, seq_len=seq_len, batch_min=batch_min, batch_max=batch_max,
                      batch_multiple=batch_multiple)
        return cls(**{**fields, **overrides})

    def replace(self, **changes: float) -> ScheduleConfig:
        return dataclasses.replace(self, **changes)


def batch_size(tokens: float, cfg: ScheduleConfig) -> int:
    """Sequences in the step that starts after `tokens` tokens: linear from batch_min to batch_max over the
    first `batch_ramp_until` of the run, rounded down to a multiple of `batch_multiple`."""
    ramp = cfg.batch_ramp_until * cfg.total_tokens
    frac = 1.0 if ramp <= 0 else min(1.0, max(0.0, tokens / ramp))
    # + 1e-6: the run fractions (469 / 14800 ...) are inexact in binary; an exact ramp point must not lose a
    # sequence to rounding
    b = cfg.batch_min + math.floor((cfg.batch_max - cfg.batch_min) * frac + 1e-6)
    return max(cfg.batch_min, b // cfg.batch_multiple * cfg.batch_multiple)


@lru_cache(maxsize=64)
def total_steps(cfg: ScheduleConfig) -> int:
    """Optimiser steps until `total_tokens` are seen, batch ramp included (the last step may overshoot)."""
    tokens, steps = 0, 0
    ramp_end = cfg.batch_ramp_until * cfg.total_tokens
    while tokens < min(ramp_end, cfg.total_tokens):
        tokens += batch_size(tokens, cfg) * cfg.seq_len
        steps += 1
    rest = cfg.total_tokens - tokens
    if rest > 0:
        steps += math.ceil(rest / (cfg.batch_max * cfg.seq_len))
    return steps


def warmup_steps(cfg: ScheduleConfig) -> int:
    """`warmup_steps` if given, else `warmup` x total_steps (2000 for the paper's run)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return round(cfg.warmup * total_steps(cfg))


def lr_at(step: int, tokens: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimiser step `step` (0-based), taken after `tokens` tokens.

    The warm-up factor (step + 1) / W reaches peak at step W - 1, so the first step already trains
    (the paper's "0 -> 2.2e-4 over 2K steps" in discrete form). The rest is by tokens: constant, then
    lr = peak * (m + (1 - m) * (1 + cos(pi p)) / 2) with m = lr_min_ratio and p the progress through the
    decay, then m * peak, then lr_last_ratio * peak.
    """
    W = warmup_steps(cfg)
    warm = 1.0 if step + 1 >= W else (step + 1) / W
    f = tokens / cfg.total_tokens
    m = cfg.lr_min_ratio
    if f < cfg.lr_constant_until:
        shape = 1.0
    elif f < cfg.lr_decay_until:
        p = (f - cfg.lr_constant_until) / (cfg.lr_decay_until - cfg.lr_constant_until)
        shape = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    elif f < cfg.lr_last_from:
        shape = m
    else:
        shape = cfg.lr_last_ratio
    return cfg.peak_lr * shape * warm


def gamma_at(tokens: float, cfg: ScheduleConfig) -> float:
    """Bias update speed gamma (SPEC 1.5): `gamma` before `gamma_until` of the tokens, then 0."""
    return cfg.gamma if tokens < cfg.gamma_until * cfg.total_tokens else 0.0


def mtp_lambda_at(tokens: float, cfg: ScheduleConfig) -> float:
    """MTP weight lambda (SPEC 1.6): `mtp_lambda` before `mtp_lambda_until` of the tokens, then `_late`."""
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_until * cfg.total_tokens else cfg.mtp_lambda_late
