"""ModelConfig: every field of the Hugging Face DeepSeek-V3 `config.json`, presets and validation.

The field names are the checkpoint's (shared/SPEC.md sections 1 and 6), so a released `config.json` loads as
is and ours loads in transformers. `rope_scaling` (older files, key "type") and `rope_parameters` (newer
files, key "rope_type", with `rope_theta` inside) are both read; we write `rope_scaling` plus `rope_theta`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field has a value the model cannot use; the message names the field."""


def read_json_object(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The JSON object in file `path`; a file that is not UTF-8 JSON or holds no object raises `error` naming it
    (config.json, tokenizer_config.json, generation_config.json, a safetensors index: hand-edited files)."""
    try:
        d = json.loads(Path(path).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def is_json_number(v: Any) -> bool:
    """Whether a JSON-decoded value is a finite number (an int or float; JSON's true/false decode as bools)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# annotation -> (accepted JSON-decoded types, what to tell the user); other fields are not type-checked
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "int | None": ((int, type(None)), "an integer or null"),
    "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
    "dict[str, Any] | None": ((dict, type(None)), "an object or null"),
}
# HF configs also write these as lists (several end tokens); their users check them
_TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id"}
# rope_scaling's YaRN numbers (`yarn` and `softmax_scale` read them)
_YARN_NUMBERS = {"factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"}


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 model, spelled as in the released `config.json`."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    ep_size: int = 1
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        }
    )
    attention_bias: bool = False
    attention_dropout: float = 0.0
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_v3"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from `first_k_dense_replace` on use DeepSeekMoE (every `moe_layer_freq`-th, 1 in V3)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN block with defaults filled in, or None when RoPE is unscaled."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type", "default"))
        if kind == "default":
            return None
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs.get("original_max_position_embeddings", 4096)),
            "beta_fast": float(rs.get("beta_fast", 32)),
            "beta_slow": float(rs.get("beta_slow", 1)),
            "mscale": float(rs.get("mscale", 1.0)),
            "mscale_all_dim": float(rs.get("mscale_all_dim", 0.0)),
        }

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(s, mscale_all_dim)^2 under YaRN (SPEC 1.3)."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y["mscale_all_dim"]:
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value the model cannot use."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field `{name}`: {msg} (got {getattr(self, name)!r})")

        for f in dataclasses.fields(self):  # JSON types first: a string where a number belongs fails here, named
            kinds, what = _JSON_TYPES.get(f.type, ((object,), ""))
            v = getattr(self, f.name)
            if f.name not in _TOKEN_IDS and (not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds):
                need(False, f.name, f"must be {what}")
            if f.type == "float":
                need(math.isfinite(v), f.name, "must be a finite number")

        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "v_head_dim", "max_position_embeddings",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be a positive even int (RoPE rotates channel pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank >= 0, "q_lora_rank", "must be null, 0 or positive")
        if self.q_lora_rank == 0:
            self.q_lora_rank = None  # 0 and null both mean "one q_proj"
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             f"MLA has one key per head: must equal num_attention_heads={self.num_attention_heads}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(not self.attention_bias, "attention_bias", "DeepSeek-V3 has no linear biases")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-V3 has an untied output head")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, "intermediate_size", "dense layers need a positive width")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            for name in ("hidden_size", "moe_intermediate_size"):  # widths of the grouped-GEMM operands
                need(getattr(self, name) % 8 == 0, name,
                     "must be a multiple of 8 with routed experts (grouped GEMM needs 16-byte aligned rows in bf16)")
            need(self.scoring_func == "sigmoid", "scoring_func",
                 "only 'sigmoid' (DeepSeek-V3's router) is supported")
            need(self.topk_method == "noaux_tc", "topk_method",
                 "only 'noaux_tc' (bias-corrected group-limited top-k) is supported")
            need(self.n_group >= 1, "n_group", "must be >= 1")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
                 f"must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            kept = self.topk_group * self.n_routed_experts // self.n_group
            need(1 <= self.num_experts_per_tok <= kept, "num_experts_per_tok",
                 f"must be in [1, {kept}] (experts in the topk_group={self.topk_group} kept groups)")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        rs = self.rope_scaling
        if rs:
            kind = rs.get("type", rs.get("rope_type", "default"))
            if kind not in ("yarn", "default"):
                raise ConfigError(f"config field `rope_scaling`: type must be 'yarn' or 'default' (got {kind!r})")
            for key in sorted(_YARN_NUMBERS & rs.keys()) if kind == "yarn" else ():
                if not is_json_number(rs[key]):
                    raise ConfigError(f"config field `rope_scaling.{key}`: must be a finite number (got {rs[key]!r})")
            if kind == "yarn" and not (float(rs.get("factor", 0)) >= 1.0):
                raise ConfigError(f"config field `rope_scaling`: YaRN factor must be >= 1 (got {rs.get('factor')!r})")
            # transformers' YaRN options beyond DeepSeek's: refused rather than silently computed another way
            if kind == "yarn" and rs.get("truncate", True) is not True:
                raise ConfigError("config field `rope_scaling.truncate`: only true (DeepSeek's YaRN rounds its "
                                  f"correction range to whole dimensions) is supported (got {rs['truncate']!r})")
            if kind == "yarn" and rs.get("attention_factor") is not None:
                raise ConfigError("config field `rope_scaling.attention_factor`: not supported (DeepSeek's YaRN "
                                  "derives the scale from mscale and mscale_all_dim)")

    # ---- I/O -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict; unknown keys are ignored, both RoPE spellings accepted."""
        d = dict(d)
        for key in ("rope_scaling", "rope_parameters"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"config field `{key}`: must be an object or null (got {d[key]!r})")
        if "rope_scaling" not in d and "rope_parameters" not in d:  # plain RoPE, as transformers reads it (the
            d["rope_scaling"] = None  # dataclass default is V3's YaRN, for presets)
        rp = d.pop("rope_parameters", None)
        if rp is not None and not d.get("rope_scaling"):
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {**rp, "type": kind}
        elif rp is not None and "rope_theta" in rp:
            d.setdefault("rope_theta", rp["rope_theta"])
        if d.get("rope_scaling") and "rope_type" in d["rope_scaling"] and "type" not in d["rope_scaling"]:
            rs = dict(d["rope_scaling"])
            rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = rs
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("rope_interleave", True) is not True:  # (transformers' key; DeepSeek's checkpoints interleave)
            raise ConfigError("config field `rope_interleave`: only true (RoPE over adjacent channel pairs, as the "
                              f"released checkpoints store q_R and k_R) is supported (got {d['rope_interleave']!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(read_json_object(path))

    def save_json(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(self.to_json())

    def to_json(self) -> str:
        """config.json's text (HF's field names, indented)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets ------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # The released DeepSeek-V3 config.json, field for field.
    "671b": {},
    # ~10M parameters: trains on 2 CPU cores in minutes. Every V3 feature is on (q/kv compression, YaRN,
    # 1 dense layer then MoE with 4 groups keep 2, shared expert, MTP), sized for a small BPE vocabulary.
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=16, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
        v_head_dim=64, qk_nope_head_dim=64, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=4096, initializer_range=0.006,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 1024, "type": "yarn"},
    ),
    # 2.14B total / 0.50B activated, V3 proportions for one 80 GB GPU (MoE ~60% of activated FLOPs,
    # attention ~20%, head ~10%): MLA with q/kv compression, 1 shared + 64 fine-grained routed experts in 8
    # groups keep 4, 8 active, MTP depth 1. The shape of the transformers peer measured in shared/HARDWARE.md
    # (hidden 1536, 12 layers, first dense, q_lora 768, kv_lora 256); a trained 32K BPE, as a 129K-row head
    # would be 40% of the FLOPs of a model this size (2.5% in V3).
    "bench": dict(
        vocab_size=32768, hidden_size=1536, intermediate_size=8192, moe_intermediate_size=576,
        num_hidden_layers=12, num_nextn_predict_layers=1, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=1, n_routed_experts=64, kv_lora_rank=256, q_lora_rank=768, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=1, max_position_embeddings=32768, initializer_range=0.006,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 8, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"},
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`671b`, `tiny`, `bench`) with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
