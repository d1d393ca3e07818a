"""Checkpoint I/O in the released Hugging Face layout (SPEC 6): exact round trips (MTP depth 2, several
shards), the released FP8 block format written here by hand and dequantised in float64, FP8 saving with its
error bound, errors that list every bad tensor, and atomic saving."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

import dsv3.checkpoint
from dsv3.checkpoint import CheckpointError, hf_layout, load_model, save_model
from tests.conftest import SHAPES

FP8_QUANT_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
# Sizes that leave every 128x128 block grid ragged: hidden 200 = 128 + 72; kv_a_proj_with_mqa has
# kv_lora_rank + rope = 64 + 16 = 80 rows (one partial block row, as V3's 576 = 4*128 + 64); dense FFN
# 300 rows = 2*128 + 44; q_a_proj 136 rows.
UNALIGNED = dict(
    hidden_size=200, kv_lora_rank=64, qk_rope_head_dim=16, q_lora_rank=136, intermediate_size=300,
    moe_intermediate_size=40, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_group=2,
    topk_group=1, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=24,
    v_head_dim=20, num_nextn_predict_layers=1,
)


def is_fp8_in_release(name: str) -> bool:
    """SPEC 6: the blocks' linear weights (MTP block too) are FP8; embedding, head and their MTP copies,
    norms, router weight and eh_proj stay BF16, the correction bias F32."""
    linear = name.endswith(("_proj.weight", "_proj_with_mqa.weight"))
    return name.startswith("model.layers.") and linear and ".eh_proj." not in name


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Rewrite the tensors of checkpoint `path` as `shards` files with a fresh index (config.json kept)."""
    for f in path.glob("*.safetensors"):
        f.unlink()
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for n in names[i * per:(i + 1) * per]:
            if n.endswith("_scale_inv") and n.removesuffix("_scale_inv") in tensors:
                continue  # written next to its weight
            part[n] = tensors[n].contiguous()
            if n + "_scale_inv" in tensors:  # a weight's scale lives in its shard
                part[n + "_scale_inv"] = tensors[n + "_scale_inv"]
        st_save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


MTP_COPIES = ("model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight")  # UNALIGNED


def model_tensor(model, hf_name: str) -> torch.Tensor:
    ours, idx = hf_layout(model)[hf_name]
    return model.state_dict()[ours][idx]


def blocks(shape: tuple[int, int], b: int = 128):
    """(row slice, col slice, block row, block col) of every b x b block, ragged at the edges."""
    for i in range(math.ceil(shape[0] / b)):
        for j in range(math.ceil(shape[1] / b)):
            yield slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b), i, j


def dequant_reference(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Real weight = fp8 value * scale_inv of its 128x128 block, block by block in float64."""
    assert scale_inv.shape == (math.ceil(q.shape[0] / 128), math.ceil(q.shape[1] / 128))
    w = torch.empty(q.shape, dtype=torch.float64)
    for r, c, i, j in blocks(tuple(q.shape)):
        w[r, c] = q[r, c].double() * scale_inv[i, j].double()
    return w


# ---- exact round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiny_cfg", list(SHAPES), indirect=True)
def test_save_load_round_trip_is_exact(tiny_cfg, make_model, tokens, tmp_path):
    model = make_model(tiny_cfg)
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck", dtype=torch.float32)
    assert loaded.cfg == tiny_cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        oa, ob = model(tokens), loaded(tokens)
    assert torch.equal(oa.logits, ob.logits)
    assert len(ob.mtp_logits) == tiny_cfg.num_nextn_predict_layers
    for x, y in zip(oa.mtp_logits, ob.mtp_logits, strict=True):
        assert torch.equal(x, y)


def test_mtp_depth2_layout_on_disk(make_cfg, make_model, tmp_path):
    cfg = make_cfg(**SHAPES["no_qlora-1group-rope-mtp2-dense0"])
    model = make_model(cfg)
    save_model(model, tmp_path / "ck")
    disk = read_checkpoint(tmp_path / "ck")
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    for k in range(2):
        p = f"model.layers.{L + k}."
        assert torch.equal(disk[p + "eh_proj.weight"], model.mtp[k].eh_proj.weight)
        assert disk[p + "eh_proj.weight"].shape == (d, 2 * d)
        for n in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight", "self_attn.kv_b_proj.weight",
                  "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight"):
            assert p + n in disk, p + n
        # the released layout repeats the shared embedding and head inside each MTP layer
        assert torch.equal(disk[p + "embed_tokens.weight"], model.embed_tokens.weight)
        assert torch.equal(disk[p + "shared_head.head.weight"], model.lm_head.weight)
    assert not any(n.startswith(f"model.layers.{L + 2}.") for n in disk)


def test_bf16_load_keeps_router_bias_float32_exact(make_cfg, make_model, tmp_path):
    model = make_model(make_cfg(), bias_std=1e-3)
    save_model(model, tmp_path / "ck")
    save_model(load_model(tmp_path / "ck", dtype=torch.bfloat16), tmp_path / "ck16")  # a bf16 model saves it
    for ck in ("ck", "ck16"):
        assert read_checkpoint(tmp_path / ck)["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    loaded = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    # RoPE's frequencies stay float32 too (a bf16 table is ~1 radian off at position 4K); not in the state dict
    assert loaded.rotary.inv_freq.dtype == torch.float32 and torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    a, b = model.state_dict(), loaded.state_dict()
    for k in a:
        if k.endswith("e_score_correction_bias"):
            assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
        else:
            assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].bfloat16(), b[k]), k


def test_multi_shard_index_covers_every_tensor_and_loads_exactly(make_cfg, make_model, tokens, tmp_path):
    cfg = make_cfg(**SHAPES["no_qlora-1group-rope-mtp2-dense0"])
    model = make_model(cfg)
    max_bytes = 40_000
    save_model(model, tmp_path / "ck", max_shard_bytes=max_bytes)
    ck = tmp_path / "ck"
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    files = sorted(f.name for f in ck.glob("*.safetensors"))
    assert len(files) > 5
    assert set(index["weight_map"].values()) == set(files)
    on_disk: dict[str, str] = {}
    total = 0
    for fname in files:
        with safe_open(str(ck / fname), framework="pt") as f:
            shard_bytes = 0
            for k in f.keys():
                assert k not in on_disk, f"{k} in two shards"
                on_disk[k] = fname
                t = f.get_tensor(k)
                shard_bytes += t.numel() * t.element_size()
            # a shard only exceeds the limit when it holds a single tensor larger than the limit
            assert shard_bytes <= max_bytes or len(f.keys()) == 1
            total += shard_bytes
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == total
    # every model tensor is in the map (experts split per expert, MTP copies of embedding and head added)
    assert set(hf_layout(model)) <= set(on_disk)

    loaded = load_model(ck, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


# ---- FP8 ---------------------------------------------------------------------------------------------------

def test_released_fp8_format_is_dequantised_blockwise(make_cfg, make_model, tmp_path):
    """Write a checkpoint the way the release stores it: E4M3 weights with float32 `<name>_scale_inv`
    [ceil(out/128), ceil(in/128)], BF16 embedding/head/norms/router/eh_proj, F32 bias; two shards."""
    cfg = make_cfg(**UNALIGNED)
    ck = tmp_path / "fp8"
    save_model(make_model(cfg), ck)  # a float32 checkpoint with the right names, converted below
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, t in read_checkpoint(ck).items():
        if is_fp8_in_release(name):
            # arbitrary E4M3 values and positive block scales: any mis-indexed block shows
            q = (torch.randn(t.shape, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            s = torch.exp(torch.randn(math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128), generator=g))
            tensors[name], tensors[name + "_scale_inv"] = q, s
            expected[name] = dequant_reference(q, s)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = expected[name] = t
        else:
            tensors[name] = t.bfloat16()
            expected[name] = tensors[name].double()
    cfg_json = json.loads((ck / "config.json").read_text())
    cfg_json.update(quantization_config=FP8_QUANT_CONFIG, torch_dtype="bfloat16")
    (ck / "config.json").write_text(json.dumps(cfg_json))
    write_checkpoint(ck, tensors, shards=2)
    # the ragged grids really are ragged
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)
    assert tensors["model.layers.2.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)  # MTP block is FP8

    model = load_model(ck, dtype=torch.float64)
    n_fp8 = 0
    for name, ref in expected.items():
        if name in MTP_COPIES:
            continue  # the MTP layer's copies of the shared embedding and head
        got = model_tensor(model, name)
        assert got.dtype == (torch.float32 if name.endswith("bias") else torch.float64), name
        if is_fp8_in_release(name):
            n_fp8 += 1
            # the product of a 4-bit-significand E4M3 value and a float32 scale needs 28 bits; computing it
            # in float32 rounds once: relative error <= 2^-24 per element
            assert ((got - ref).abs() <= 2**-24 * ref.abs()).all(), name
        else:
            assert torch.equal(got.double(), ref.double()), name
    assert n_fp8 > 20


def write_shards(path: Path, shards: dict[str, dict[str, torch.Tensor]], index_extra: dict | None = None) -> None:
    """Rewrite checkpoint `path` as exactly these shard files, with an index that lists what each holds."""
    for f in path.glob("*.safetensors"):
        f.unlink()
    weight_map = {}
    for fname, part in shards.items():
        st_save_file({k: v.contiguous() for k, v in part.items()}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    weight_map.update(index_extra or {})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_the_index_decides_which_shard_holds_a_tensor(make_cfg, make_model, tmp_path):
    cfg = make_cfg(**UNALIGNED)
    ck = tmp_path / "ck"
    save_model(make_model(cfg), ck, fp8=True)
    tensors = read_checkpoint(ck)
    want = {m: load_model(ck, dtype=torch.float32, fp8=m).state_dict() for m in ("dequantize", "keep")}
    scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
    weights = {k: v for k, v in tensors.items() if k not in scales}
    # every scale in a shard of its own, away from its weight (valid: the index says where each one is)
    write_shards(ck, {"a.safetensors": weights, "b.safetensors": scales})
    for mode, ref in want.items():
        got = load_model(ck, dtype=torch.float32, fp8=mode).state_dict()
        assert all(torch.equal(got[k].float(), v.float()) for k, v in ref.items()), mode
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    # a second, different copy of a tensor in another indexed shard: refused, not whichever shard sorts last
    rest = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    z = {"model.norm.weight": tensors["model.norm.weight"], o_proj: torch.zeros_like(tensors[o_proj])}
    write_shards(ck, {"a.safetensors": rest, "z.safetensors": z}, index_extra={o_proj: "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"o_proj.weight \(in z.safetensors; the index says a.safetensors"):
        load_model(ck)
    # the index names a tensor its shard does not hold
    write_shards(ck, {"a.safetensors": tensors}, index_extra={"model.layers.0.extra.weight": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"1 indexed-but-absent tensor\(s\):\n  model.layers.0.extra.weight \(a"):
        load_model(ck)
    # a scale without its weight
    orphan = "model.layers.0.self_attn.gone.weight_scale_inv"
    write_shards(ck, {"a.safetensors": {**tensors, orphan: torch.ones(1, 1)}})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\):\n  model.layers.0.self_attn.gone"):
        load_model(ck)
    # a block scale beside a weight that is not E4M3 (E5M2 codes read as E4M3 would be garbage)
    e5 = dict(tensors)
    e5[o_proj] = tensors[o_proj].float().to(torch.float8_e5m2)
    write_shards(ck, {"a.safetensors": e5})
    for mode in ("dequantize", "keep"):
        with pytest.raises(CheckpointError, match=r"o_proj.weight: torch.float8_e5m2 with a .*E4M3"):
            load_model(ck, fp8=mode)


def test_fp8_scales_are_stored_in_their_weights_shard(make_cfg, make_model, tmp_path):
    """With a shard limit of one byte every tensor starts a shard of its own, except a `weight_scale_inv`, which
    stays with its weight (readers that open one shard per weight, as DeepSeek's conversion tools, need it)."""
    save_model(make_model(make_cfg()), tmp_path / "ck", fp8=True, max_shard_bytes=1)
    weight_map = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())["weight_map"]
    scales = [k for k in weight_map if k.endswith("_scale_inv")]
    assert len(scales) > 20
    for s in scales:
        assert weight_map[s] == weight_map[s.removesuffix("_scale_inv")], s
    assert len(set(weight_map.values())) == len(weight_map) - len(scales)  # one shard per weight
    for shard in (tmp_path / "ck").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            [weight] = [k for k in f.keys() if not k.endswith("_scale_inv")]
            assert set(f.keys()) <= {weight, weight + "_scale_inv"}, shard.name


def test_fp8_save_writes_release_format_within_e4m3_error(make_cfg, make_model, tmp_path):
    cfg = make_cfg(**UNALIGNED)
    model = make_model(cfg)
    save_model(model, tmp_path / "ck", fp8=True)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANT_CONFIG
    disk = read_checkpoint(tmp_path / "ck")
    n_fp8 = 0
    for name, t in disk.items():
        if name.endswith("_scale_inv"):
            assert name.removesuffix("_scale_inv") in disk
            continue
        if not is_fp8_in_release(name):
            expect = torch.float32 if name.endswith("bias") else model.embed_tokens.weight.dtype
            assert t.dtype == expect, name
            assert name + "_scale_inv" not in disk
            continue
        w = model_tensor(model, name).double()
        n_fp8 += 1
        s = disk[name + "_scale_inv"]
        assert t.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, name
        assert s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)), name
        bound = torch.empty_like(w)
        for r, c, i, j in blocks(tuple(w.shape)):
            amax = w[r, c].abs().max().item()
            # the block scale maps the block's amax to E4M3's largest value, 448
            assert s[i, j].item() == pytest.approx(amax / 448, rel=2**-23), (name, i, j)
            # E4M3 keeps 3 mantissa bits: rounding to nearest costs <= 2^-4 relative in the normal range, and
            # <= half the subnormal spacing 2^-9 (in units of the scale) below 2^-6; plus float32 rounding
            bound[r, c] = (2**-4 + 2**-22) * w[r, c].abs() + 2**-10 * s[i, j].item()
        err = (dequant_reference(t, s) - w).abs()
        assert (err <= bound).all(), name
        assert (err > 2**-7 * w.abs()).any(), name  # values really went through 8 bits
    assert n_fp8 > 20
    # V3's ragged case ([576, 7168] -> scales [5, 56]) in small: [80, 200] -> [1, 2]
    assert disk["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert disk["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    for kept in ("model.layers.2.eh_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"):
        assert disk[kept].dtype == torch.float32, kept
    # and it loads back to the same dequantised values, up to the one float32 rounding of the product
    loaded = load_model(tmp_path / "ck", dtype=torch.float64)
    for name in ("model.layers.1.mlp.experts.3.down_proj.weight",
                 "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"):
        ref = dequant_reference(disk[name], disk[name + "_scale_inv"])
        assert ((model_tensor(loaded, name) - ref).abs() <= 2**-24 * ref.abs()).all(), name


# ---- errors ------------------------------------------------------------------------------------------------

BROKEN = "model.layers.1.self_attn.o_proj.weight"


def _corrupt_missing(t):
    del t[BROKEN]
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    return ["missing", BROKEN, "model.layers.1.mlp.experts.3.up_proj.weight"]


def _corrupt_unexpected(t):
    t["model.layers.0.mlp.bogus.weight"] = torch.zeros(3, 3)
    return ["unexpected", "model.layers.0.mlp.bogus.weight"]


def _corrupt_shape(t):
    t[BROKEN] = t[BROKEN].T.contiguous()
    return ["wrong shape", BROKEN]


def _corrupt_scale_shape(t):
    name = "model.layers.0.mlp.gate_proj.weight"
    q = t[name].to(torch.float8_e4m3fn)
    t[name], t[name + "_scale_inv"] = q, torch.ones(7, 7)
    return [name]


def _corrupt_scale_missing(t):
    name = "model.layers.0.mlp.gate_proj.weight"
    t[name] = t[name].to(torch.float8_e4m3fn)
    return [name, "scale_inv"]


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_missing, _corrupt_unexpected, _corrupt_shape, _corrupt_scale_shape, _corrupt_scale_missing],
    ids=["missing", "unexpected", "wrong-shape", "wrong-scale-shape", "fp8-without-scale"],
)
def test_bad_checkpoint_raises_listing_every_problem(make_cfg, make_model, tmp_path, corrupt):
    save_model(make_model(make_cfg()), tmp_path / "ck")
    tensors = read_checkpoint(tmp_path / "ck")
    needles = corrupt(tensors)
    write_checkpoint(tmp_path / "ck", tensors)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ck", dtype=torch.float32)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "index-not-json", "index-without-map", "map-not-names",
                                    "map-outside", "map-absolute"])
def test_damaged_files_raise_naming_the_file(make_cfg, make_model, tmp_path, damage):
    # a half-copied download or a hand-edited index: a CheckpointError naming the file, not a library traceback
    save_model(make_model(make_cfg()), tmp_path / "ck")
    index = tmp_path / "ck" / "model.safetensors.index.json"
    shard = tmp_path / "ck" / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\0" * 100)
    elif damage == "index-not-json":
        index.write_text("{not json")
    elif damage == "index-without-map":
        index.write_text("{}")
    elif damage == "map-not-names":
        index.write_text(json.dumps({"weight_map": {"model.norm.weight": 3}}))
    else:  # a shard moved out of the directory, where the index points (so only the path is wrong)
        moved = tmp_path / shard.name
        shard.rename(moved)
        name = f"../{shard.name}" if damage == "map-outside" else str(moved)
        m = json.loads(index.read_text())
        m["weight_map"] = {k: name if f == shard.name else f for k, f in m["weight_map"].items()}
        index.write_text(json.dumps(m))
    bad = shard if damage in ("truncated", "garbage") else index
    with pytest.raises(CheckpointError, match=f"{bad.name}: (not a|`weight_map` (must map|names shards outside))"):
        load_model(tmp_path / "ck", dtype=torch.float32)


def test_a_missing_shard_is_named(make_cfg, make_model, tmp_path):
    # a download that stopped before its last shards: the error names the files to fetch again
    save_model(make_model(make_cfg()), tmp_path / "ck", max_shard_bytes=50_000)
    shards = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(shards) >= 3
    for gone in shards[1:3]:
        (tmp_path / "ck" / gone).unlink()
    with pytest.raises(CheckpointError, match=f"shard files listed in the index are missing: {shards[1]}, {shards[2]}"):
        load_model(tmp_path / "ck", dtype=torch.float32)


def test_all_problems_reported_together(make_cfg, make_model, tmp_path):
    save_model(make_model(make_cfg()), tmp_path / "ck")
    t = read_checkpoint(tmp_path / "ck")
    del t["model.layers.0.self_attn.o_proj.weight"]
    t["lm_head.bias"] = torch.zeros(300)
    t["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(5, 5)
    write_checkpoint(tmp_path / "ck", t)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ck", dtype=torch.float32)
    msg = str(e.value)
    assert "1 missing" in msg and "model.layers.0.self_attn.o_proj.weight" in msg
    assert "1 unexpected" in msg and "lm_head.bias" in msg
    assert "1 wrong shape" in msg and "model.layers.2.self_attn.kv_b_proj.weight" in msg


# ---- atomic save -------------------------------------------------------------------------------------------

def _crash_after_first_shard(monkeypatch):
    calls = []

    def crashing_save_file(tensors, filename, metadata=None):
        if calls:
            raise OSError("simulated crash while writing a shard")
        calls.append(filename)
        st_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(dsv3.checkpoint, "save_file", crashing_save_file)
    return calls


def test_crash_during_save_keeps_previous_checkpoint(make_cfg, make_model, tmp_path, monkeypatch):
    cfg = make_cfg()
    old, new = make_model(cfg, seed=1), make_model(cfg, seed=2)
    ck = tmp_path / "ck"
    save_model(old, ck, max_shard_bytes=50_000)
    calls = _crash_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_model(new, ck, max_shard_bytes=50_000)
    assert len(calls) == 1  # the crash came after one shard of the new checkpoint was written
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or swapped-out directories left
    loaded = load_model(ck, dtype=torch.float32)
    for k, v in old.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_crash_during_first_save_leaves_nothing(make_cfg, make_model, tmp_path, monkeypatch):
    _crash_after_first_shard(monkeypatch)
    with pytest.raises(OSError):
        save_model(make_model(make_cfg()), tmp_path / "ck", max_shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_between_the_renames_puts_the_old_checkpoint_back(make_cfg, make_model, tmp_path, monkeypatch):
    cfg = make_cfg()
    old = make_model(cfg, seed=1)
    ck = tmp_path / "ck"
    save_model(old, ck)
    real, calls = dsv3.checkpoint.os.replace, []

    def replace(src, dst):  # noqa: ANN001, ANN202 - the second rename (new directory into place) is interrupted
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(dsv3.checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(make_model(cfg, seed=2), ck)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    loaded = load_model(ck, dtype=torch.float32)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in old.state_dict().items())


def test_config_json_records_the_dtype_of_the_saved_weights(make_cfg, make_model, tmp_path):
    # torch_dtype says what the shards hold, whatever the model's config said before (TINY says float32)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        cfg = make_cfg(torch_dtype="float32" if name == "bfloat16" else "bfloat16")
        save_model(make_model(cfg, dtype=dtype), tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == name
        assert read_checkpoint(tmp_path / name)["model.norm.weight"].dtype == dtype


def test_a_plain_save_of_an_fp8_loaded_model_is_not_marked_fp8(make_cfg, make_model, tmp_path):
    save_model(make_model(make_cfg()), tmp_path / "fp8", fp8=True)
    assert "quantization_config" in json.loads((tmp_path / "fp8" / "config.json").read_text())
    save_model(load_model(tmp_path / "fp8", dtype=torch.float32), tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_save_over_existing_checkpoint_replaces_it(make_cfg, make_model, tmp_path):
    cfg = make_cfg()
    new = make_model(cfg, seed=2)
    save_model(make_model(cfg, seed=1), tmp_path / "ck", max_shard_bytes=50_000)
    save_model(new, tmp_path / "ck")  # one shard now: stale shards of the old one must not survive
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
    ]
    loaded = load_model(tmp_path / "ck", dtype=torch.float32)
    for k, v in new.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_a_save_cut_short_earlier_does_not_block_the_next(make_cfg, make_model, tmp_path):
    # an earlier process's swapped-out copy: half deleted beside a complete `ck` (an rmtree cut short), or alone
    # where it was killed between the two renames (then loading names it, and the next save puts it back first)
    cfg = make_cfg()
    old, new = make_model(cfg, seed=1), make_model(cfg, seed=2)
    ck = tmp_path / "ck"
    save_model(old, ck)
    stale = tmp_path / f".ck.old-{os.getpid()}"  # the name every swap of this process took before
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half deleted")
    save_model(new, ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert all(torch.equal(v, load_model(ck, dtype=torch.float32).state_dict()[k]) for k, v in new.state_dict().items())

    os.replace(ck, tmp_path / ".ck.old-4242")  # killed between the renames
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint at .*\.ck\.old-4242"):
        load_model(ck)
    save_model(old, ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert all(torch.equal(v, load_model(ck, dtype=torch.float32).state_dict()[k]) for k, v in old.state_dict().items())


def test_extra_files_may_write_folders(make_cfg, make_model, tmp_path):
    def extra(d):  # noqa: ANN001, ANN202
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "tokenizer.json").write_text("{}")

    save_model(make_model(make_cfg()), tmp_path / "ck", extra_files=extra)
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").read_text() == "{}"


def test_an_unreadable_shard_is_a_permission_error(make_cfg, make_model, tmp_path, monkeypatch):
    # (safetensors reports a shard it may not open as missing); as root, which reads any file, the check is
    # told the shard is unreadable
    save_model(make_model(make_cfg()), tmp_path / "ck")
    shard = tmp_path / "ck" / "model-00001-of-00001.safetensors"
    real = os.access
    monkeypatch.setattr(dsv3.checkpoint.os, "access", lambda p, mode: Path(p) != shard and real(p, mode))
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors: permission denied"):
        load_model(tmp_path / "ck")
