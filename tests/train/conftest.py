"""Tiny DeepSeek-V3 configs and models for the training tests (2 cores, well under a second per forward)."""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3


def tiny_config(**overrides) -> ModelConfig:
    """hidden 32, 3 layers (1 dense + 2 MoE), MTP depth 1, 8 routed experts in 2 groups, top-2."""
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_nextn_predict_layers=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        rope_scaling=None, max_position_embeddings=128,
    )
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny_model(tiny_cfg: ModelConfig) -> DeepSeekV3:
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_cfg)
    model.init_weights(0.09)
    return model


# ---- runs of the training loop (tests/train/test_loop.py) ----------------------------------------------

LOOP_MODEL = dict(
    vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_nextn_predict_layers=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
    n_routed_experts=8, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
    n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=None,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def loop_corpus() -> str:
    """~400 KB of real code: the standard library's `email` package (30 files)."""
    import sysconfig
    from pathlib import Path

    return str(Path(sysconfig.get_paths()["stdlib"]) / "email")


@pytest.fixture(scope="session")
def loop_tok_dir(tmp_path_factory, loop_corpus):
    """A 300-id BPE trained on the corpus (fits LOOP_MODEL's 320 embedding rows)."""
    from dsv3.data.corpus import iter_documents
    from dsv3.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("loop_tok")
    train_bpe(iter_documents(loop_corpus), 300, out)
    return out


@pytest.fixture(scope="session")
def loop_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loop_tokens")


@pytest.fixture
def make_run(tmp_path, loop_corpus, loop_tok_dir, loop_cache_dir):
    """Factory: `make_run(name, **{"train.tokens": ...})` -> RunConfig of a ~50K-parameter model that takes
    well under a second per step: seq 32, micro-batch 4, batch 8, no TensorBoard or plots unless asked."""
    from dsv3.train.run import RunConfig

    def make(name: str = "run", **settings):
        run = RunConfig()
        base = {
            "run.dir": str(tmp_path / name), "model.preset": "tiny",
            "data.sources": [loop_corpus], "data.tokenizer": str(loop_tok_dir), "data.seq_len": 32,
            "data.val_fraction": 0.2, "data.cache_dir": str(loop_cache_dir),
            "train.tokens": 8 * 32 * 6, "train.batch_size": 8, "train.micro_batch_size": 4,
            "train.batch_ramp": False,
            "train.lr": 3e-3, "train.eval_interval": 3, "train.eval_batches": 2,
            "train.checkpoint_interval": 100, "train.keep_last": 0,
            "log.progress": False, "log.tensorboard": False, "log.plots": False, "log.load_interval": 2,
        }
        base.update({f"model.{k}": v for k, v in LOOP_MODEL.items()})
        for k, v in {**base, **settings}.items():
            run.set(k, v)
        return run

    return make
