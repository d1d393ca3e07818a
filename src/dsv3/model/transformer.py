"""The DeepSeek-V3 decoder (paper §2): embedding, blocks of MLA + FFN, final norm, untied head, MTP modules.

Each block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), the residual added once (SPEC 1). The first
`first_k_dense_replace` blocks use a dense SwiGLU, the rest DeepSeekMoE. Single-device: parallelism and
FP8 are applied from outside (shared/STYLE.md 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA, LatentCache
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.moe import MoE, RouterOutput
from dsv3.model.rope import RotaryEmbedding


class Block(nn.Module):
    """One decoder block with the checkpoint's names: input_layernorm, self_attn, post_attention_layernorm, mlp.

    h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)), with the norms and the
    first skip connection handed to the sublayers (`self_attn(x, ..., norm=, residual=x)` returns h, an MoE
    `mlp(h, norm=)` normalises itself) so that decode's kernels apply them inside their own launches: hooks on
    self_attn and mlp see those arguments and that output, not a normalised input and a bare sublayer output.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: LatentCache | None = None, start_pos: int = 0, doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        # the norms and the skip connection go in as modules and tensors, so that decode's kernels apply them
        # inside their own launches
        h = self.self_attn(x, cos, sin, cache, start_pos, doc_ids, norm=self.input_layernorm, residual=x)
        if isinstance(self.mlp, MoE):
            y, r = self.mlp(h, norm=self.post_attention_layernorm)
            return h + y, r
        return h + self.mlp(self.post_attention_layernorm(h)), None


@dataclass
class DeepSeekV3Output:
    """Everything one forward produces.

    logits: [B, S, V] next-token logits at every position.
    hidden: [B, S, d] final hidden states after the last RMSNorm (what MTP depth 1 consumes).
    mtp_logits: per depth k = 1..D, [B, S, V]; position i predicts token i+k+1 (valid for i < S-k-1).
    router: per MoE layer, in layer order (main layers, then the MTP blocks), what its router decided.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    router: list[RouterOutput] = field(default_factory=list)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 with optional MTP modules. `model(tokens)` -> DeepSeekV3Output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from dsv3.model.mtp import MTPModule  # mtp builds on Block

        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(cfg)

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (std defaults to `initializer_range`), ones for norms, zero bias."""
        std = self.cfg.initializer_range if std is None else std
        for p in self.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights are the only vectors
            else:
                p.normal_(0.0, std)
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()
        self.rotary.reset_parameters()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(positions)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouterOutput], tuple[torch.Tensor, torch.Tensor]]:
        """The decoder without the output head: final normed hidden [B, S, d], the main layers' router
        outputs, and the (cos, sin) tables of these positions. The inference engine calls this to apply
        `lm_head` only where it needs logits (the last prompt position, not a 129K-wide row per token)."""
        S = tokens.shape[1]
        if positions is None:
            positions = torch.arange(start_pos, start_pos + S, device=tokens.device).unsqueeze(0)
        cos, sin = self.rope(positions)
        x = self.embed_tokens(tokens)
        routers: list[RouterOutput] = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, cache, start_pos, doc_ids)
            if r is not None:
                routers.append(r)
        return self.norm(x), routers, (cos, sin)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mtp: bool | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> DeepSeekV3Output:
        """tokens [B, S] at positions start_pos.. (or explicit `positions` [B or 1, S]).

        With a `cache`, latents are stored and later calls continue from `start_pos`. MTP logits are computed
        when `mtp` is True (default: when the model has MTP modules and no cache is used).
        doc_ids [B, S] (training, no cache): document of each token of packed sequences; attention then stays
        within each document (block-diagonal causal mask), in the main layers and the MTP blocks.
        """
        h, routers, (cos, sin) = self.hidden_states(
            tokens, start_pos=start_pos, positions=positions, cache=cache, doc_ids=doc_ids
        )
        out = DeepSeekV3Output(logits=self.lm_head(h), hidden=h, router=routers)
        if mtp is None:
            mtp = cache is None and len(self.mtp) > 0
        if mtp and cache is not None:  # the blocks would attend within this chunk only, and store nothing
            raise ValueError("mtp=True with a cache: the MTP blocks are not cached here; call model.mtp[k] with "
                             "the cache (as dsv3.infer's drafter does), or run the full forward without one")
        if mtp:
            prev = h
            for k, module in enumerate(self.mtp, start=1):
                # depth k at position i sees token i+k; the last k positions wrap around, which causal attention
                # keeps from reaching any position that has a target
                emb = self.embed_tokens(tokens.roll(-k, dims=1))
                prev, r = module(prev, emb, cos, sin, doc_ids=doc_ids)
                out.mtp_logits.append(self.lm_head(prev))
                if r is not None:
                    out.router.append(r)
        return out
