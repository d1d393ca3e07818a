"""Multi-head Latent Attention (paper §2.1.1, eqs. 1-11).

Two equivalent computations (SPEC 1.1):
- expanded: materialise per-head keys [k_C; k_R] and values from the latent c_kv (training, prefill);
- absorbed: fold W_UK into the query and W_UV into the output, so attention runs in the kv_lora_rank-wide
  latent space against the cache of (c_kv, k_R): kv_lora_rank + qk_rope_head_dim values per token (decode).
Both end in the same softmax(q k^T * scale) v, done by `attend` (SDPA), the one attention kernel seam; the
absorbed form over a paged cache's pages, where a cache hands them over, by `mla_decode.paged_decode`
(the same math reading the pool in place, held to float64 by its tests).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv3.config import ModelConfig
from dsv3.model.gemv import linear, linear_pair
from dsv3.model.layers import RMSNorm, defer_norm, dense_weight, plain_rmsnorm
from dsv3.model.mla_decode import absorb_query, paged_decode
from dsv3.model.rope import apply_rope


class PagedLatents(NamedTuple):
    """A paged cache's latents where they lie: `pool` [slots, kv_lora_rank + rope] of one layer, row b's key j in
    slot block_tables[b, j // block_size] * block_size + j % block_size."""

    pool: torch.Tensor
    block_tables: torch.Tensor
    block_size: int


class CachedLatents(NamedTuple):
    """Every latent of the step's sequences so far, this step's included, as a cache returns them.

    c_kv [B, T, kv_lora_rank] and k_pe [B, T, qk_rope_head_dim]: key j of a row sits at position j of its
    sequence (rows of different lengths are padded at the end). q_pos places the step's queries among those
    keys: an int offset (query i at position q_pos + i, every row alike) or a [B or 1, S] tensor of per-row
    positions, so sequences of different lengths decode in one batch; a query sees the keys at positions
    <= its own.
    """

    c_kv: torch.Tensor | None
    k_pe: torch.Tensor | None
    q_pos: int | torch.Tensor
    # [B, T, kv_lora_rank + qk_rope_head_dim]: c_kv and k_pe side by side, when the cache stores them so (the
    # paged pool does); the absorbed path's key is exactly this, so it need not be concatenated again
    kv: torch.Tensor | None = None
    # instead of all the above but q_pos (then a [B or 1, S] tensor): the pages themselves, for
    # `mla_decode.paged_decode` to read in place (a paged cache hands these where that kernel runs)
    pages: PagedLatents | None = None


class LatentCache(Protocol):
    """What attention needs from a KV cache (the contiguous StaticLatentCache, the engine's paged pool).

    A cache that hands over pages may also offer `update_unfinished(layer_idx, kv_a, kv_norm, cos, sin)`: the
    same store from kv_a = [W_DKV; W_KR] h [B, S, C + rope], finishing eqs. 1 and 3 (kv_norm, an `RMSNorm`, on
    c_kv; RoPE by cos / sin on k_R) as it writes, and returning `CachedLatents` with the pages, or
    NotImplemented where it cannot (then attention finishes the latents and calls `update`). The engine's pool
    does at decode: one launch for three.
    """

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int
    ) -> CachedLatents | None:
        """Store this step's latents c_kv [B, S, C], k_pe [B, S, rope]. Return None when the step starts every
        one of its sequences (nothing earlier to attend to: attention runs expanded over the step's own
        latents), else everything cached so far to attend to in the absorbed form."""
        ...


# MLA's q/k head dim (192) differs from v's (128), which PyTorch's flash kernel does not take; cuDNN's does,
# about 4x faster than the memory-efficient kernel SDPA would otherwise pick on Hopper (shared/HARDWARE.md).
_CUDA_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


# Absorbed decode: a few queries (heads x draft tokens: 16-64 for `bench`, 128-512 for V3) against one shared
# latent key head of 576 values. The fused kernels (only the memory-efficient one takes that width) give each
# block a tile of 32 queries, so a decode step runs a few blocks per sequence: 66 us a layer at 1K context on
# an H200 with one SM busy (`bench`, batch 1). Two batched GEMMs around a float32 softmax spread the keys over
# the whole GPU instead, as long as the [B, queries, keys] scores stay small (2^28 float32 values, 1 GiB; the
# mask, softmax and cast take about twice that again while they run).
_FEW_QUERIES = 1024
_MAX_SCORES = 2**28


def _attend_few_queries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None, causal: bool,
) -> torch.Tensor:
    """`attend` for q [B, 1, S, D] against k [B, 1, T, D], v [B, 1, T, Dv] on CUDA: float32 scores and softmax,
    the probabilities rounded to v's dtype for the second GEMM (as the fused kernels do)."""
    S, T = q.shape[-2], k.shape[-2]
    q0, kt = q[:, 0], k[:, 0].transpose(1, 2)
    half = q.dtype in (torch.bfloat16, torch.float16)
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 scores, float64 for float64 models
    s = (torch.bmm(q0, kt, out_dtype=acc) if half else torch.bmm(q0, kt).to(acc)) * scale  # [B, S, T]
    if causal:  # SDPA's is_causal: query i sees keys <= i
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask.reshape(-1, S, T), float("-inf"))
    return torch.bmm(s.softmax(-1).to(v.dtype), v[:, 0]).unsqueeze(1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: int | torch.Tensor | None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, len, dim] tensors; k/v may have one head (MQA).

    q_pos=None: no mask. Otherwise causal with key j at position j: an int puts query i at position q_pos + i;
    a [B or 1, S] tensor gives each row's query positions (batched decode of sequences of different lengths,
    whose padded keys lie beyond every real query's position and so are masked out).
    doc_ids [B, S] (document masking of packed sequences; needs q_pos=0 and S == T): block-diagonal causal,
    a query sees only the keys of its own document.
    """
    S, T = q.shape[-2], k.shape[-2]
    kw: dict = {"scale": scale, "enable_gqa": k.shape[1] != q.shape[1]}
    if doc_ids is not None:
        if not (isinstance(q_pos, int) and q_pos == 0 and S == T):
            raise ValueError("document masking needs a whole sequence at once (q_pos=0, queries == keys)")
        same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)  # [B, S, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        kw["attn_mask"] = (same_doc & causal).unsqueeze(1)  # [B, 1, S, S]
    elif isinstance(q_pos, torch.Tensor):
        kw["attn_mask"] = (torch.arange(T, device=q.device) <= q_pos.unsqueeze(-1)).unsqueeze(1)  # [B|1,1,S,T]
    elif q_pos is None or S == 1 and q_pos == T - 1:
        pass
    elif q_pos == 0 and S == T:
        kw["is_causal"] = True
    else:
        qpos = torch.arange(q_pos, q_pos + S, device=q.device)
        kw["attn_mask"] = torch.arange(T, device=q.device)[None, :] <= qpos[:, None]
    if (q.is_cuda and q.shape[1] == k.shape[1] == 1 and S <= _FEW_QUERIES and q.shape[0] * S * T <= _MAX_SCORES
            and not torch.is_grad_enabled()):
        return _attend_few_queries(q, k, v, scale, kw.get("attn_mask"), kw.get("is_causal", False))
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    # The CPU flash kernel needs v as wide as q/k; without it SDPA falls back to the unfused math path, ~10x
    # slower here at long sequences. Zero columns of v give zero output columns, which are sliced off. Not
    # under autograd: the CPU flash backward ran slower than the math path's (51 vs ~20 ms, tiny, 8 x 256).
    dv = v.shape[-1]
    if dv < q.shape[-1] and not (torch.is_grad_enabled() and q.requires_grad):
        v = F.pad(v, (0, q.shape[-1] - dv))
    return F.scaled_dot_product_attention(q, k, v, **kw)[..., :dv]


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
    def project_query(self, x: torch.Tensor, q_a: torch.Tensor | None = None) -> torch.Tensor:
        """eqs. 6-8 before RoPE: [q_C; q_R] per head [B,S,H,nope+rope]. q_a: W_DQ x when already computed."""
        if self.q_lora_rank:
            q = linear(self.q_a_proj(x) if q_a is None else q_a, self.q_b_proj, norm=self.q_a_layernorm)
        else:
            q = self.q_proj(x)
        return q.unflatten(-1, (self.n_heads, -1))

    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_a: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """eqs. 6-9: q_C [B,S,H,nope] and rotated q_R [B,S,H,rope]. q_a: W_DQ x when already computed."""
        return self._rotate(self.project_query(x, q_a), cos, sin)

    def _rotate(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[q_C; q_R] -> (q_C, RoPE(q_R)) (eq. 8)."""
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_a: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """eqs. 1 and 3: c_kv = RMSNorm(W_DKV h) [B,S,C] and k_R = RoPE(W_KR h) [B,S,rope]: what is cached.
        kv_a: [W_DKV; W_KR] x when already computed."""
        kv_a = self.kv_a_proj_with_mqa(x) if kv_a is None else kv_a
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    # -- the two equivalent attention computations ---------------------------------------------------
    def expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        q_pos: int | torch.Tensor | None, doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eqs. 2, 4, 5, 10: per-head keys [k_C; k_R] and values from c_kv. Returns [B,S,H,v]."""
        H = self.n_heads
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, -1)).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale, q_pos, doc_ids)
        return o.transpose(1, 2)

    def absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        q_pos: int | torch.Tensor | None, kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same result in latent space: q_C^T W_UK c = (W_UK^T q_C)^T c, and W_UV applied after attention.

        Attention becomes multi-query with one shared key [c_kv; k_R] (C + rope wide; `kv` when the cache holds
        it already concatenated) and value c_kv. The heads share that key, so they are folded into the query
        axis: one single-head attention of S*H queries (query s*H + h is head h at position s). SDPA's fused
        CUDA kernels take that for these head widths, where enable_gqa would leave only its unfused math path."""
        B, S, H, _ = q_nope.shape
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        # per-row positions [B|1, S*H] (query s*H + h)
        pos = q_pos.unsqueeze(-1).expand(*q_pos.shape, H).flatten(-2) if isinstance(q_pos, torch.Tensor) else None
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(B, 1, S * H, -1)  # [B,1,S*H,C+rope]
        k = kv if kv is not None else torch.cat([c_kv, k_pe], dim=-1)
        T = k.shape[1]
        if pos is None and q_pos is not None and not (S == 1 and q_pos == T - 1):  # else every key is visible
            pos = torch.arange(q_pos, q_pos + S, device=q.device).unsqueeze(-1).expand(S, H).reshape(1, S * H)
        o_lat = attend(q, k.unsqueeze(1), c_kv.unsqueeze(1), self.softmax_scale, pos)  # [B,1,S*H,C]
        return torch.einsum("bshc,hdc->bshd", o_lat.view(B, S, H, -1), w_uv)

    def absorbed_paged(
        self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pages: PagedLatents, q_pos: torch.Tensor,
    ) -> torch.Tensor:
        """`absorbed` with the keys still in a paged pool (per-row positions q_pos [B|1, S]), from the unrotated
        q [B,S,H,nope+rope]: `mla_decode` kernels throughout, W_UK and q_R's RoPE in one (`absorb_query`), the
        attention reading the pages in place, W_UV applied by the kernel that merges the key splits."""
        B, S, H, _ = q.shape
        w_uk, w_uv = self._absorbed_weights(q.dtype)
        q_lat, q_pe = absorb_query(q, cos, sin, w_uk)
        return paged_decode(q_lat, q_pe, *pages, q_pos, self.softmax_scale, w_uv=w_uv).view(B, S, H, -1)

    def _absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, C], W_UV [H, v, C]): views of kv_b_proj's head-major rows."""
        w = dense_weight(self.kv_b_proj, dtype).unflatten(0, (self.n_heads, -1))  # [H, nope+v, C]
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
        norm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without a cache: expanded causal attention over x. With one: store this step's latents; a step that
        starts its sequences attends expanded over itself, later steps absorbed over everything cached.
        doc_ids [B, S]: document masking of packed training sequences (no cache), see `attend`. norm: the
        block's input RMSNorm, for an x not yet normalised (decode applies it inside its first projections);
        residual: added to the output (the block's skip connection, inside W_O's launch at decode)."""
        if doc_ids is not None and cache is not None:
            raise ValueError("document masking (doc_ids) is for training forwards without a KV cache")
        # decode's few rows read W_DQ and [W_DKV; W_KR], which share the input, in one launch, with the input's
        # norm inside it (one launch fewer a layer); past this, x is used only where that launch did not run
        x, norm = defer_norm(x, norm)
        both = linear_pair(x, self.q_a_proj, self.kv_a_proj_with_mqa, norm) if self.q_lora_rank else None
        if both is None and norm is not None:
            x = norm(x)
        q = self.project_query(x, None if both is None else both[0])
        kv_a = self.kv_a_proj_with_mqa(x) if both is None else both[1]
        # a cache that can finish eqs. 1 and 3 as it stores the latents (the engine's pool at decode) takes them
        # unfinished, with the norm's weight (a plain RMSNorm: a hooked one runs its forward); NotImplemented: it
        # cannot here, so they are finished first
        cached = NotImplemented
        if cache is not None and hasattr(cache, "update_unfinished") and plain_rmsnorm(self.kv_a_layernorm):
            cached = cache.update_unfinished(self.layer_idx, kv_a, self.kv_a_layernorm, cos, sin)
        if cached is NotImplemented:
            c_kv, k_pe = self.latent(x, cos, sin, kv_a)
            cached = None if cache is None else cache.update(self.layer_idx, c_kv, k_pe, start_pos)
        elif cached is None or cached.pages is None:  # the latents it stored were never finished here
            raise TypeError(f"{type(cache).__name__}.update_unfinished must hand over pages or return NotImplemented")
        if cached is not None and cached.pages is not None:
            o = self.absorbed_paged(q, cos, sin, cached.pages, cached.q_pos)
        else:
            q_nope, q_pe = self._rotate(q, cos, sin)
            if cached is None:
                o = self.expanded(q_nope, q_pe, c_kv, k_pe, 0, doc_ids)
            else:
                o = self.absorbed(q_nope, q_pe, cached.c_kv, cached.k_pe, cached.q_pos, cached.kv)
        return linear(o.flatten(2), self.o_proj, residual=residual)
