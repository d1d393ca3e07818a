"""Training throughput (tokens/s, MFU) of dsv3's training step vs transformers' DeepseekV3ForCausalLM, same run.

    python -m benchmarks.train_step --preset tiny --device cpu
    python -m benchmarks.train_step --preset bench --device cuda --batch 4 --seq 2048 --compile --pure-bf16
    python -m benchmarks.train_step --preset tiny --device cpu --compile --cpu-bf16   # + bf16 autocast rows

dsv3's step is `dsv3.train.loop.train_step`, what `dsv3 train` runs: forward, the loss (float32 CE, MTP,
sequence-wise balance loss), backward, gradient clipping, AdamW, the aux-free bias update. On the GPU it keeps
float32 master weights under bf16 autocast with fused AdamW (the loop's recipe, the paper's precision split),
and is also timed in pure bf16 (`--pure-bf16`, the peer's setting). The peer gets our weights (saved in
the HF layout, loaded by transformers with its defaults: SDPA, grouped_mm experts), pure bf16 + fused AdamW
on the GPU (shared/HARDWARE.md), float32 on the CPU, with the same clipping; it has no MTP module, so the
like-for-like ratio compares it with our step with MTP off; our MTP-on step is reported too.

FLOPs per token: 3 x the forward count (dsv3.info.forward_flops_per_token: 2 x activated matmul parameters,
the embedding lookup excluded, plus causal attention), i.e. 6 x params + attention; the MTP-on row adds the
MTP block, its attention and the second pass through the output head. MFU against 989 TFLOP/s (bf16 dense) on
the GPU, against a measured float32 matmul rate on the CPU. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import warnings

import torch

from benchmarks.common import (
    PEAK_FLOPS,
    cpu_peak_flops,
    device_name,
    emit_json,
    print_table,
    profile_kernels,
    time_fn,
    time_interleaved,
)
from dsv3.checkpoint import save_model
from dsv3.config import ModelConfig, preset
from dsv3.info import attention_flops_per_token, count_params, forward_flops_per_token
from dsv3.model import DeepSeekV3
from dsv3.train.loop import train_step
from dsv3.train.objective import ObjectiveConfig, compute_loss
from dsv3.train.optim import build_optimizer, init_model


def train_flops_per_token(cfg: ModelConfig, seq: int, mtp: bool) -> float:
    """Forward + backward (3x forward) FLOPs per token of a causal sequence of `seq` tokens."""
    fwd = forward_flops_per_token(cfg, seq, causal_mean=True)
    if mtp and cfg.num_nextn_predict_layers:
        p = count_params(cfg)
        d, D = cfg.hidden_size, cfg.num_nextn_predict_layers
        mtp_matmul = p.mtp_active - D * 5 * d + D * p.head  # its block, eh_proj and the shared head; no norms
        attn = attention_flops_per_token(cfg, 1) / cfg.num_hidden_layers * D * (seq + 1) / 2
        fwd += 2 * mtp_matmul + attn
    return 3 * fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="default: bench on GPU, tiny on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4 GPU, 8 CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 GPU, 256 CPU)")
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches of --batch sequences per optimiser step (gradient accumulation, both models)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(dsv3 model)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--no-mtp-row", action="store_true", help="skip the MTP-on row (the loop's full step)")
    ap.add_argument("--pure-bf16", action="store_true", help="GPU: also time dsv3 in pure bf16 (as the peer)")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="CPU: also time both models under bf16 autocast (fp32 master weights; ours is the loop's "
                         "train.cpu_bf16; with --compile, dsv3 compiled too: its grouped GEMM takes bf16 only)")
    ap.add_argument("--skip-master", action="store_true",
                    help="GPU with --pure-bf16: skip the fp32-master rows (ignored otherwise)")
    ap.add_argument("--profile", action="store_true", help="GPU: print the kernels of each timed configuration")
    ap.add_argument("--profile-rows", type=int, default=30, help="kernels listed by --profile (by device time)")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.preset or ("bench" if gpu else "tiny")
    batch = args.batch or (4 if gpu else 8)
    seq = args.seq or (2048 if gpu else 256)
    cfg = preset(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekV3(cfg)
    init_model(model)
    model.train()
    mb, batch = batch, batch * args.accum  # sequences per micro-batch, per optimiser step
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    peak = PEAK_FLOPS["cuda-bf16"] if gpu else cpu_peak_flops()
    objective = ObjectiveConfig("aux-free")
    rows, result = [], {}

    pending = []  # CPU configurations, timed round-robin at the end

    peak16 = cpu_peak_flops(torch.bfloat16) if not gpu and args.cpu_bf16 else peak

    def finish(label: str, key: str, t: float, mtp: bool) -> None:
        tps = batch * seq / t
        mfu = tps * train_flops_per_token(cfg, seq, mtp) / (peak16 if key.startswith("bf16ac") else peak)
        rows.append({"impl": label, "ms/step": f"{t * 1e3:.1f}", "tokens/s": f"{tps:,.0f}", "MFU": f"{mfu:.1%}"})
        result[key] = {"tokens_per_s": tps, "mfu": mfu, "ms_per_step": t * 1e3}

    def timed(label: str, key: str, fn) -> float | None:  # noqa: ANN001
        """fn's median step time, or None with the failure recorded: one failing configuration must not lose
        the others' figures."""
        try:
            return time_fn(fn, device, warmup=args.warmup, iters=args.iters)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{label}: failed: {error}", flush=True)
            rows.append({"impl": label, "ms/step": "failed"})
            result[key] = {"error": error}
            return None

    def record(label: str, key: str, fn, mtp: bool) -> None:
        if not gpu:  # a shared 2-core CPU drifts: interleave the configurations so drift hits all alike
            pending.append((label, key, fn, mtp))
            return
        t = timed(label, key, fn)
        if t is not None:
            if args.profile:  # after the timing: the profiled calls are extra training steps of the same model
                profile_kernels(fn, device, label, n=2, rows=args.profile_rows)
            finish(label, key, t, mtp)

    compiled_loss = torch.compile(compute_loss, mode=args.compile_mode) if args.compile else compute_loss

    def cpu_autocast(step):  # noqa: ANN001, ANN202 - the peer's step under autocast (ours: train.cpu_bf16)
        def wrapped() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()
        return wrapped

    def ours(m: DeepSeekV3, forward, mtp: bool, autocast: bool, cpu_autocast: bool = False):
        opt = build_optimizer(m, lr=1e-4, fused=gpu or None)
        loss_fn = compute_loss if forward is m else compiled_loss  # as the loop: compiled together or not at all

        def step() -> None:
            train_step(m, opt, tokens, None, objective, micro_batch_size=mb, lr=1e-4, mtp_lambda=0.3,
                       gamma=1e-3, device=device, autocast=autocast, forward=forward, mtp=mtp, loss_fn=loss_fn,
                       cpu_autocast=cpu_autocast)
        return step

    with tempfile.TemporaryDirectory() as ckpt:
        save_model(model, ckpt)  # the peer's weights: the same model, before any of our steps change it

        def time_ours(model: DeepSeekV3) -> None:  # a scope of its own: its models, optimisers and graphs die with it
            # fp32 master weights; bf16 autocast on the GPU (the loop's recipe)
            label = "dsv3 (fp32 master, bf16 autocast)" if gpu else "dsv3 (fp32)"
            master = not (gpu and args.pure_bf16 and args.skip_master)
            if master:
                record(f"{label}, MTP off", "dsv3", ours(model, model, False, True), mtp=False)
            if master and not args.no_mtp_row:
                record(f"{label}, MTP on", "dsv3_mtp", ours(model, model, True, True), mtp=True)
            if master and args.compile and gpu:
                compiled = torch.compile(model, mode=args.compile_mode)
                record(f"{label} + compile, MTP off", "dsv3_compile", ours(model, compiled, False, True), mtp=False)
            elif args.compile and not gpu and not args.cpu_bf16:
                print("--compile on the CPU needs --cpu-bf16 (torch.compile's grouped GEMM takes bf16 only)")
            if not gpu and args.cpu_bf16:
                record("dsv3 (fp32 master, bf16 autocast), MTP off", "bf16ac_dsv3",
                       ours(model, model, False, True, cpu_autocast=True), mtp=False)
                if args.compile:
                    compiled = torch.compile(model, mode=args.compile_mode)
                    record("dsv3 (fp32 master, bf16 autocast) + compile, MTP off", "bf16ac_dsv3_compile",
                           ours(model, compiled, False, True, cpu_autocast=True), mtp=False)
            if gpu and args.pure_bf16:
                m16 = model.to(torch.bfloat16)
                record("dsv3 (pure bf16), MTP off", "dsv3_bf16", ours(m16, m16, False, False), mtp=False)
                if args.compile:
                    c16 = torch.compile(m16, mode=args.compile_mode)
                    record("dsv3 (pure bf16) + compile, MTP off", "dsv3_bf16_compile", ours(m16, c16, False, False),
                           mtp=False)

        time_ours(model)
        del model
        if gpu:  # free our models' memory and CUDA-graph pools before the peer's step allocates its own
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()

        if not args.no_peer:
            from transformers import DeepseekV3ForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # its load report lists our MTP layer, which it has no module for

            dtype = torch.bfloat16 if gpu else torch.float32
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).train()
            popt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=gpu or None)

            def peer_step() -> None:
                for i in range(args.accum):
                    x = tokens[i * mb:(i + 1) * mb]
                    (peer(input_ids=x[:, :-1], labels=x[:, :-1]).loss / args.accum).backward()
                torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
                popt.step()
                popt.zero_grad(set_to_none=True)

            record(f"transformers ({'pure bf16' if gpu else 'fp32'})", "transformers", peer_step, mtp=False)
            if not gpu and args.cpu_bf16:
                record("transformers (fp32 master, bf16 autocast)", "bf16ac_transformers", cpu_autocast(peer_step),
                       mtp=False)

        if pending:
            try:
                times = time_interleaved({key: fn for _, key, fn, _ in pending}, device, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - find the failing configuration, keep the others' figures
                print(f"interleaved timing failed ({type(e).__name__}: {e}); timing one at a time", flush=True)
                times = {key: timed(label, key, fn) for label, key, fn, _ in pending}
            for label, key, _, mtp in pending:
                if times[key] is not None:
                    finish(label, key, times[key], mtp)
    tps = {k: v.get("tokens_per_s", 0.0) for k, v in result.items()}
    best = max((v for k, v in tps.items() if k.startswith("dsv3") and k != "dsv3_mtp"), default=0.0)
    if tps.get("transformers"):
        result["ratio"] = best / tps["transformers"]
        if "dsv3" in tps:
            result["ratio_eager"] = tps["dsv3"] / tps["transformers"]
    if tps.get("bf16ac_transformers"):  # CPU, both under bf16 autocast: like for like in precision
        best16 = max((v for k, v in tps.items() if k.startswith("bf16ac_dsv3")), default=0.0)
        result["ratio_bf16_autocast"] = best16 / tps["bf16ac_transformers"]

    print(f"\ntraining step, preset {name}, batch {batch} x seq {seq} ({args.accum} micro-batch(es) of {mb}), "
          f"{device_name(device)}")
    print(f"FLOPs/token {train_flops_per_token(cfg, seq, False) / 1e9:.3f} G (MTP off), "
          f"{train_flops_per_token(cfg, seq, True) / 1e9:.3f} G (MTP on); MFU against {peak / 1e12:.1f} TFLOP/s "
          f"({'bf16 dense peak' if gpu else 'measured fp32 matmul'})"
          + (f"; bf16 autocast rows against a measured bf16 matmul, {peak16 / 1e12:.2f} TFLOP/s" if peak16 != peak
             else ""))
    print_table(rows, ["impl", "ms/step", "tokens/s", "MFU"])
    if "ratio_bf16_autocast" in result:
        print(f"dsv3 / transformers, both under bf16 autocast (MTP off): {result['ratio_bf16_autocast']:.2f}x")
    if "ratio" in result:
        print(f"dsv3 / transformers (like for like, MTP off): {result['ratio']:.2f}x"
              + (f" (eager, loop's precision: {result['ratio_eager']:.2f}x)" if "ratio_eager" in result else ""))
    emit_json({"bench": "train_step", "preset": name, "device": device_name(device), "batch": batch, "seq": seq,
               "accum": args.accum, "compile_mode": args.compile_mode,
               "torch": torch.__version__, **result})


if __name__ == "__main__":
    main()
