"""The paged latent pool and its per-step view, the engine's implementation of the model's `LatentCache`.

Per layer (main layers, then the MTP blocks when speculation is on) the pool holds
`num_blocks * block_size` token slots of exactly kv_lora_rank + qk_rope_head_dim values: c_kv and the
rotated k_R, side by side, as SPEC 1.1 prescribes (576 values per token per layer in V3). Which slots belong
to which sequence is the block manager's business; a `PagedStep` is the tensor form of one forward's
bookkeeping (where this step's tokens go, which blocks hold each row's earlier tokens) and is what the
model's attention calls `update` on. Attention math stays in `dsv3.model.attention`: the step only stores and
hands over, in fixed shapes (a CUDA graph replays it): where `dsv3.model.mla_decode` runs (CUDA, bf16/fp16) the
pool and block tables themselves, which its kernel reads in place; elsewhere each row's blocks copied out whole
through its block table, [B, blocks * block_size, C + rope], for the absorbed path as they are.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig
from dsv3.model.attention import CachedLatents, PagedLatents
from dsv3.model.layers import RMSNorm
from dsv3.model.mla_decode import paged_decode_supported, store_latents


class PagedLatentCache:
    """One tensor [n_layers, num_blocks * block_size, kv_lora_rank + qk_rope_head_dim], the model's dtype."""

    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, n_layers: int,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ):
        self.kv_lora_rank = cfg.kv_lora_rank
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.n_layers = n_layers
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.pool = torch.zeros(n_layers, num_blocks * block_size, width, device=device, dtype=dtype)

    @property
    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) * n_layers * element size."""
        return self.pool.shape[-1] * self.n_layers * self.pool.element_size()

    def step(
        self, slots: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor | None
    ) -> PagedStep:
        """The view for one forward. slots [B, S]: pool slot of each new token (padding -> the null block);
        positions [B, S]: each token's position in its sequence; block_tables [B, W]: the blocks of each row
        in position order, or None when every row starts its sequence in this step (prefill: nothing to
        gather). Entries past a row's own blocks may name any block (the null block, by the runner's
        convention): the keys they bring sit at positions beyond every query of the row and are masked."""
        return PagedStep(self, slots, positions, block_tables)


class PagedStep:
    """`LatentCache` for one forward over a batch of sequences of different lengths."""

    def __init__(
        self, cache: PagedLatentCache, slots: torch.Tensor, positions: torch.Tensor,
        block_tables: torch.Tensor | None,
    ):
        self.cache = cache
        self.slots = slots.flatten()
        self.positions = positions
        self.block_tables = block_tables

    @torch.compiler.disable  # as `update`
    def update_unfinished(
        self, layer_idx: int, kv_a: torch.Tensor, kv_norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor
    ) -> CachedLatents:
        """`update` from kv_a = [W_DKV; W_KR] h [B, S, C + rope] at a decode step whose pages are read in place
        (`paged_decode_supported`): kv_norm (MLA's RMSNorm of c_kv) and the rotation of k_R by cos / sin applied
        as the latents are written, one launch (`store_latents`). NotImplemented otherwise (a prefill's own
        attention needs the finished latents; the general path copies pages out)."""
        pool = self.cache.pool[layer_idx]
        C = self.cache.kv_lora_rank
        if self.block_tables is None or not paged_decode_supported(pool, C, kv_a.shape[0]):
            return NotImplemented
        kv = kv_a.flatten(0, 1)
        store_latents(pool, self.slots, kv[:, :C], kv[:, C:], finish=(kv_norm.weight, kv_norm.eps, cos, sin))
        return self._pages(pool)

    def _pages(self, pool: torch.Tensor) -> CachedLatents:
        """The hand-over where attention reads one layer's `pool` in place (`mla_decode.paged_decode`)."""
        return CachedLatents(None, None, self.positions, pages=PagedLatents(pool, self.block_tables,
                                                                            self.cache.block_size))

    # torch.compile (ModelRunner(compile=True)) stops at this call and runs it eagerly: traced, the in-place
    # write into the pool would be functionalised into a copy of the whole pool per layer and step
    @torch.compiler.disable
    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int = 0
    ) -> CachedLatents | None:
        """Write the step's latents at their slots; return every row's latents so far (key j at position j,
        gathered block by block through its table, T = W * block_size keys) and the queries' positions, or
        None in a prefill (attention then runs over the step's own latents).

        `start_pos` is unused: the step carries per-row positions. Keys beyond a row's length hold stale or
        padding latents; they sit at positions past every query of that row, so the causal mask hides them.
        """
        pool = self.cache.pool[layer_idx]
        bs, C = self.cache.block_size, self.cache.kv_lora_rank
        # where the Triton kernels run: the write in one kernel, and attention reads the pages in place
        in_place = paged_decode_supported(pool, C, c_kv.shape[0])
        if in_place:
            store_latents(pool, self.slots, c_kv.flatten(0, 1), k_pe.flatten(0, 1))
        else:
            pool.index_copy_(0, self.slots, torch.cat([c_kv, k_pe], dim=-1).flatten(0, 1).to(pool.dtype))
        if self.block_tables is None:
            return None
        if in_place:  # nothing to copy out
            return self._pages(pool)
        B, W = self.block_tables.shape
        blocks = pool.view(-1, bs, pool.shape[-1])  # [num_blocks, block_size, C + rope]
        kv = blocks.index_select(0, self.block_tables.flatten()).view(B, W * bs, -1)
        return CachedLatents(kv[..., :C], kv[..., C:], self.positions, kv)
