"""`dsv3 info` counts: exact against an instantiated model, and the released V3's published sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dsv3.cli import main
from dsv3.config import preset
from dsv3.info import count_params, forward_flops_per_token, kv_cache_bytes_per_token
from dsv3.model import DeepSeekV3
from tests.conftest import SHAPES, tiny_config


@pytest.mark.parametrize("shape", list(SHAPES))
def test_counts_equal_instantiated_model(shape):
    cfg = tiny_config(**SHAPES[shape])
    model = DeepSeekV3(cfg)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    p = count_params(cfg)
    assert p.main == sum(v for n, v in numel.items() if not n.startswith("mtp."))
    assert p.mtp_total == sum(v for n, v in numel.items() if n.startswith("mtp."))
    assert p.embedding == numel["embed_tokens.weight"] and p.head == numel["lm_head.weight"]
    # activated = everything but the (E - K) routed experts each token skips, in every MoE block
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    skipped = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    assert p.main_active == p.main - cfg.n_moe_layers * skipped
    assert p.mtp_active == p.mtp_total - cfg.num_nextn_predict_layers * skipped


def test_deepseek_v3_published_sizes():
    cfg = preset("671b")
    p = count_params(cfg)
    assert round(p.main / 1e9, 2) == 671.03  # SPEC 6: 671.03B in the main model
    assert round(p.main_active / 1e9, 2) == 37.55  # with embedding and head
    assert round((p.main_active - p.embedding) / 1e9, 2) == 36.63  # without the embedding lookup
    assert kv_cache_bytes_per_token(cfg) == (512 + 64) * 61 * 2 == 70_272


def test_flops_hand_count():
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    # matmul weights of the main model: every matrix but the embedding table, minus the experts a token skips
    matrices = sum(
        q.numel() for n, q in model.named_parameters() if q.dim() >= 2 and not n.startswith(("mtp.", "embed_tokens"))
    )
    skipped = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    matmul = matrices - cfg.n_moe_layers * skipped
    # attention: what PyTorch's own FLOP counter charges one query's SDPA over 100 keys, per layer
    q = torch.zeros(1, cfg.num_attention_heads, 1, cfg.qk_head_dim)
    k = torch.zeros(1, cfg.num_attention_heads, 100, cfg.qk_head_dim)
    v = torch.zeros(1, cfg.num_attention_heads, 100, cfg.v_head_dim)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    attn = counter.get_total_flops() // 100 * cfg.num_hidden_layers
    assert attn == 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    assert forward_flops_per_token(cfg, 100) == 2 * matmul + attn * 100
    assert forward_flops_per_token(cfg, 100, causal_mean=True) == int(2 * matmul + attn * 50.5)


def test_info_cli(capsys):
    assert main(["info", "--preset", "671b"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "37.55B" in out and "70,272 bytes" in out
    assert main(["info", "--config", "/no/such/dir"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_refuses_a_context_below_one_and_tells_its_version(capsys):
    for context in ("0", "-5"):
        with pytest.raises(SystemExit) as e:
            main(["info", "--context", context])
        assert e.value.code == 2 and "argument --context: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("dsv3 ")


def test_cli_stops_quietly_when_its_reader_goes_away(monkeypatch, capsys):
    # `dsv3 info | head -1`: the write fails with EPIPE; no traceback, the shell's SIGPIPE status
    import dsv3.cli

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(dsv3.cli, "cmd_info", closed_pipe)
    assert main(["info"]) == 141 and capsys.readouterr().err == ""
