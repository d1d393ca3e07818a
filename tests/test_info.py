"""`dsv3 info` counts: exact against an instantiated model, and the released V3's published sizes."""

from __future__ import annotations

import re

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


def test_info_rows_of_the_tiny_preset(capsys):
    """Every row of `dsv3 info --preset tiny --context 1024`, counted by hand from the preset (vocab 4096, hidden
    256, 4 layers of which 1 dense (FFN 768), 4 heads, q_lora 128, kv_lora 64, rope 32, nope 64, v 64, 16 routed
    experts of width 128 + 1 shared, top-4, MTP depth 1)."""
    # attention per layer: q_a 256*128 + its norm 128 + q_b 128*4*96; kv_a 256*(64+32) + its norm 64 + kv_b
    # 64*4*(64+64); o 4*64*256
    attn = 256 * 128 + 128 + 128 * 4 * 96 + 256 * 96 + 64 + 64 * 4 * 128 + 4 * 64 * 256
    assert attn == 204_992
    expert = 3 * 256 * 128  # gate, up, down
    moe, moe_active = 16 * 256 + 17 * expert, 16 * 256 + 5 * expert  # router + experts (routed + shared)
    main_total = 2 * 4096 * 256 + 4 * attn + 3 * 256 * 768 + 3 * moe + (4 * 2 * 256 + 256)
    main_active = main_total - 3 * (moe - moe_active)
    assert (main_total, main_active) == (8_535_040, 4_996_096)
    mtp = 2 * 256 + attn + 3 * 256 + 2 * 256 * 256  # enorm, hnorm, block + head norms, eh_proj
    # forward FLOPs: 2 x matmul weights (activated, without the embedding lookup and the RMSNorm weights:
    # 2304 block/final + 4 * (128 + 64) latent) + 2 * 4 layers * 4 heads * (96 + 64) = 5120 per key
    matmul = main_active - 4096 * 256 - 2304 - 4 * (128 + 64)
    assert main(["info", "--preset", "tiny", "--context", "1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("tiny: 4 layers (1 dense), hidden 256, 4 heads, 16 routed experts (top-4, 4 groups keep 2), "
                        "vocab 4,096")
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[1:])  # label, value
    assert rows == {
        "total parameters (main model)": "8.54M",  # 8,535,040
        "without embedding": "7.49M",  # - 1,048,576
        "embedding / head": "1.05M / 1.05M",
        "attention (MLA)": "0.82M",  # 4 * 204,992 = 819,968
        "dense FFN": "0.59M",  # 589,824
        "MoE (routers + experts)": "5.03M",  # 3 * 1,675,264 = 5,025,792
        "activated per token (main model)": "5.00M",  # 4,996,096
        "without embedding lookup": "3.95M",  # 3,947,520
        "MTP modules (1), total / activated": "2.01M / 0.83M",  # 337,344 + 1,675,264 / + 495,616
        "KV cache per token, BF16": "768 bytes",  # 4 layers * (64 + 32) * 2 bytes
        "KV cache per token, FP8 (1 byte/value)": "384 bytes",
        "forward FLOPs per token, at context 1,024": "13.13 MFLOP",  # 2 * 3,944,448 + 5120 * 1024
        "averaged over a causal 1,024-token sequence": "10.51 MFLOP",  # 2 * 3,944,448 + 5120 * 512.5
    }
    assert (mtp + moe, mtp + moe_active) == (2_012_608, 832_960)
    assert matmul == 3_944_448 and 2 * matmul + 5120 * 1024 == 13_131_776 and 2 * matmul + 5120 * 512.5 == 10_512_896
    p = count_params(preset("tiny"))
    assert (p.main, p.main_active, p.mtp_total, p.mtp_active) == (main_total, main_active, mtp + moe, mtp + moe_active)
    assert kv_cache_bytes_per_token(preset("tiny")) == 768 and kv_cache_bytes_per_token(preset("tiny"), 1) == 384
    assert kv_cache_bytes_per_token(preset("tiny"), 2, mtp=True) == 5 * 96 * 2
    assert forward_flops_per_token(preset("tiny"), 1024) == 13_131_776  # the rounded rows, exactly
    assert forward_flops_per_token(preset("tiny"), 1024, causal_mean=True) == 10_512_896


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
