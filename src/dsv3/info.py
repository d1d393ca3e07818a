"""Analytic sizes of a model from its config alone: parameters (total and activated), KV-cache bytes, FLOPs.

Used by `dsv3 info` and by benchmarks for MFU / roofline counting. Nothing is allocated, so the 671B
config is counted as cheaply as the tiny one; a test checks the counts against an instantiated model.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts in elements. `main` excludes MTP; embedding and head are counted once each."""

    embedding: int  # vocab x hidden lookup table
    head: int  # output head (untied)
    attention: int  # all MLA weights incl. their norms, main layers
    dense_ffn: int  # dense SwiGLU layers
    moe_total: int  # routers + all routed + shared experts, main layers
    moe_active: int  # routers + K routed + shared experts per token, main layers
    norms: int  # block norms and the final norm, main layers
    mtp_total: int  # all MTP modules (their embedding/head are the main model's)
    mtp_active: int

    @property
    def main(self) -> int:
        return self.embedding + self.head + self.attention + self.dense_ffn + self.moe_total + self.norms

    @property
    def main_active(self) -> int:
        return self.embedding + self.head + self.attention + self.dense_ffn + self.moe_active + self.norms


def _attention_params(cfg: ModelConfig) -> int:
    H, d = cfg.num_attention_heads, cfg.hidden_size
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    else:
        q = d * H * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * d


def _moe_params(cfg: ModelConfig, active: bool) -> int:
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    routed = cfg.num_experts_per_tok if active else cfg.n_routed_experts
    # the router scores every expert for every token, so its weight is always active
    return cfg.n_routed_experts * d + (routed + cfg.n_shared_experts) * 3 * d * inter


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts (trainable weights; the routing-bias buffers are not parameters)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    n_moe = cfg.n_moe_layers
    attn = _attention_params(cfg)
    mtp_block = 2 * d + attn + 3 * d + 2 * d * d  # enorm, hnorm, shared_head.norm, block norms; eh_proj
    mtp_ffn_total = _moe_params(cfg, False) if cfg.n_routed_experts else 3 * d * cfg.intermediate_size
    mtp_ffn_active = _moe_params(cfg, True) if cfg.n_routed_experts else 3 * d * cfg.intermediate_size
    D = cfg.num_nextn_predict_layers
    return ParamCounts(
        embedding=cfg.vocab_size * d,
        head=cfg.vocab_size * d,
        attention=L * attn,
        dense_ffn=(L - n_moe) * 3 * d * cfg.intermediate_size,
        moe_total=n_moe * _moe_params(cfg, False),
        moe_active=n_moe * _moe_params(cfg, True),
        norms=L * 2 * d + d,
        mtp_total=D * (mtp_block + mtp_ffn_total),
        mtp_active=D * (mtp_block + mtp_ffn_active),
    )


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2, mtp: bool = False) -> int:
    """Latent cache per token: (kv_lora_rank + qk_rope_head_dim) values per layer (SPEC 1.1)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers * bytes_per_value


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Score and value FLOPs of one query token attending to `context` keys, all layers, expanded form:
    2 * H * context * (qk_head_dim + v_head_dim) per layer (the projections are in the matmul count)."""
    H = cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * H * context * (cfg.qk_head_dim + cfg.v_head_dim)


def forward_flops_per_token(cfg: ModelConfig, context: int, causal_mean: bool = False) -> int:
    """Forward FLOPs per token: 2 x activated matmul parameters (every weight except the embedding lookup)
    plus attention at `context` keys; causal_mean=True averages over the positions of a causal sequence of
    length `context` (the training count, (context + 1) / 2 keys on average)."""
    p = count_params(cfg)
    # the lookup and the RMSNorm weights (block, final, q_a and kv_a norms) are not matmuls
    latent_norms = cfg.num_hidden_layers * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank)
    matmul = p.main_active - p.embedding - p.norms - latent_norms
    keys = (context + 1) / 2 if causal_mean else context
    return int(2 * matmul + attention_flops_per_token(cfg, 1) * keys)


def format_info(cfg: ModelConfig, context: int = 4096, name: str = "") -> str:
    """The `dsv3 info` table."""
    p = count_params(cfg)

    def b(n: float) -> str:
        return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"

    def flops(n: float) -> str:
        return f"{n / 1e9:,.2f} GFLOP" if n >= 1e8 else f"{n / 1e6:,.2f} MFLOP"

    rows = [
        ("total parameters (main model)", b(p.main)),
        ("  without embedding", b(p.main - p.embedding)),
        ("  embedding / head", f"{b(p.embedding)} / {b(p.head)}"),
        ("  attention (MLA)", b(p.attention)),
        ("  dense FFN", b(p.dense_ffn)),
        ("  MoE (routers + experts)", b(p.moe_total)),
        ("activated per token (main model)", b(p.main_active)),
        ("  without embedding lookup", b(p.main_active - p.embedding)),
        (f"MTP modules ({cfg.num_nextn_predict_layers}), total / activated", f"{b(p.mtp_total)} / {b(p.mtp_active)}"),
        ("KV cache per token, BF16", f"{kv_cache_bytes_per_token(cfg, 2):,} bytes"),
        ("KV cache per token, FP8 (1 byte/value)", f"{kv_cache_bytes_per_token(cfg, 1):,} bytes"),
        (f"forward FLOPs per token, at context {context:,}", flops(forward_flops_per_token(cfg, context))),
        (f"  averaged over a causal {context:,}-token sequence",
         flops(forward_flops_per_token(cfg, context, causal_mean=True))),
    ]
    head = (
        f"{name or 'model'}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), hidden "
        f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, {cfg.n_routed_experts} routed experts "
        f"(top-{cfg.num_experts_per_tok}, {cfg.n_group} groups keep {cfg.topk_group}), vocab {cfg.vocab_size:,}"
    )
    w = max(len(r[0]) for r in rows)
    return "\n".join([head] + [f"  {k:<{w}}  {v:>18}" for k, v in rows])
