"""Decode throughput of the dsv3 engine vs transformers' `generate`, and the fraction of the HBM roofline.

GPU (the `bench` preset, random weights, bf16; one run of about 6 minutes, everything by default):

    python benchmarks/decode.py --profile --time-limit 360 --out decode.json
    python benchmarks/decode.py --batch 1 8 --context 1024 --steps 32 --impl dsv3 hf --time-limit 120

For every batch B and context C: B random prompts of C tokens are prefilled, then decode steps are timed
(only decode). Rows:
  dsv3         the engine, decode steps replayed from CUDA graphs (static buffers, bucketed shapes), greedy;
               tokens/s over whole engine steps (scheduling, staging, replay, sampling, the one host read),
               each step's host work overlapping the device's next step (--no-overlap: one after the other);
               `model ms` is the replayed forward alone, back to back.
  dsv3-eager   the same engine and static buffers without graphs (what the graphs save).
  hf           transformers DeepseekV3ForCausalLM.generate with the same weights (saved in the HF layout,
               loaded with its defaults: dynamic cache, SDPA, grouped_mm experts), greedy, min_new_tokens so
               that no row stops early; per-step times from a stopping criterion that synchronises.
  hf-static    the same with cache_implementation="static" (transformers compiles it: ~40 s per shape);
               only for --hf-static points.
  dsv3+compile the dsv3 row with the decode forward torch.compiled inside the graphs (fused element-wise
               kernels); a compilation per shape, so only for --compile points.
Roofline: bytes that must move per decode step / measured device-to-device copy bandwidth (bytes read +
written, measured in this run). Bytes per step, bf16:
  weights: attention + dense FFN + norms + output head + B embedding rows, and per MoE layer the router, the
           shared experts and the distinct routed experts the batch touches, expected E * (1 - (1 - K/E)^B)
           under uniform routing (K at B=1: 8 of 64 for `bench`; 42 at B=8; 64 at B=64);
  KV cache: B * context * (kv_lora_rank + qk_rope_head_dim) * layers * 2 bytes (read; the step's own writes
           and the logits are < 0.1% and left out).
fraction = (bytes / bandwidth) / measured step time.
`--fp8-weights keep` serves dsv3 with the blocks' linear weights and experts in FP8 E4M3 (quantised in memory,
128x128 block scales, as `load_model(..., fp8="keep")` serves an FP8 checkpoint); those weights then count 1
byte each plus their scales, the peer keeps bf16. `--preset 671b --config num_hidden_layers=4
first_k_dense_replace=1 num_nextn_predict_layers=0` measures V3's own layer shapes (four of its layers fit one
H200 in bf16; leave the peer out, --impl dsv3+compile: it would need a second copy).

Every measurement runs in its own try/except (a failure prints its error and the rest go on), units of work
are skipped once --time-limit would be exceeded, and rows are printed (and written to --out) as they finish.
The table comes last, then one JSON line.

MTP speculative decoding on a trained model (CPU): acceptance rate, tokens per step and end-to-end speedup of
--mtp K over plain greedy decoding (outputs must be identical), one prompt at a time and batched:

    python benchmarks/decode.py --model runs/demo/checkpoints/latest --mtp 1 2 --repeats 3
    python benchmarks/decode.py --model random:tiny --mtp 1 2      # pipeline check on an untrained model
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

if not __package__:  # run as a script (python benchmarks/decode.py): the repository root and its src/
    _root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_root), str(_root / "src")]

from benchmarks.common import (  # noqa: E402
    copy_bandwidth,
    device_name,
    emit_json,
    kernel_timeline,
    print_table,
    profile_kernels,
    sync,
    time_fn,
)
from dsv3.checkpoint import build_empty  # noqa: E402
from dsv3.config import ModelConfig, preset  # noqa: E402
from dsv3.infer import Engine, SamplingParams  # noqa: E402
from dsv3.info import count_params  # noqa: E402
from dsv3.model import DeepSeekV3, pdl  # noqa: E402

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# -- roofline ---------------------------------------------------------------------------------------------
def experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Expected distinct routed experts a batch of `batch` tokens reaches in one MoE layer (uniform routing)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - K / E) ** batch) if E else 0.0


def step_bytes(cfg: ModelConfig, batch: int, context: float, bytes_per_value: int = 2,
               fp8: bool = False) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences at `context` cached positions must move (module docstring).
    fp8: the blocks' linear weights and experts count 1 byte plus their float32 128x128 block scale."""
    c = count_params(cfg)
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    expert = 3 * d * inter
    touched = experts_touched(cfg, batch)
    matrices = c.attention + c.dense_ffn + cfg.n_moe_layers * (cfg.n_shared_experts + touched) * expert
    rest = c.norms + c.head + cfg.n_moe_layers * cfg.n_routed_experts * d + min(batch, cfg.vocab_size) * d
    weights = matrices * (1 + 4 / 128**2 if fp8 else bytes_per_value) + rest * bytes_per_value
    kv = batch * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_value
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_touched": touched}


# -- dsv3 ------------------------------------------------------------------------------------------------
def run_dsv3(
    model: DeepSeekV3, args: argparse.Namespace, B: int, ctx: int, bw: float, profile: bool, compile: bool = False,
) -> list[dict]:
    """Prefill B prompts of ctx tokens, capture, time `steps` engine steps with graphs, the replayed forward
    alone, then `eager_steps` steps without graphs. Returns the dsv3 (or dsv3+compile) and dsv3-eager rows."""
    cfg, dev = model.cfg, model.embed_tokens.weight.device
    graphs = dev.type == "cuda" and not args.no_graphs
    eager_steps = args.eager_steps if "dsv3-eager" in args.impl and not compile else 0
    fp8 = "+fp8" if args.fp8_weights == "keep" else ""  # E4M3 weights against the bf16 peer: said in the row
    name = ("dsv3" if graphs else "dsv3 (no graphs)") + ("+compile" if compile else "") + fp8
    total = args.warmup + args.steps + eager_steps + 4
    bs = args.block_size
    engine = Engine(model, None, block_size=bs, cache_tokens=B * (ctx + total + bs) + bs, max_num_seqs=B,
                    max_model_len=ctx + total + bs, max_num_batched_tokens=max(16384, ctx), cuda_graphs=graphs,
                    compile=compile, overlap=not args.no_overlap)
    g = torch.Generator().manual_seed(B * 100003 + ctx)
    params = SamplingParams(max_tokens=total, temperature=0, ignore_eos=True)
    for _ in range(B):
        engine.add_request(torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist(), params)
    rows = []
    try:
        sync(dev)
        t0 = time.perf_counter()
        while engine.scheduler.waiting:
            engine.step()
        engine.sync()  # the runner is used directly next (capture): no step may be in flight
        sync(dev)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shapes = engine.runner.capture(B, ctx + 1, ctx + total + 1) if graphs or compile else 0
        sync(dev)
        capture_s = time.perf_counter() - t0
        capture_error = engine.runner.capture_error  # the runner fell back to eager decoding
        if capture_error:
            log(f"CUDA graph capture failed: {capture_error}")
            if compile:
                raise RuntimeError(f"capture (with torch.compile) failed: {capture_error}")
            graphs, shapes, name = False, 0, name + " (capture failed: eager)"
        for _ in range(args.warmup):
            engine.step()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync(dev)
        step_s = (time.perf_counter() - t0) / args.steps
        # the forward alone: replay the next step's shape back to back (it rewrites the same slots); the step
        # launched ahead (overlap) is completed first, so the sequences' state is the device's
        engine.sync()
        runner, seqs = engine.runner, list(engine.scheduler.running)
        mean_ctx = seqs[0].num_cached - (args.steps + 1) / 2  # the timed steps wrote positions num_cached - steps..
        for s in seqs:
            engine.blocks.reserve(s.seq_id, s.num_cached + 1)
        with torch.inference_mode():
            runner.prepare_decode(seqs)
            model_s = time_fn(runner.decode, dev, warmup=2, iters=max(args.steps // 4, 3))
            if profile:
                profile_step(runner, dev, args.timeline and f"{args.timeline}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}")
        nbytes = step_bytes(cfg, B, mean_ctx, bytes_per_value=engine.model.embed_tokens.weight.element_size(),
                            fp8=args.fp8_weights == "keep")
        roof = nbytes["total"] / bw
        pdl_on = pdl.mode(dev) != pdl.OFF
        rows.append({
            "impl": name, "batch": B, "context": ctx,
            "tokens_per_s": B / step_s, "ms_per_step": step_s * 1e3, "model_ms_per_step": model_s * 1e3,
            "roofline": roof / step_s, "roofline_model": roof / model_s, "bytes_per_step": nbytes["total"],
            "kv_bytes_per_step": nbytes["kv"], "experts_touched": nbytes["experts_touched"],
            "prefill_s": prefill_s, "capture_s": capture_s, "graph_shapes": shapes, "mean_context": mean_ctx,
            "pdl": pdl_on, **({"inductor_pdl": runner.inductor_pdl} if compile else {}),
            **({"capture_error": capture_error} if capture_error else {}),
        })
        log(f"{name} B={B} ctx={ctx}: {B / step_s:,.0f} tok/s, {step_s * 1e3:.2f} ms/step "
            f"(forward {model_s * 1e3:.2f} ms), roofline {roof / step_s:.1%}; prefill {prefill_s:.1f}s, "
            f"capture {capture_s:.1f}s ({shapes} shapes); PDL {'on' if pdl_on else 'off'}"
            + (f", inductor's {'on' if runner.inductor_pdl else 'off'}" if compile else ""))
        if eager_steps and graphs:
            engine.runner.set_cuda_graphs(False)
            engine.step()  # warm-up of the new shape
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(eager_steps):
                engine.step()
            sync(dev)
            e_s = (time.perf_counter() - t0) / eager_steps
            rows.append({"impl": "dsv3-eager" + fp8, "batch": B, "context": ctx, "tokens_per_s": B / e_s,
                         "ms_per_step": e_s * 1e3, "roofline": roof / e_s, "bytes_per_step": nbytes["total"]})
            log(f"dsv3-eager{fp8} B={B} ctx={ctx}: {B / e_s:,.0f} tok/s, {e_s * 1e3:.2f} ms/step")
    finally:
        del engine
        free_memory(dev)
    return rows


def profile_step(runner, dev: torch.device, timeline: str | None = None) -> None:
    """Kernels of the replayed decode forward (the captured function, run eagerly): count and top ones; with
    `timeline`, the replayed graph's kernels in order, written there."""
    profile_kernels(runner.graph(runner.step.Bp, runner.step.Wp).fn, dev, "the decode forward", n=5, rows=25)
    if timeline:
        kernel_timeline(runner.decode, dev, timeline)


# -- transformers ----------------------------------------------------------------------------------------
def run_hf(peer, cfg: ModelConfig, args: argparse.Namespace, B: int, ctx: int, bw: float, static: bool) -> dict:
    """generate() with greedy decoding; decode time between the first and the last new token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    dev = next(peer.parameters()).device
    steps = args.hf_steps
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            sync(dev)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    g = torch.Generator().manual_seed(B * 100003 + ctx)
    ids = torch.randint(0, cfg.vocab_size, (B, ctx), generator=g).to(dev)
    # the first new token is prefill's, the next 2 steps are untimed warm-up (below): steps + 3 tokens
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps + 3, min_new_tokens=steps + 3,
              do_sample=False, stopping_criteria=StoppingCriteriaList([Stamp()]), pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    compile_s = 0.0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if static:  # the first call compiles for these shapes
            t0 = time.perf_counter()
            peer.generate(ids, **kw)
            sync(dev)
            compile_s = time.perf_counter() - t0
        stamps.clear()
        peer.generate(ids, **kw)
        sync(dev)
    n = len(stamps) - 1
    if n < 1:
        raise RuntimeError(f"generate produced {len(stamps)} tokens, expected {steps + 3}")
    warm = min(2, n - 1)  # untimed steps at a new shape, as dsv3 gets (--warmup): allocator growth and the like
    step_s = (stamps[-1] - stamps[warm]) / (n - warm)
    nbytes = step_bytes(cfg, B, ctx + n / 2, bytes_per_value=next(peer.parameters()).element_size())
    roof = nbytes["total"] / bw
    name = "hf-static" if static else "hf"
    log(f"{name} B={B} ctx={ctx}: {B / step_s:,.1f} tok/s, {step_s * 1e3:.2f} ms/step, roofline {roof / step_s:.1%}"
        + (f", compile+first call {compile_s:.0f}s" if static else ""))
    return {"impl": name, "batch": B, "context": ctx, "tokens_per_s": B / step_s, "ms_per_step": step_s * 1e3,
            "roofline": roof / step_s, "bytes_per_step": nbytes["total"], "steps": n - warm, "compile_s": compile_s}


def rounded(x: object, digits: int = 4) -> object:
    """Floats to `digits` significant digits, through dicts and lists (a shorter JSON line)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        try:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a poisoned context shows in the next row's error anyway
            print(f"cleanup failed: {type(e).__name__}: {e}", flush=True)


# -- the GPU speed benchmark ----------------------------------------------------------------------------
def points(spec: str) -> tuple[int, int]:
    """'8x1024' -> (8, 1024)."""
    b, c = spec.lower().split("x")
    return int(b), int(c)


def speed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    cfg = preset(args.preset, **args.config)
    settings = "".join(f" {k}={v}" for k, v in args.config.items())
    torch.manual_seed(0)
    result: dict = {"bench": "decode", "preset": args.preset, "config": args.config, "device": device_name(device),
                    "dtype": str(dtype),
                    "torch": torch.__version__, "steps": args.steps, "block_size": args.block_size,
                    "overlap": not args.no_overlap, "inductor": args.inductor, "rows": [],
                    "errors": [], "skipped": []}
    rows: list[dict] = result["rows"]

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))

    model = build_empty(cfg, device, dtype)  # in its dtype: V3-sized layers (--config) would not fit in float32 first
    model.init_weights()
    model = model.to(dtype).eval()
    log(f"model: preset {args.preset}{settings}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}, {device_name(device)}")
    bw = copy_bandwidth(device)
    result["copy_bandwidth"] = bw
    log(f"device-to-device copy: {bw / 1e12:.2f} TB/s (bytes read + written)")

    peer = None
    if {"hf", "hf-static"} & set(args.impl):
        try:
            import transformers
            from transformers import DeepseekV3ForCausalLM

            from dsv3.checkpoint import save_model

            result["transformers"] = transformers.__version__
            transformers.logging.set_verbosity_error()  # the load report lists the MTP layer it does not use
            with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                save_model(model, d)
                peer = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
            with torch.inference_mode(), warnings.catch_warnings():  # lazy initialisation, outside any timing
                warnings.simplefilter("ignore")
                warm = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
                peer.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=3, min_new_tokens=3,
                              do_sample=False, pad_token_id=0)
            log(f"transformers {transformers.__version__} peer loaded")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["errors"].append({"impl": "hf (load)", "error": f"{type(e).__name__}: {e}"})
    if args.fp8_weights == "keep":  # after the peer took the bf16 weights: it has no blockwise FP8 path
        from dsv3.checkpoint import fp8_module_names
        from dsv3.fp8 import to_fp8_

        to_fp8_(model, fp8_module_names(model))
        result["fp8_weights"] = "keep"
        log("dsv3 weights kept in FP8 E4M3 with 128x128 block scales (the peer keeps bf16)")
    save()

    configs = [(B, C) for C in args.context for B in args.batch]
    plan: list[tuple[str, int, int]] = []
    for B, C in configs:
        if {"dsv3", "dsv3-eager"} & set(args.impl):
            plan.append(("dsv3", B, C))
        if "hf" in args.impl:
            plan.append(("hf", B, C))
    # then the slow-to-start rows (each compiles), alternating, most informative first
    static = [("hf-static", *points(s)) for s in args.hf_static] if "hf-static" in args.impl else []
    compiled = [("dsv3+compile", *points(s)) for s in args.compile] if "dsv3+compile" in args.impl else []
    for i in range(max(len(static), len(compiled))):
        plan += static[i : i + 1] + compiled[i : i + 1]
    # rough seconds per unit, to skip what would overrun the time limit (prefill ~100K tok/s, hf 3 prefills)
    cost = {"dsv3": lambda B, C: 4 + B * C / 1e5, "hf": lambda B, C: 5 + 3 * B * C / 1e5,
            "hf-static": lambda B, C: 80 + 3 * B * C / 1e5, "dsv3+compile": lambda B, C: 90 + B * C / 1e5}
    profiled = set()
    for impl, B, C in plan:
        if elapsed() + cost[impl](B, C) > args.time_limit:
            log(f"skip {impl} B={B} ctx={C}: would pass --time-limit {args.time_limit}s")
            result["skipped"].append({"impl": impl, "batch": B, "context": C})
            continue
        if impl.startswith("hf") and peer is None:
            continue
        try:
            if impl.startswith("dsv3"):
                rows += run_dsv3(model, args, B, C, bw, profile=args.profile and impl not in profiled,
                                 compile=impl == "dsv3+compile")
                profiled.add(impl)
            else:
                rows.append(run_hf(peer, cfg, args, B, C, bw, static=impl == "hf-static"))
        except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
            traceback.print_exc()
            log(f"FAILED {impl} B={B} ctx={C}: {type(e).__name__}: {e}")
            result["errors"].append({"impl": impl, "batch": B, "context": C, "error": f"{type(e).__name__}: {e}"})
            free_memory(device)
        save()

    # ratios against the peers at the same point
    by = {(r["impl"], r["batch"], r["context"]): r for r in rows}
    for r in rows:
        if r["impl"].startswith("dsv3"):
            for peer_name in ("hf", "hf-static"):
                p = by.get((peer_name, r["batch"], r["context"]))
                if p:
                    r[f"vs_{peer_name}"] = r["tokens_per_s"] / p["tokens_per_s"]
    save()
    print(f"\ndecode, preset {args.preset}{settings}, {dtype}, {device_name(device)}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"{args.steps} timed steps (hf: {args.hf_steps}); roofline = bytes per step / copy bandwidth / step time")
    print("bytes per step = weights (attention, dense, norms, head, B embedding rows; per MoE layer router + shared "
          "+ E(1-(1-K/E)^B) routed experts) + B x context x (kv_lora_rank + rope) x layers, 2 bytes each")
    table = []
    for r in rows:
        table.append({
            "impl": r["impl"], "B": r["batch"], "ctx": r["context"], "tok/s": f"{r['tokens_per_s']:,.0f}",
            "ms/step": f"{r['ms_per_step']:.2f}",
            "model ms": f"{r['model_ms_per_step']:.2f}" if "model_ms_per_step" in r else "",
            "MB/step": f"{r['bytes_per_step'] / 1e6:,.0f}", "roofline": f"{r['roofline']:.1%}",
            "roof(model)": f"{r['roofline_model']:.1%}" if "roofline_model" in r else "",
            "vs hf": f"{r['vs_hf']:.1f}x" if "vs_hf" in r else "",
            "vs hf-static": f"{r['vs_hf-static']:.2f}x" if "vs_hf-static" in r else "",
        })
    if table:
        print_table(table, list(table[0]))
    for e in result["errors"]:
        print(f"error: {e}")
    for s in result["skipped"]:
        print(f"skipped (time limit): {s}")
    result["elapsed_s"] = elapsed()
    emit_json(rounded(result))


# -- MTP acceptance and speedup on a trained model (CPU) ---------------------------------------------------
DEFAULT_PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n", "# Copyright", "def main():\n    parser = argparse.ArgumentParser(",
    "    return self.", "if __name__ == '__main__':\n",
]


def mtp(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    tokenizer = None
    if args.model.startswith("random:"):
        torch.manual_seed(0)
        cfg = preset(args.model.split(":", 1)[1])
        with torch.device(device):
            model = DeepSeekV3(cfg)
        model.init_weights()
        model = model.to(dtype).eval()
    else:
        from dsv3.checkpoint import load_model

        path = Path(args.model)
        model = load_model(path, device=device, dtype=dtype)
        if (path / "tokenizer.json").is_file():
            from dsv3.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
    if not len(model.mtp):
        raise SystemExit(f"{args.model}: the model has no MTP module (num_nextn_predict_layers=0)")
    if args.prompts:
        texts = [t.strip("\n") + "\n" for t in Path(args.prompts).read_text().split("\n\n") if t.strip()]
    else:
        texts = DEFAULT_PROMPTS
    if tokenizer is not None:
        prompts = [tokenizer.encode(t) for t in texts]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.cfg.vocab_size, (8 + 3 * i,), generator=g).tolist()
                   for i in range(len(texts))]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    log(f"MTP on {args.model}: {len(prompts)} prompts, {args.max_tokens} new tokens each, greedy, {device} "
        f"{dtype}, {torch.get_num_threads()} threads")
    best: dict[tuple[int, bool], dict] = {}
    outputs: dict[tuple[int, bool], list[list[int]]] = {}
    # repeats interleave the settings and keep each one's fastest run: a shared CPU is noisy
    for rep in range(args.repeats):
        for k in [0, *args.mtp]:
            for batched in (False, True):
                engine = Engine(model, tokenizer, mtp=k)
                engine.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))  # warm-up
                t0 = time.perf_counter()
                if batched:
                    results = engine.generate(prompts, params)
                else:
                    results = [engine.generate(p, params)[0] for p in prompts]
                secs = time.perf_counter() - t0
                tokens = sum(len(r.token_ids) for r in results)
                steps = sum(r.num_steps for r in results)
                drafted = sum(r.drafted for r in results)
                accepted = sum(r.accepted for r in results)
                outputs[(k, batched)] = [r.token_ids for r in results]
                row = {"mtp": k, "batch": len(prompts) if batched else 1, "tokens": tokens, "seconds": secs,
                       "tokens_per_s": tokens / secs, "decode_steps": steps,
                       "acceptance": accepted / drafted if drafted else None,
                       "tokens_per_step": (steps + accepted) / steps if steps else None}
                if (k, batched) not in best or secs < best[(k, batched)]["seconds"]:
                    best[(k, batched)] = row
                log(f"run {rep + 1}/{args.repeats} mtp={k} batch={row['batch']}: {tokens / secs:.1f} tok/s"
                    + (f", acceptance {accepted / drafted:.1%}, {(steps + accepted) / steps:.2f} tokens/step"
                       if drafted else ""))
    rows = list(best.values())
    for r in rows:
        base = next(b for b in rows if b["mtp"] == 0 and b["batch"] == r["batch"])
        r["speedup"] = base["seconds"] / r["seconds"]
        r["identical_to_mtp0"] = outputs[(r["mtp"], r["batch"] > 1)] == outputs[(0, r["batch"] > 1)]
    print(f"\nMTP speculative decoding, {args.model}, greedy, {args.max_tokens} new tokens x {len(prompts)} prompts, "
          f"{device_name(device)}")
    print_table([{
        "mtp": r["mtp"], "batch": r["batch"], "tok/s": f"{r['tokens_per_s']:.1f}",
        "acceptance": "" if r["acceptance"] is None else f"{r['acceptance']:.1%}",
        "tokens/step": "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}",
        "speedup": f"{r['speedup']:.2f}x", "same output": r["identical_to_mtp0"],
    } for r in rows], ["mtp", "batch", "tok/s", "acceptance", "tokens/step", "speedup", "same output"])
    emit_json(rounded({"bench": "decode-mtp", "model": args.model, "device": device_name(device),
                       "dtype": str(dtype), "max_tokens": args.max_tokens, "prompts": len(prompts),
                       "repeats": args.repeats, "torch": torch.__version__, "rows": rows}))


def key_value(pair: str) -> tuple[str, bool, object]:
    """KEY=VALUE as (KEY, whether there was an `=`, VALUE parsed as a Python literal: True, 4, 'x'; else the text)."""
    import ast

    key, sep, text = pair.partition("=")
    try:
        return key, bool(sep), ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, bool(sep), text


def config_overrides(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE model settings over the preset (`key_value`), e.g. the 671b preset cut to a few layers:
    num_hidden_layers=4 first_k_dense_replace=1 num_nextn_predict_layers=0."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = key_value(pair)
        if not sep or key not in fields:
            raise SystemExit(f"--config {pair}: not KEY=VALUE with KEY a ModelConfig field")
        out[key] = value
    return out


def inductor_options(pairs: list[str]) -> None:
    """Apply KEY=VALUE settings (`key_value`) to torch._inductor.config; an unknown key or a value of another
    type than the setting's exits with a message."""
    import torch._inductor.config as inductor

    for pair in pairs:
        key, sep, value = key_value(pair)
        *path, leaf = key.split(".")  # nested settings: triton.enable_pdl
        owner = inductor
        for part in path:
            owner = getattr(owner, part, None)
        if not sep or owner is None or not hasattr(owner, leaf):
            raise SystemExit(f"--inductor {pair}: not KEY=VALUE with KEY a torch._inductor.config setting")
        old = getattr(owner, leaf)
        if old is not None and type(value) is not type(old):
            raise SystemExit(f"--inductor {pair}: {key} is a {type(old).__name__} (now {old!r})")
        setattr(owner, leaf, value)
        log(f"torch._inductor.config.{key} = {value!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model settings over the preset, e.g. --preset 671b --config num_hidden_layers=4 "
                         "first_k_dense_replace=1 num_nextn_predict_layers=0 (V3's layers, a few of them)")
    ap.add_argument("--device", default=None, help="default: cuda when available (the --model mode: cpu)")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bf16 on cuda, float32 on cpu)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps of dsv3 (default 64)")
    ap.add_argument("--hf-steps", type=int, default=32, help="timed decode steps of transformers (default 32)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before timing")
    ap.add_argument("--eager-steps", type=int, default=16, help="timed steps of the dsv3-eager row")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--impl", nargs="+", default=["dsv3", "dsv3-eager", "hf", "hf-static", "dsv3+compile"],
                    choices=["dsv3", "dsv3-eager", "hf", "hf-static", "dsv3+compile"])
    ap.add_argument("--hf-static", nargs="*", default=["1x1024", "8x1024"], metavar="BxC",
                    help="batch x context points for hf-static (each compiles, ~40 s; default 1x1024 8x1024)")
    ap.add_argument("--compile", nargs="*", default=["1x1024", "1x4096"], metavar="BxC",
                    help="batch x context points for dsv3+compile (torch.compile of the decode forward inside the "
                         "graphs; each compiles; default 1x1024 1x4096)")
    ap.add_argument("--no-graphs", action="store_true", help="dsv3 without CUDA graphs")
    ap.add_argument("--no-overlap", action="store_true",
                    help="dsv3 without overlap: each step's host work after its device work, not during the next")
    ap.add_argument("--profile", action="store_true", help="print the kernels of one replayed decode step")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings for the compiled rows, e.g. combo_kernels=True (an "
                         "experiment: horizontal fusion of the decode step's independent small kernels)")
    ap.add_argument("--timeline", default=None, metavar="FILE",
                    help="with --profile: also write each profiled row's replayed step, kernel by kernel in launch "
                         "order with the gaps between them, to FILE.<row>")
    ap.add_argument("--fp8-weights", choices=["bf16", "keep"], default="bf16",
                    help="keep: quantise dsv3's block linears and experts to FP8 E4M3 (128x128 scales) and serve "
                         "them so (roofline bytes count 1 byte per such weight); the peer stays bf16")
    ap.add_argument("--time-limit", type=float, default=330.0,
                    help="seconds from start after which remaining units are skipped (default 330)")
    ap.add_argument("--out", default=None, help="also write the JSON here (rewritten after every row)")
    ap.add_argument("--model", default=None,
                    help="MTP mode: a checkpoint directory (or random:PRESET) to measure MTP speculation on")
    ap.add_argument("--mtp", type=int, nargs="+", default=[1], help="MTP mode: draft counts to compare with 0")
    ap.add_argument("--max-tokens", type=int, default=64, help="MTP mode: new tokens per prompt")
    ap.add_argument("--prompts", default=None, help="MTP mode: a text file of prompts separated by blank lines")
    ap.add_argument("--repeats", type=int, default=2, help="MTP mode: runs per setting, fastest kept")
    args = ap.parse_args()
    args.config = config_overrides(args.config)
    inductor_options(args.inductor)
    if args.model:
        args.device = args.device or "cpu"
        mtp(args)
    else:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        speed(args)


if __name__ == "__main__":
    main()
