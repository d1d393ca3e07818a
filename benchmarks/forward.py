"""Forward throughput (tokens/s) of dsv3 vs transformers' DeepseekV3ForCausalLM, same weights/device/dtype.

    python benchmarks/forward.py --preset tiny --device cpu
    python benchmarks/forward.py --preset bench --device cuda --batch 8 --seq 2048

Both models get identical weights (ours saved in the HF layout, loaded by transformers with its defaults:
SDPA attention, grouped_mm experts). FLOPs per token = 2 x activated matmul params + causal attention
(dsv3.info.forward_flops_per_token); MFU against 989 TFLOP/s (bf16) on the GPU, against a measured matmul
rate on the CPU. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch

from benchmarks.common import PEAK_FLOPS, cpu_peak_flops, device_name, emit_json, print_table, time_interleaved
from dsv3.checkpoint import save_model
from dsv3.config import preset
from dsv3.info import forward_flops_per_token
from dsv3.model import DeepSeekV3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(dsv3 model)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default | reduce-overhead)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one dsv3 forward")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    batch = args.batch or (8 if gpu else 4)
    seq = args.seq or (2048 if gpu else 256)
    cfg = preset(args.preset)
    torch.manual_seed(0)

    with torch.device(device):
        ours = DeepSeekV3(cfg)
    ours.init_weights()
    ours = ours.to(dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    flops_tok = forward_flops_per_token(cfg, seq, causal_mean=True)
    peak = PEAK_FLOPS["cuda-bf16"] if gpu else cpu_peak_flops()
    rows, result = [], {}

    fns = {"dsv3": lambda: ours(tokens, mtp=False).logits}
    if args.compile:
        compiled = torch.compile(ours, mode=None if args.compile_mode == "default" else args.compile_mode)
        fns["dsv3+compile"] = lambda: compiled(tokens, mtp=False).logits
    if not args.no_peer:
        from transformers import DeepseekV3ForCausalLM

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_model(ours, d)  # the peer gets our weights through the HF layout, loaded its default way
            peer = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        fns["transformers"] = lambda: peer(tokens).logits

    with torch.inference_mode():
        times = time_interleaved(fns, device, warmup=2, iters=args.iters)
        if args.profile:
            fn = fns.get("dsv3+compile", fns["dsv3"])
            with torch.profiler.profile() as prof:
                fn()
            sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))

    for name, t in times.items():
        tps = batch * seq / t
        mfu = tps * flops_tok / peak
        rows.append({"impl": name, "ms/iter": f"{t * 1e3:.1f}", "tokens/s": f"{tps:,.0f}", "MFU": f"{mfu:.1%}"})
        result[name] = {"tokens_per_s": tps, "mfu": mfu}
    if "transformers" in times:
        best = min(t for name, t in times.items() if name != "transformers")
        result["ratio"] = times["transformers"] / best
        result["ratio_eager"] = times["transformers"] / times["dsv3"]

    print(f"\nforward, preset {args.preset}, batch {batch} x seq {seq}, {dtype}, {device_name(device)}")
    print(f"FLOPs/token {flops_tok / 1e9:.3f} G; MFU against {peak / 1e12:.1f} TFLOP/s "
          f"({'bf16 dense peak' if gpu else 'measured fp32 matmul'})")
    print_table(rows, ["impl", "ms/iter", "tokens/s", "MFU"])
    if "ratio" in result:
        print(f"dsv3 / transformers: {result['ratio']:.2f}x")
    emit_json({"bench": "forward", "preset": args.preset, "device": device_name(device), "dtype": str(dtype),
               "batch": batch, "seq": seq, "torch": torch.__version__, **result})


if __name__ == "__main__":
    main()
