"""Multi-Token Prediction modules (paper §2.2, eqs. 21-25; SPEC 1.6).

Module k at position i: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding half first, as in the
released weights), one full decoder block, then shared_head.norm; the output head is the main model's. h^0 is
the main model's final normed hidden state; deeper modules take the previous module's normed output, as
transformers' MtpModel chains them. Attention uses position i for the pair (h_i, t_{i+k}), as vLLM does.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import LatentCache
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import RouterOutput
from dsv3.model.transformer import Block


class SharedHead(nn.Module):
    """`shared_head`: only its norm is a parameter of its own; the head itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """One MTP depth, stored at checkpoint layer index `layer_idx` = num_hidden_layers + k - 1."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)  # M_k
        self.block = Block(cfg, layer_idx, moe=cfg.n_routed_experts > 0)
        self.shared_head = SharedHead(cfg)

    def forward(
        self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: LatentCache | None = None, start_pos: int = 0, doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """h_prev, emb [B, S, d] -> normed hidden [B, S, d] for the shared head (and the next depth)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, r = self.block(x, cos, sin, cache, start_pos, doc_ids)
        return self.shared_head.norm(x), r
