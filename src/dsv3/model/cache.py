"""A contiguous latent KV cache: per layer [B, max_len, kv_lora_rank] and [B, max_len, qk_rope_head_dim].

Stores exactly what MLA needs (c_kv and the rotated k_R); the paged pool of the inference engine (dsv3/infer)
implements the same `LatentCache` interface for batches of sequences of different lengths.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig
from dsv3.model.attention import CachedLatents


class StaticLatentCache:
    """Latents for `batch` sequences of up to `max_len` tokens, for the main layers and the MTP blocks; in
    `dtype` on `device` when a dtype is given, else in the dtype and on the device of the first latents
    written (the model's)."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ):
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        self.c_kv: torch.Tensor | None = None
        self.k_pe: torch.Tensor | None = None
        if dtype is not None:  # else on the first update, like the latents written (a device alone is no dtype)
            self._allocate(device, dtype)

    def _allocate(self, device: torch.device | str | None, dtype: torch.dtype) -> None:
        cfg = self.cfg
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.c_kv = torch.zeros(n, self.batch, self.max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(n, self.batch, self.max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int
    ) -> CachedLatents | None:
        """Write positions start_pos.. of every row; a first chunk (start_pos 0) attends over itself."""
        if self.c_kv is None:
            self._allocate(c_kv.device, c_kv.dtype)
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; asked to write up to {end}")
        self.c_kv[layer_idx, :, start_pos:end] = c_kv
        self.k_pe[layer_idx, :, start_pos:end] = k_pe
        if start_pos == 0:
            return None
        return CachedLatents(self.c_kv[layer_idx, :, :end], self.k_pe[layer_idx, :, :end], start_pos)
