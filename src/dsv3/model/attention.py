"""Multi-head Latent Attention (paper §2.1.1, eqs. 1-11).

Two equivalent computations (SPEC 1.1):
- expanded: materialise per-head keys [k_C; k_R] and values from the latent c_kv (training, prefill);
- absorbed: fold W_UK into the query and W_UV into the output, so attention runs in the kv_lora_rank-wide
  latent space against the cache of (c_kv, k_R): kv_lora_rank + qk_rope_head_dim values per token (decode).
Both end in the same softmax(q k^T * scale) v, done by `attend` (SDPA), the one attention kernel seam.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope


class LatentCache(Protocol):
    """What attention needs from a KV cache: store this step's latents, return all latents so far."""

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int | None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, len, dim] tensors; k/v may have one head (MQA).

    q_offset=None: no mask. Otherwise causal, query i sitting at key position q_offset + i.
    """
    S, T = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if q_offset is None or S == 1 and q_offset == T - 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if q_offset == 0 and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(q_offset, q_offset + S, device=q.device)
    mask = torch.arange(T, device=q.device)[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class MLA(nn.Module):
    """Multi-head Latent Attention with the checkpoint's parameter names (SPEC 6)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        d, H = cfg.hidden_size, cfg.num_attention_heads
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)  # W_DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * cfg.qk_head_dim, bias=False)  # [W_UQ; W_QR]
        else:
            self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        # [W_DKV; W_KR]: output [c_kv | k_R]
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        # [W_UK; W_UV] head-major: rows [h*(nope+v), h*(nope+v)+nope) are W_UK of head h
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, d, bias=False)

    # -- projections shared by both paths ----------------------------------------------------------
    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eqs. 6-9: q_C [B,S,H,nope] and rotated q_R [B,S,H,rope]."""
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, -1))
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eqs. 1 and 3: c_kv = RMSNorm(W_DKV h) [B,S,C] and k_R = RoPE(W_KR h) [B,S,rope]: what is cached."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    # -- the two equivalent attention computations ---------------------------------------------------
    def expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_offset: int | None
    ) -> torch.Tensor:
        """eqs. 2, 4, 5, 10: per-head keys [k_C; k_R] and values from c_kv. Returns [B,S,H,v]."""
        H = self.n_heads
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, -1)).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale, q_offset)
        return o.transpose(1, 2)

    def absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_offset: int | None
    ) -> torch.Tensor:
        """Same result in latent space: q_C^T W_UK c = (W_UK^T q_C)^T c, and W_UV applied after attention.

        Attention becomes multi-query with one shared key [c_kv; k_R] (C + rope wide) and value c_kv.
        """
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))  # [H, nope+v, C]
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)  # [B,H,S,C+rope]
        k = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(1)  # [B,1,T,C+rope]
        o_lat = attend(q, k, c_kv.unsqueeze(1), self.softmax_scale, q_offset)  # [B,H,S,C]
        return torch.einsum("bhsc,hdc->bshd", o_lat, w_uv)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Without a cache: expanded causal attention over x. With one: store this step's latents; a first
        chunk (start_pos 0) attends expanded over itself, later chunks absorbed over everything cached."""
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is None:
            o = self.expanded(q_nope, q_pe, c_kv, k_pe, 0)
        else:
            c_all, pe_all = cache.update(self.layer_idx, c_kv, k_pe, start_pos)
            if start_pos == 0:
                o = self.expanded(q_nope, q_pe, c_kv, k_pe, 0)
            else:
                o = self.absorbed(q_nope, q_pe, c_all, pe_all, start_pos)
        return self.o_proj(o.flatten(2))
