"""ModelConfig (SPEC 6): the 671B preset is the released config.json, both RoPE spellings read alike, JSON and
transformers round trips, and validation errors that name the offending field."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV3Config

from dsv3.config import ConfigError, ModelConfig, preset
from dsv3.model import DeepSeekV3
from tests.conftest import SHAPES, tiny_config

# deepseek-ai/DeepSeek-V3 config.json as released (auto_map and transformers_version left out)
RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_671b_preset_is_the_released_config():
    d = preset("671b").to_dict()
    for key, value in RELEASED.items():
        if key == "quantization_config":
            continue  # storage format of the released files, not a model hyper-parameter
        assert d[key] == value, key
    assert "quantization_config" not in d


def test_released_config_json_loads_field_for_field():
    extra = {"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
             "transformers_version": "4.33.1"}
    cfg = ModelConfig.from_dict({**RELEASED, **extra})
    assert cfg.replace(quantization_config=None) == preset("671b")
    assert cfg.quantization_config == RELEASED["quantization_config"]


def test_671b_main_model_has_671_03b_parameters():
    with torch.device("meta"):  # shapes only
        model = DeepSeekV3(preset("671b"))
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert round(main / 1e9, 2) == 671.03  # SPEC 6
    assert preset("671b").n_moe_layers == 58


def test_rope_parameters_and_rope_scaling_spellings_give_the_same_config():
    old = dict(RELEASED)
    new = {k: v for k, v in RELEASED.items() if k not in ("rope_scaling", "rope_theta")}
    rs = dict(RELEASED["rope_scaling"])
    del rs["type"]
    new["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000}
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b
    assert b.yarn == a.yarn and b.yarn["factor"] == 40.0
    assert b.rope_theta == 10000
    # rope_theta inside rope_parameters is read, not silently defaulted
    odd = ModelConfig.from_dict({**new, "rope_parameters": {**new["rope_parameters"], "rope_theta": 50000}})
    assert odd.rope_theta == 50000


def test_default_rope_parameters_mean_no_yarn():
    d = {k: v for k, v in RELEASED.items() if k != "rope_scaling"}
    cfg = ModelConfig.from_dict({**d, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert cfg.rope_scaling is None and cfg.yarn is None


@pytest.mark.parametrize("shape", list(SHAPES))
def test_json_round_trip(shape, tmp_path):
    cfg = tiny_config(**SHAPES[shape])
    cfg.save_json(tmp_path)
    assert ModelConfig.from_json(tmp_path) == cfg
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_transformers_config_round_trip(shape):
    # transformers 5 rewrites rope_scaling as rope_parameters (with rope_type and rope_theta inside)
    cfg = tiny_config(**SHAPES[shape])
    hf = DeepseekV3Config(**cfg.to_dict()).to_dict()
    assert "rope_parameters" in hf
    assert ModelConfig.from_dict(hf) == cfg


def test_q_lora_rank_zero_means_none():
    assert tiny_config(q_lora_rank=0).q_lora_rank is None
    assert ModelConfig.from_dict({**RELEASED, "q_lora_rank": 0}).q_lora_rank is None
    assert not hasattr(DeepSeekV3(tiny_config(q_lora_rank=0)).layers[0].self_attn, "q_a_proj")


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "num_experts_per_tok"),  # 2 groups of 2 kept
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(moe_intermediate_size=36), "moe_intermediate_size"),  # grouped-GEMM rows must be 16-byte aligned
        (dict(rope_scaling={**SHAPES["shared2-yarn0.707-2groups"]["rope_scaling"], "type": "dynamic"}),
         "rope_scaling"),
        # each bound at its edge: the first value refused
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(moe_layer_freq=0), "moe_layer_freq"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(intermediate_size=0), "intermediate_size"),  # TINY's first layer is dense
        (dict(n_group=0, topk_group=0), "n_group"),
        (dict(topk_group=0), "topk_group"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(rope_scaling={"type": "yarn", "factor": 0.99}), "rope_scaling"),
    ],
)
def test_validation_error_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"config field `{field}`"):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides", [
    dict(num_nextn_predict_layers=0), dict(n_shared_experts=0), dict(first_k_dense_replace=0, intermediate_size=0),
    dict(first_k_dense_replace=3), dict(q_lora_rank=None), dict(topk_group=4, num_experts_per_tok=8),
    dict(n_group=1, topk_group=1), dict(rms_norm_eps=1e-12), dict(rope_scaling={"type": "yarn", "factor": 1.0}),
])
def test_values_at_the_edge_of_each_range_are_accepted(overrides):
    cfg = tiny_config(**overrides)
    assert all(getattr(cfg, k) == v for k, v in overrides.items())


def test_yarn_defaults_for_keys_a_rope_scaling_block_omits():
    # DeepSeek's own modeling_deepseek.py (DeepseekV3YarnRotaryEmbedding and the attention's softmax scale) reads
    # a missing original_max_position_embeddings as 4096, beta_fast 32, beta_slow 1, mscale 1 and
    # mscale_all_dim 0; mscale_all_dim 0 means no softmax correction, and cos/sin then carry
    # mscale(s, 1) / mscale(s, 0) = 0.1 ln s + 1 (transformers' YaRN gives the same factor without mscale_all_dim)
    import math

    from dsv3.model.rope import rope_frequencies

    cfg = tiny_config(rope_scaling={"type": "yarn", "factor": 4})
    assert cfg.yarn == {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    assert cfg.softmax_scale == (24 + 16) ** -0.5
    assert rope_frequencies(cfg)[1] == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    # against the same block with every key written out: identical frequencies, and only mscale_all_dim = 1
    # (the released value) brings the softmax factor (0.1 ln 4 + 1)^2 = 1.2966 and unscaled cos/sin
    full = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0}
    assert torch.equal(rope_frequencies(tiny_config(rope_scaling=full))[0], rope_frequencies(cfg)[0])
    released = tiny_config(rope_scaling={**full, "mscale_all_dim": 1.0})
    assert released.softmax_scale == pytest.approx(40**-0.5 * (0.1 * math.log(4) + 1) ** 2, rel=1e-12)
    assert rope_frequencies(released)[1] == 1.0
    # the ramp: with an original context of 4096 and d_R 16, theta 1e4, correction dims floor(2.62) = 2 and
    # ceil(5.63) = 6; a 512-token original context (TINY's max_position_embeddings) would give 0 and 4
    f = rope_frequencies(cfg)[0]
    base = 1e4 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ramp = ((torch.arange(8, dtype=torch.float64) - 2) / 4).clamp(0, 1)
    assert torch.allclose(f, base * (1 - ramp) + base / 4 * ramp, rtol=1e-15, atol=0)


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="tiny"):
        preset("7b")


def test_a_config_without_any_rope_key_is_plain_rope():
    # as transformers reads it; V3's YaRN is the dataclass default only for presets
    d = tiny_config().to_dict()
    d.pop("rope_scaling")
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling is None and cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5, rel=1e-12)
    hf = DeepseekV3Config(**{k: v for k, v in d.items() if k != "torch_dtype"})
    assert hf.rope_parameters.get("rope_type", "default") == "default"


@pytest.mark.parametrize("field,value,message", [
    ("qk_rope_head_dim", "64", "must be an integer"), ("rms_norm_eps", "1e-6", "must be a number"),
    ("norm_topk_prob", "yes", "must be true or false"), ("n_group", True, "must be an integer"),
    ("q_lora_rank", 1.5, "must be an integer or null"), ("rope_scaling", 5, "must be an object or null"),
    ("rope_parameters", [1], "must be an object or null"), ("routed_scaling_factor", float("inf"), "must be a finite"),
    ("rms_norm_eps", float("nan"), "must be a finite number"),
])
def test_wrong_json_types_name_the_field(field, value, message):
    # a hand-edited config.json: a string where a number belongs fails as a ConfigError naming the field,
    # not as a TypeError deep in validation or the model
    d = preset("tiny").to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=f"`{field}`: {message}"):
        ModelConfig.from_dict(d)


def test_config_json_that_is_not_json_or_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not a JSON file"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, found list"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("key,value", [("factor", None), ("mscale_all_dim", None), ("factor", "4x"),
                                       ("original_max_position_embeddings", None), ("beta_fast", float("inf"))])
def test_yarn_numbers_are_checked(key, value):
    d = preset("tiny").to_dict()
    d["rope_scaling"] = {**d["rope_scaling"], key: value}
    with pytest.raises(ConfigError, match=f"`rope_scaling.{key}`: must be a finite number"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name", ["mps", "meta", "cpu:3", "xla"])
def test_devices_other_than_cpu_and_cuda_are_refused(name):
    from dsv3.argtypes import resolve_device

    with pytest.raises(ConfigError, match=f"--device: '{name}' is not"):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("change, match", [
    ({"rope_interleave": False}, "rope_interleave"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": False}}, "rope_scaling.truncate"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "attention_factor": 1.2}},
     "rope_scaling.attention_factor"),
])
def test_transformers_rope_options_we_do_not_compute_are_refused(change, match):
    # silently ignored, they gave other logits (rope_interleave false: 0.54 of the largest logit off)
    d = {**tiny_config().to_dict(), **change}
    if "rope_parameters" in change:
        d.pop("rope_scaling")
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d)
    ok = {**tiny_config().to_dict(), "rope_interleave": True,
          "rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": True, "attention_factor": None}}
    ModelConfig.from_dict(ok)  # their defaults are what we compute
