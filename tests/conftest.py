"""Fixtures shared by the whole suite: tiny random DeepSeek-V3 configs and models.

Every test model is built here, from `TINY` (hidden 64, 3 layers, vocab 300, 8 routed experts in 4 groups)
with per-test overrides, so a change of the baseline shape happens in one place. `SHAPES` names the config
variants that parametrised tests run over (`@pytest.mark.parametrize("tiny_cfg", [...], indirect=True)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3

# YaRN scaled for a 64-token "original" context: with qk_rope_head_dim 16 the ramp covers pairs 0..3, so both
# the frequencies and the softmax factor (0.1 ln 4 + 1)^2 = 1.30 differ from plain RoPE.
YARN: dict[str, Any] = {
    "type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0,
}

# All widths are multiples of 4: torch's grouped_mm wants 16-byte strides for float32.
TINY: dict[str, Any] = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, first_k_dense_replace=1, initializer_range=0.1,
    max_position_embeddings=512, rope_scaling=YARN, torch_dtype="float32",
)

# Named variants of TINY. Together they cover: q_lora_rank on/None; n_group 1, 2 and 4; MTP off, depth 1
# and 2; YaRN off, mscale = mscale_all_dim = 1 and 0.707; first_k_dense_replace 0 and 1; n_shared_experts
# 0, 1, 2.
SHAPES: dict[str, dict[str, Any]] = {
    "base": {},
    "no_qlora-1group-rope-mtp2-dense0": dict(
        q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None, num_nextn_predict_layers=2,
        first_k_dense_replace=0,
    ),
    "shared2-yarn0.707-2groups": dict(
        n_shared_experts=2, n_group=2, topk_group=1, num_experts_per_tok=2,
        rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # transformers' MtpModel insists on the zero-width shared-expert tensors that only transformers writes,
    # so the n_shared_experts=0 shape runs without MTP
    "shared0-nomtp-16experts": dict(
        n_shared_experts=0, num_nextn_predict_layers=0, n_routed_experts=16, topk_group=3,
        num_experts_per_tok=4, q_lora_rank=None,
    ),
}


# pyproject.toml's default per-test timeout (300 s) is for the default suite; compilations may take longer
LONG_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow or gpu get LONG_TIMEOUT_S unless they set their own `timeout` mark."""
    for item in items:
        long = item.get_closest_marker("slow") or item.get_closest_marker("gpu")
        if long and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


def tiny_config(**overrides: Any) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def randomize_bias_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every router a random e_score_correction_bias, so that the bias changes which experts win."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            b = getattr(m, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * std)


def random_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, std: float = 0.1, seed: int = 0,
    bias_std: float = 0.1,
) -> DeepSeekV3:
    """DeepSeekV3(cfg) with N(0, std) weights (0.1: logits of order 1, not tiny), RMSNorm weights drawn from
    U(0.5, 1.5) (all ones would hide a norm that skips its weight, or two norms swapped), and random router
    biases."""
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg)
    model.init_weights(std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    randomize_bias_(model, bias_std, seed)
    return model.to(dtype).eval()


@pytest.fixture
def make_cfg() -> Callable[..., ModelConfig]:
    """Factory: `make_cfg(**overrides)` -> TINY with the overrides."""
    return tiny_config


@pytest.fixture
def tiny_cfg(request: pytest.FixtureRequest) -> ModelConfig:
    """The SHAPES entry named by indirect parametrisation (default: base)."""
    return tiny_config(**SHAPES[getattr(request, "param", "base")])


@pytest.fixture
def make_model() -> Callable[..., DeepSeekV3]:
    """Factory: `make_model(cfg, dtype=..., std=..., seed=..., bias_std=...)` -> random eval-mode model."""
    return random_model


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of 2 random sequences of 24 tokens from the TINY vocabulary."""
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
