"""A contiguous latent KV cache: per layer [B, max_len, kv_lora_rank] and [B, max_len, qk_rope_head_dim].

Stores exactly what MLA needs (c_kv and the rotated k_R); the paged pool of the inference engine implements
the same `update` interface.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig


class StaticLatentCache:
    """Latents for `batch` sequences of up to `max_len` tokens, for the main layers and the MTP blocks."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; asked to write up to {end}")
        self.c_kv[layer_idx, :, start_pos:end] = c_kv
        self.k_pe[layer_idx, :, start_pos:end] = k_pe
        return self.c_kv[layer_idx, :, :end], self.k_pe[layer_idx, :, :end]
