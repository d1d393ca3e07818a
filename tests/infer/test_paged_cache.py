"""Attention over the paged latent pool against full recompute: the cache must not change the model's outputs.

The slow twin is the model's own uncached forward over the whole sequence (expanded attention). The fast path
prefills a batch of prompts of different lengths (padded, expanded attention, latents written to the pool),
then decodes ragged rows with the absorbed attention over latents gathered through non-contiguous block
tables from a pool that starts full of garbage. Dense float64: agreement to 1e-11 says the math is the same
(only summation order differs). With MoE layers the router computes in float32 by design (SPEC 1.4), so a
1-ulp difference of its input moves float64 gates by ~1e-8: tolerance 1e-6. float32: 2e-4 on logits ~1.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.infer.block_manager import BlockManager
from dsv3.infer.model_runner import ModelRunner
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.sequence import Sequence
from dsv3.model.cache import StaticLatentCache


@pytest.mark.parametrize(("dense", "dtype", "tol"), [
    (True, torch.float64, 1e-11), (False, torch.float64, 1e-6), (False, torch.float32, 2e-4),
])
def test_paged_decode_matches_full_forward(make_cfg, make_model, dense, dtype, tol) -> None:
    cfg = make_cfg(num_nextn_predict_layers=0)
    if dense:
        cfg = make_cfg(num_nextn_predict_layers=0, first_k_dense_replace=cfg.num_hidden_layers)
    model = make_model(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    lengths = [1, 6, 13, 4]
    full = [torch.randint(0, cfg.vocab_size, (n + 12,), generator=g).tolist() for n in lengths]
    blocks = BlockManager(num_blocks=64, block_size=4)
    cache = PagedLatentCache(cfg, 64, 4, cfg.num_hidden_layers, dtype=dtype)
    cache.pool.normal_(0, 100.0, generator=g)  # stale latents everywhere: masking, not zeros, must hide them
    runner = ModelRunner(model, cache, blocks)
    seqs = [Sequence(i, full[i][:n], SamplingParams(), None) for i, n in enumerate(lengths)]
    # reserve in small interleaved steps so that every block table is scattered over the pool
    for upto in range(1, max(lengths) + 1):
        for s, n in zip(seqs, lengths, strict=True):
            blocks.reserve(s.seq_id, min(upto, n))
    with torch.inference_mode():
        ref = [model(torch.tensor([f])).logits[0] for f in full]
        _, last, _, _ = runner.prefill(seqs)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(last[b], ref[b][n - 1], rtol=0, atol=tol)
        for s in seqs:
            s.num_cached = len(s.tokens)
        # decode 1, then 3, then 1, 2, ... tokens per row per step (a verification step feeds several)
        # each S is its own static decode shape: a runner per S over the same pool and blocks
        for S in (1, 3, 1, 2, 4, 1):
            for s in seqs:
                blocks.reserve(s.seq_id, s.num_cached + S)
            fed = [full[s.seq_id][s.num_cached : s.num_cached + S] for s in seqs]
            step_runner = ModelRunner(model, cache, blocks, max_batch=8, tokens_per_step=S)
            step_runner.prepare_decode(seqs, fed)
            _, logits, _ = step_runner.decode()
            for b, s in enumerate(seqs):
                expect = ref[b][s.num_cached : s.num_cached + S]
                torch.testing.assert_close(logits[b], expect, rtol=0, atol=tol)
                s.num_cached += S
    blocks.check()


def _decode_logits(model, cfg, device, dtype, steps=(1, 3, 1, 2)):
    """Prefill four ragged prompts into a garbage-filled pool with scattered block tables, then decode `steps`
    tokens per row per step; every step's logits [B, S, vocab] on the CPU in float64."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 6, 13, 4]
    full = [torch.randint(0, cfg.vocab_size, (n + sum(steps),), generator=g).tolist() for n in lengths]
    blocks = BlockManager(num_blocks=64, block_size=4)
    cache = PagedLatentCache(cfg, 64, 4, cfg.num_hidden_layers, device=device, dtype=dtype)
    cache.pool.normal_(0, 100.0)
    seqs = [Sequence(i, full[i][:n], SamplingParams(), None) for i, n in enumerate(lengths)]
    for upto in range(1, max(lengths) + 1):
        for s, n in zip(seqs, lengths, strict=True):
            blocks.reserve(s.seq_id, min(upto, n))
    out = []
    with torch.inference_mode():
        ModelRunner(model, cache, blocks).prefill(seqs)
        for s in seqs:
            s.num_cached = len(s.tokens)
        for S in steps:
            for s in seqs:
                blocks.reserve(s.seq_id, s.num_cached + S)
            runner = ModelRunner(model, cache, blocks, max_batch=8, tokens_per_step=S, cuda_graphs=False)
            runner.prepare_decode(seqs, [full[s.seq_id][s.num_cached : s.num_cached + S] for s in seqs])
            out.append(runner.decode()[1].double().cpu())
            for s in seqs:
                s.num_cached += S
    return out, full, lengths


def test_the_paged_kernel_policy_sees_the_steps_rows(make_cfg, make_model, monkeypatch) -> None:
    # PagedStep.update asks mla_decode whether to hand over the pages, for this step's number of sequences
    import dsv3.infer.paged_cache as pc

    seen = []
    monkeypatch.setattr(pc, "paged_decode_supported", lambda pool, C, rows: seen.append((C, rows)) or False)
    cfg = make_cfg(num_nextn_predict_layers=0)
    _decode_logits(make_model(cfg, dtype=torch.float32), cfg, "cpu", torch.float32, steps=(1,))
    assert seen and set(seen) == {(cfg.kv_lora_rank, 4)}  # four rows, every layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_reads_the_pages_in_place_as_accurately(make_cfg, make_model, monkeypatch) -> None:
    # bf16 on CUDA: attention reads the pool through the block tables (dsv3.model.mla_decode) instead of
    # gathering it; against the float64 model's full forward its logits are as close as the gathering path's
    import dsv3.infer.paged_cache as pc
    import dsv3.model.attention as attention
    import dsv3.model.mla_decode as mla_decode

    monkeypatch.setattr(mla_decode, "MIN_ROWS", 1)  # four rows here

    cfg = make_cfg(num_nextn_predict_layers=0)
    cfg = make_cfg(num_nextn_predict_layers=0, first_k_dense_replace=cfg.num_hidden_layers)  # no routing flips
    model = make_model(cfg, dtype=torch.float64)
    calls = []  # every decode layer: the query through absorb_query, latents finished as stored, paged attention
    for mod, name in [(attention, "paged_decode"), (attention, "absorb_query"), (pc, "store_latents")]:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **k: calls.append(
            name if name != "store_latents" or k.get("finish") is None else "finish") or real(*a, **k))
    fast, full, lengths = _decode_logits(model.to("cuda", torch.bfloat16), cfg, "cuda", torch.bfloat16)
    assert calls.count("paged_decode") == calls.count("absorb_query") == calls.count("finish") > 0
    monkeypatch.setattr(pc, "paged_decode_supported", lambda pool, C, rows: False)
    slow, _, _ = _decode_logits(model, cfg, "cuda", torch.bfloat16)
    model = model.to("cpu", torch.float64)
    with torch.inference_mode():
        ref = [model(torch.tensor([f])).logits[0] for f in full]
    err_fast = err_slow = 0.0
    done = 0
    for a, b in zip(fast, slow, strict=True):
        S = a.shape[1]
        for row, n in enumerate(lengths):
            want = ref[row][n + done : n + done + S]
            err_fast = max(err_fast, (a[row] - want).abs().max().item())
            err_slow = max(err_slow, (b[row] - want).abs().max().item())
        done += S
    scale = max(r.abs().max().item() for r in ref)
    assert err_fast <= 1.5 * err_slow + 2.0**-8 * scale, (err_fast, err_slow, scale)
    assert err_fast <= 0.05 * scale, (err_fast, scale)  # bf16 weights and activations through a few layers


def test_static_cache_still_matches_full_forward(make_cfg, make_model) -> None:
    """The contiguous cache's contract after the LatentCache change: chunked == uncached, float64."""
    cfg = make_cfg()
    model = make_model(cfg, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(tokens, mtp=False).logits
        cache = StaticLatentCache(cfg, 2, 16, dtype=torch.float64)
        parts = [model(tokens[:, a:b], cache=cache, start_pos=a).logits for a, b in ((0, 7), (7, 8), (8, 15))]
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=0, atol=1e-6)  # float32 router: see above


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token(make_cfg, dtype) -> None:
    """(kv_lora_rank + qk_rope_head_dim) * layers * element size, and nothing else in the pool."""
    cfg = make_cfg()
    for layers in (cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        cache = PagedLatentCache(cfg, num_blocks=10, block_size=16, n_layers=layers, dtype=dtype)
        expect = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers * torch.finfo(dtype).bits // 8
        assert cache.bytes_per_token == expect
        assert cache.pool.numel() * cache.pool.element_size() == expect * 10 * 16


def test_bytes_per_token_of_deepseek_v3() -> None:
    """SPEC 1.1: 576 values per token per layer, 70,272 bytes per token for the 61 layers in BF16 (the pool
    is built on the meta device: shapes only)."""
    from dsv3.config import preset

    cfg = preset("671b")
    cache = PagedLatentCache(cfg, num_blocks=2, block_size=64, n_layers=cfg.num_hidden_layers, device="meta",
                             dtype=torch.bfloat16)
    assert cache.bytes_per_token == 70_272
