"""Rotary position embedding for the decoupled key/query (paper §2.1.1, eqs. 3 and 8) with YaRN (§4.3).

Only the `qk_rope_head_dim` channels are rotated. Pairs are ADJACENT channels (x[2i], x[2i+1]) treated as
complex numbers: the released weights are laid out for this "interleaved" form (SPEC 1.2).
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies f'_i (float64, [d_R/2]) and the cos/sin magnitude factor (SPEC 1.3).

    Under YaRN, fast dims (i < low) keep theta^(-2i/d_R), slow dims (i > high) are divided by the factor s,
    and a linear ramp blends in between. The magnitude factor mscale(s, mscale) / mscale(s, mscale_all_dim)
    is 1.0 for V3; the softmax correction lives in `ModelConfig.softmax_scale`, not here, so it is counted once.
    """
    d = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    y = cfg.yarn
    if y is None:
        return freqs, 1.0
    s, orig = y["factor"], y["original_max_position_embeddings"]

    def correction_dim(n_rotations: float) -> float:
        return d * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(y["beta_slow"])), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freqs = freqs * (1 - ramp) + (freqs / s) * ramp
    return freqs, yarn_mscale(s, y["mscale"]) / yarn_mscale(s, y["mscale_all_dim"])


class RotaryEmbedding(torch.nn.Module):
    """Holds f'_i as a buffer of at least float32 (float64 models: float64) and returns (cos, sin) of shape
    [..., d_R/2] for given positions. A bf16 table would be off by ~2^-9 relative, ~1 radian at position 4K."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)  # (build_empty sets the default)
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2, dtype=dtype), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the table; needed after the module was built on the meta device."""
        freqs, self.magnitude = rope_frequencies(self.cfg)
        with torch.no_grad():
            self.inv_freq.copy_(freqs.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # model.to(dtype) casts every floating buffer: recompute the table in at least float32 instead (a
        # cast would round it to bf16, or leave a float64 model with float32-rounded frequencies)
        before = self.inv_freq.dtype
        super()._apply(fn, recurse)
        dtype = torch.promote_types(self.inv_freq.dtype, torch.float32)
        if self.inv_freq.dtype != dtype or dtype != before:
            self.inv_freq = torch.empty(self.inv_freq.shape, dtype=dtype, device=self.inv_freq.device)
            if self.inv_freq.device.type != "meta":
                self.reset_parameters()
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of x [B, S, ..., d_R] by angles cos/sin [B or 1, S, d_R/2].

    (x0 + i x1) * (cos + i sin) per pair, computed in float32 and cast back to x's dtype.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # float64 stays float64
    x0, x1 = xf[..., 0], xf[..., 1]
    while cos.dim() < x0.dim():  # broadcast over head dims between S and d_R/2
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
