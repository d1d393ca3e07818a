"""Serving an FP8 checkpoint with its weights kept in E4M3 (load_model(fp8="keep"), dsv3.fp8's FP8Linear and
FP8Experts): the checkpoint's bytes in memory at about half BF16's size, no dequantised copy made while
loading, logits identical to the dequantised load on the CPU (whose FP8 path is dequantise + matmul), each
layer within the E4M3 bound of float64, the whole model within the bound that the per-layer one compounds
to, the absorbed decode path and the engine, `dsv3 generate --fp8-weights keep`, and (marked gpu) the cuBLAS
path end to end."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import dsv3.checkpoint
from dsv3.checkpoint import CheckpointError, fp8_module_names, hf_layout, is_fp8_weight, load_model, save_model
from dsv3.fp8 import FP8Experts, FP8Linear, dequantize_blockwise, quantize_blockwise, to_fp8_
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.model.cache import StaticLatentCache
from dsv3.model.moe import RouterOutput
from tests.conftest import random_model, tiny_config
from tests.model.test_moe import experts_reference, record_few_pairs
from tests.test_checkpoint import UNALIGNED, read_checkpoint, write_checkpoint

FP8 = torch.float8_e4m3fn
# Every block grid ragged: hidden 200 = 128 + 72, q_lora 136, kv_a_proj_with_mqa 80 rows, dense FFN 300,
# experts 40 wide (gate and up each keep their own one-row grid, which their concatenation would not have).
RAGGED = UNALIGNED
# Multiples of 128 beside ragged widths: hidden 256, kv_lora 128 (kv_a_proj_with_mqa 144 rows), dense FFN 384,
# experts 128 wide (gate and up block rows line up); q_lora 136.
MIXED = {**UNALIGNED, "hidden_size": 256, "kv_lora_rank": 128, "intermediate_size": 384,
         "moe_intermediate_size": 128}
CONFIGS = {"ragged": RAGGED, "mixed": MIXED}


@pytest.fixture(params=list(CONFIGS))
def fp8_ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, nn.Module]:
    """An FP8 checkpoint written by save_model(fp8=True) from a random float64 model (returned with it)."""
    model = random_model(tiny_config(**CONFIGS[request.param]), torch.float64)
    save_model(model, tmp_path / "ck", fp8=True)
    return tmp_path / "ck", model


def tokens(n: int = 24, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def fp8_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dtype == FP8]


# ---- loading -----------------------------------------------------------------------------------------------

def test_keep_holds_the_checkpoint_bytes_in_half_the_memory(fp8_ckpt):
    path, _ = fp8_ckpt
    disk = read_checkpoint(path)
    model = load_model(path, dtype=torch.bfloat16, fp8="keep")
    layout, state = hf_layout(model), model.state_dict()
    n_fp8 = 0
    for name, t in disk.items():
        if name not in layout:  # the MTP layer's copies of the shared embedding and head
            assert name.endswith(("embed_tokens.weight", "shared_head.head.weight")), name
            continue
        ours, idx = layout[name]
        got = state[ours][idx]
        if t.dtype == FP8:
            n_fp8 += 1
            assert got.dtype == FP8 and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name
        elif name.endswith("_scale_inv"):
            assert got.dtype == torch.float32 and torch.equal(got, t), name
        else:
            assert got.dtype == (torch.float32 if name.endswith("bias") else torch.bfloat16), name
    assert n_fp8 > 20
    # every weight the FP8 layout quantises is held in E4M3, in the FP8 twins of its module
    assert all(state[ours].dtype == FP8 for hf, (ours, _) in layout.items() if is_fp8_weight(hf))
    attn, moe = model.layers[1].self_attn, model.layers[1].mlp
    assert isinstance(attn.kv_b_proj, FP8Linear) and isinstance(attn.kv_a_proj_with_mqa, FP8Linear)
    assert isinstance(moe.experts, FP8Experts) and isinstance(moe.shared_experts.down_proj, FP8Linear)
    assert isinstance(model.layers[0].mlp.up_proj, FP8Linear)
    assert isinstance(model.mtp[0].block.mlp.experts, FP8Experts)
    for kept in (model.lm_head, model.mtp[0].eh_proj):
        assert type(kept) is nn.Linear and kept.weight.dtype == torch.bfloat16
    # memory: one byte per weight plus a float32 scale per 128x128 block, against two bytes in BF16
    n = sum(p.numel() for p in fp8_weights(model))
    scales = sum(p.numel() * 4 for name, p in model.named_parameters() if name.endswith("_scale_inv"))
    assert (n + scales) / (2 * n) < 0.505
    dense = load_model(path, dtype=torch.bfloat16)

    def nbytes(m: nn.Module) -> int:  # the dequantised kv_b_proj copies of the keep model count too
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    # the whole model saves a byte per FP8 weight, less the scales and the BF16 kv_b_proj copies
    kv_b = sum(m.self_attn.kv_b_proj.weight.numel() for m in [*model.layers, *(b.block for b in model.mtp)])
    assert nbytes(dense) - nbytes(model) == n - scales - 2 * kv_b


def test_keep_never_dequantises_while_loading(fp8_ckpt, monkeypatch):
    path, _ = fp8_ckpt

    def refuse(*args, **kwargs):
        raise AssertionError("the loader dequantised a weight")

    monkeypatch.setattr(dsv3.checkpoint, "dequantize_blockwise", refuse)
    model = load_model(path, dtype=torch.bfloat16, fp8="keep")
    assert fp8_weights(model)
    # and the FP8 modules exist before any storage: the empty model never holds these weights in BF16
    empty = dsv3.checkpoint.build_empty(model.cfg, "meta", torch.bfloat16, fp8=True)
    layout = hf_layout(empty)
    assert {n for n, p in empty.named_parameters() if p.dtype == FP8} == {
        ours for hf, (ours, _) in layout.items() if is_fp8_weight(hf)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_logits_identical_to_dequantised_load(fp8_ckpt, dtype):
    """On the CPU an FP8 linear dequantises its weight to the activation dtype (one float32 product per
    element, then one rounding) and multiplies: the numbers the dequantising loader puts in the parameters."""
    path, _ = fp8_ckpt
    kept = load_model(path, dtype=dtype, fp8="keep")
    dense = load_model(path, dtype=dtype)
    with torch.no_grad():
        a, b = kept(tokens()), dense(tokens())
    assert torch.equal(a.logits, b.logits)
    assert len(a.mtp_logits) == 1 and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_absorbed_decode_and_engine_with_kept_weights(fp8_ckpt):
    """Cached decode runs MLA absorbed, multiplying by kv_b_proj's weight directly: the FP8 module gives its
    cached dequantised copy, the same numbers the dequantised load holds."""
    path, _ = fp8_ckpt
    kept = load_model(path, dtype=torch.float32, fp8="keep")
    dense = load_model(path, dtype=torch.float32)
    kv_b = kept.layers[0].self_attn.kv_b_proj
    assert kv_b.dense is not None and kv_b.dense.dtype == torch.float32
    assert torch.equal(kv_b.dense_weight(torch.float32), dense.layers[0].self_attn.kv_b_proj.weight)
    x = tokens(20, batch=1)
    outs = []
    with torch.no_grad():
        for m in (kept, dense):
            cache = StaticLatentCache(m.cfg, 1, 32)
            steps = [m(x[:, :12], cache=cache).logits]
            steps += [m(x[:, i:i + 1], start_pos=i, cache=cache).logits for i in range(12, 20)]
            outs.append(torch.cat(steps, dim=1))
        full = kept(x).logits
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], full, rtol=1e-4, atol=1e-4)  # absorbed == expanded, float32 reordering
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = [x[0, :5].tolist(), x[0, :11].tolist()]
    got = [r.token_ids for r in Engine(kept, max_model_len=64).generate(prompts, params)]
    want = [r.token_ids for r in Engine(dense, max_model_len=64).generate(prompts, params)]
    assert got == want and all(len(t) == 8 for t in got)


# ---- error against float64 ---------------------------------------------------------------------------------

def weight_bound(w: torch.Tensor, s_elem: torch.Tensor) -> torch.Tensor:
    """|dequantised - w| per element for w quantised from float64: E4M3 keeps 3 mantissa bits, so rounding to
    nearest costs 2^-4 |w| in the normal range and half the subnormal step 2^-9 (in units of the block scale)
    below it; float64 -> float32 before quantising, the float32 division and the float32 product of the
    dequantisation add 2^-24 relative each (2^-20 covers them)."""
    return (2**-4 + 2**-20) * w.abs() + 2**-10 * s_elem * (1 + 2**-20)


def n_fp8_matrices(model: nn.Module) -> int:
    """FP8 weight matrices on the main model's path: each FP8Linear, and gate, up and down of the experts."""
    mods = list(model.layers.modules())
    return sum(isinstance(m, FP8Linear) for m in mods) + 3 * sum(isinstance(m, FP8Experts) for m in mods)


def expand(s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return s.double().repeat_interleave(128, -2)[..., : shape[-2], :].repeat_interleave(128, -1)[..., : shape[-1]]


def test_each_fp8_layer_within_e4m3_bound_of_float64(fp8_ckpt):
    path, ref = fp8_ckpt
    model = load_model(path, dtype=torch.float64, fp8="keep")
    ref_state = ref.state_dict()
    g = torch.Generator().manual_seed(0)
    n_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            n_linear += 1
            w = ref_state[name + ".weight"]
            x = torch.randn(7, m.in_features, generator=g, dtype=torch.float64)
            with torch.no_grad():
                err = (m(x) - x @ w.T).abs()
            # |x (W^ - W)^T| <= |x| |W^ - W|^T elementwise, plus float64's own rounding of the product
            bound = x.abs() @ weight_bound(w, expand(m.weight_scale_inv, w.shape)).T
            assert (err <= bound + 1e-12 * (x.abs() @ w.abs().T)).all(), name
        elif isinstance(m, FP8Experts):
            gate_up, down = m.weights(torch.float64)
            i = m.inter
            s = m.gate_up_proj_scale_inv
            rows = s.shape[1] // 2  # gate and up on their own grids
            s_elem = torch.cat([expand(s[:, :rows], gate_up[:, :i].shape),
                                expand(s[:, rows:], gate_up[:, i:].shape)], dim=1)
            w = ref_state[name + ".gate_up_proj"]
            assert ((gate_up - w).abs() <= weight_bound(w, s_elem)).all(), name
            w = ref_state[name + ".down_proj"]
            assert ((down - w).abs() <= weight_bound(w, expand(m.down_proj_scale_inv, w.shape))).all(), name
    assert n_linear > 20


def test_fp8_logits_within_compounded_e4m3_bound_of_float64(make_cfg):
    """Whole model. One linear with weights rounded to E4M3: each product x_k w_k carries an independent
    relative error of at most 2^-4 (3 mantissa bits), so the output's relative RMS error is at most 2^-4 for
    weights of random sign. With small weights (std 0.02) the network is near-linear and the errors of its
    FP8 layers add in quadrature: relative logits error <= sqrt(n) 2^-4 for n FP8 matrices on the path (each
    MoE layer's experts counted as their 3 matrices). The float64 FP8 model isolates the weight rounding."""
    cfg = make_cfg(**MIXED)
    ref = random_model(cfg, torch.float64, std=0.02, bias_std=0.0)
    fp8 = to_fp8_(random_model(cfg, torch.float64, std=0.02, bias_std=0.0), fp8_module_names(ref))
    with torch.no_grad():
        want, got = ref(tokens()).logits, fp8(tokens()).logits
    rel = ((got - want).norm() / want.norm()).item()
    n = n_fp8_matrices(fp8)  # 19 here: the bound is 0.27
    assert 2**-10 < rel < math.sqrt(n) * 2**-4  # FP8 did round, and within the bound


def test_quantising_in_memory_equals_saving_fp8_and_keeping(fp8_ckpt):
    """to_fp8_ on a loaded model quantises with the same block scales save_model(fp8=True) writes."""
    path, ref = fp8_ckpt
    kept = load_model(path, dtype=torch.float32, fp8="keep")
    mine = to_fp8_(ref.float(), fp8_module_names(ref))
    a, b = kept.state_dict(), mine.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        x, y = (t.view(torch.uint8) if t.dtype == FP8 else t for t in (a[k], b[k]))
        assert a[k].dtype == b[k].dtype and torch.equal(x, y), k
    with torch.no_grad():
        assert torch.equal(kept(tokens()).logits, mine(tokens()).logits)


# ---- dtype moves, saving, errors ---------------------------------------------------------------------------

def test_model_to_dtype_keeps_e4m3_and_scales(fp8_ckpt):
    path, _ = fp8_ckpt
    model = load_model(path, dtype=torch.bfloat16, fp8="keep").to(torch.float64)
    kv_b = model.layers[1].self_attn.kv_b_proj
    assert kv_b.weight.dtype == FP8 and kv_b.weight_scale_inv.dtype == torch.float32
    assert model.layers[1].mlp.experts.down_proj.dtype == FP8
    # the dense copy is re-derived from E4M3 in the new dtype, not cast from its bfloat16 rounding
    assert torch.equal(kv_b.dense, dequantize_blockwise(kv_b.weight, kv_b.weight_scale_inv, torch.float64))
    with torch.no_grad():
        assert model(tokens()).logits.dtype == torch.float64


def test_saving_a_kept_model_writes_the_same_bytes(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt
    model = load_model(path, dtype=torch.float64, fp8="keep")
    with pytest.raises(ValueError, match="fp8=True"):
        save_model(model, tmp_path / "plain")
    save_model(model, tmp_path / "again", fp8=True, max_shard_bytes=20_000)  # many shards: scale beside weight
    a, b = read_checkpoint(path), read_checkpoint(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        x, y = (t.view(torch.uint8) if t.dtype == FP8 else t for t in (a[k], b[k]))
        assert torch.equal(x, y), k
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]


def test_keep_quantises_a_weight_stored_in_higher_precision(fp8_ckpt):
    path, _ = fp8_ckpt
    disk = read_checkpoint(path)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    w = dequantize_blockwise(disk[name], disk.pop(name + "_scale_inv"), torch.float32) * 1.5
    disk[name] = w
    write_checkpoint(path, disk, shards=2)
    model = load_model(path, dtype=torch.float32, fp8="keep")
    q, s = quantize_blockwise(w)
    ours, idx = hf_layout(model)[name]
    assert torch.equal(model.state_dict()[ours][idx].view(torch.uint8), q.view(torch.uint8))
    s_ours, s_idx = hf_layout(model)[name + "_scale_inv"]
    assert torch.equal(model.state_dict()[s_ours][s_idx], s)


def test_keep_errors(fp8_ckpt, make_model, make_cfg, tmp_path):
    path, _ = fp8_ckpt
    with pytest.raises(ValueError, match="'dequantize' or 'keep'"):
        load_model(path, fp8="yes")
    save_model(make_model(make_cfg()), tmp_path / "bf16")
    with pytest.raises(ValueError, match="needs an FP8 checkpoint"):
        load_model(tmp_path / "bf16", fp8="keep")
    disk = read_checkpoint(path)
    bad = "model.layers.0.mlp.gate_proj.weight_scale_inv"
    disk[bad] = torch.ones(1, 1)
    write_checkpoint(path, disk)
    with pytest.raises(CheckpointError, match=r"wrong shape[\s\S]*model\.layers\.0\.mlp\.gate_proj\.weight") as e:
        load_model(path, fp8="keep")
    assert "missing" not in str(e.value)  # a bad scale is reported once, not also as a missing tensor


# ---- the command line --------------------------------------------------------------------------------------

def test_generate_serves_an_fp8_checkpoint(tmp_path, capsys):
    from dsv3.data.tokenizer import train_bpe
    from dsv3.infer.cli import add_generate_commands

    path = tmp_path / "fp8"
    save_model(random_model(tiny_config(**RAGGED)), path, fp8=True)
    # the 256 bytes and the special tokens: a corpus this small has no merges to spare
    train_bpe(["def add(a, b):\n    return a + b\n", "The quick brown fox."] * 20, vocab_size=264, out_dir=path)
    outs = []
    for extra in ([], ["--fp8-weights", "keep"]):
        parser = argparse.ArgumentParser(prog="dsv3")
        add_generate_commands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["generate", "--model", str(path), "--prompt", "def add(", "--max-tokens", "10",
                                  "--temperature", "0", "--device", "cpu", *extra])
        args.func(args)
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 1


# ---- CUDA --------------------------------------------------------------------------------------------------

# Widths where cuBLAS's FP8 GEMM takes the layers (K a multiple of 512: q_a, kv_a, dense gate/up, shared gate/up,
# kv_b) beside ones that dequantise (q_b and o_proj with K 384 and 256, down projections with K 640 and 384).
CUDA_SHAPE = dict(hidden_size=512, q_lora_rank=384, kv_lora_rank=512, qk_rope_head_dim=32, qk_nope_head_dim=64,
                  v_head_dim=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=640,
                  moe_intermediate_size=384, num_hidden_layers=3, first_k_dense_replace=1)


def test_cuda_path_on_the_cpu_through_emulated_cublas(emulated_cuda, tmp_path):
    """The model with the GPU's GEMMs (activations quantised per 1x128 tile, the conftest's stand-in for
    torch._scaled_mm in float64) against the CPU path: the activations' E4M3 rounding adds, per FP8 matrix,
    the same at most 2^-4 relative as the weights' did; the two paths stay within sqrt(n) 2^-4."""
    cfg = tiny_config(**CUDA_SHAPE)
    save_model(random_model(cfg, std=0.02, bias_std=0.0), tmp_path / "ck", fp8=True)
    with torch.no_grad():
        # float32 activations take the CPU path: weights dequantised, activations not quantised
        ref = load_model(tmp_path / "ck", dtype=torch.float32, fp8="keep")(tokens()).logits.double()
        assert not emulated_cuda
        model = load_model(tmp_path / "ck", dtype=torch.bfloat16, fp8="keep")
        got = model(tokens()).logits.double()
    assert {k for _, _, k in emulated_cuda} == {512}  # the layers with K a multiple of 512 took cuBLAS
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 2**-10 < rel < math.sqrt(n_fp8_matrices(model)) * 2**-4


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_cuda_fp8_model_against_dequantised_and_float64(tmp_path, monkeypatch):
    cfg = tiny_config(**CUDA_SHAPE)
    ref = random_model(cfg, torch.float64, std=0.02, bias_std=0.0)
    save_model(ref, tmp_path / "ck", fp8=True)
    kept = load_model(tmp_path / "ck", device="cuda", dtype=torch.bfloat16, fp8="keep")
    dense = load_model(tmp_path / "ck", device="cuda", dtype=torch.bfloat16)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = tokens(64, batch=4)
    with torch.no_grad():
        got = kept(x.cuda()).logits.double().cpu()
        deq = dense(x.cuda()).logits.double().cpu()
        want = ref(x).logits
    assert calls  # cuBLAS's blockwise FP8 GEMM ran
    n = n_fp8_matrices(kept)
    # against the same weights dequantised: the activations' E4M3 rounding (plus bf16 noise on both)
    assert ((got - deq).norm() / deq.norm()).item() < math.sqrt(n) * 2**-4
    # against float64: weights and activations rounded to E4M3, errors in quadrature
    assert ((got - want).norm() / want.norm()).item() < math.sqrt(2 * n) * 2**-4
    # and the engine serves it (absorbed decode on the cached dense kv_b_proj): its first token is the forward's
    # argmax, and CUDA-graph decode (the E4M3 weights and scales read by the replay) gives the eager tokens
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = x[0, :9].tolist()
    graphs = Engine(kept, max_model_len=128, cuda_graphs=True)
    out = graphs.generate([prompt], params)[0].token_ids
    assert graphs.runner._graphs and all(g.graph is not None for g in graphs.runner._graphs.values())
    assert out == Engine(kept, max_model_len=128, cuda_graphs=False).generate([prompt], params)[0].token_ids
    with torch.no_grad():
        assert out[0] == kept(x[:1, :9].cuda()).logits[0, -1].argmax().item() and len(out) == 8


@pytest.mark.gpu
@cuda
def test_cuda_few_tokens_stream_the_fp8_experts(tmp_path, monkeypatch):
    # E = 8 experts, K = 3: 1 token (3 < 5E/8 pairs) streams its experts' E4M3 bytes (`few_pairs`, scales
    # applied in the kernel), 2, 3 and 11 tokens (6, 9, 33 pairs) read each chosen expert's E4M3 bytes once
    # (`expert_gemm`), 65 tokens run the grouped GEMMs over dequantised experts; all against float64
    cfg = tiny_config(**CUDA_SHAPE)
    save_model(random_model(cfg, std=0.02, bias_std=0.0), tmp_path / "ck", fp8=True)
    kept = load_model(tmp_path / "ck", device="cuda", dtype=torch.bfloat16, fp8="keep")
    experts = next(m for m in kept.modules() if isinstance(m, FP8Experts))
    gate_up, down = experts.weights(torch.float64)
    calls = record_few_pairs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 3, 11, 65):
        x = (torch.randn(T, cfg.hidden_size, generator=g) * 0.5).to("cuda", torch.bfloat16)
        idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(T)]).cuda()
        w = torch.rand(T, 3, generator=g).cuda()
        r = RouterOutput(idx, w, torch.zeros(T, 8, device="cuda"), torch.bincount(idx.flatten(), minlength=8))
        with torch.no_grad():
            got = experts(x, r).double().cpu()
        want = experts_reference(x.cpu(), gate_up.cpu(), down.cpu(), idx.cpu(), w.cpu())
        # bf16 output and (grouped path) bf16 intermediate activations: ~2^-8 relative
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert calls == [(1, True), (2, False), (3, False), (11, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_dense_copy_has_the_linears_dtype_and_is_served(dtype):
    # the absorbed decode path multiplies by kv_b_proj's matrix every step: the cached copy must be the one used
    lin = torch.nn.Linear(256, 130, bias=False).to(dtype)
    q8 = FP8Linear.from_linear(lin, keep_dense=True)
    assert q8.dense is not None and q8.dense.dtype == dtype
    assert q8.dense_weight(dtype) is q8.dense
    torch.testing.assert_close(q8.dense, dequantize_blockwise(q8.weight, q8.weight_scale_inv, dtype), rtol=0, atol=0)


def test_dense_weight_of_another_dtype_is_dequantised_not_the_cached_copy():
    # a bf16 copy is cached; asking for float32 (or float64) must dequantise the E4M3 values in that dtype
    lin = torch.nn.Linear(256, 130, bias=False).to(torch.bfloat16)
    q8 = FP8Linear.from_linear(lin, keep_dense=True)
    assert q8.dense is not None and q8.dense.dtype == torch.bfloat16
    for dtype in (torch.float32, torch.float64):
        w = q8.dense_weight(dtype)
        assert w.dtype == dtype
        # each E4M3 value times its block's scale, exact in float64, rounded once to float32 (the product's dtype)
        ref = q8.weight.double() * q8.weight_scale_inv.double().repeat_interleave(128, 0)[:130].repeat_interleave(
            128, 1)[:, :256]
        torch.testing.assert_close(w.double(), ref.float().double(), rtol=0, atol=0)
