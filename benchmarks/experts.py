"""Decode's routed experts at 1-64 tokens on the GPU: the three ways `Experts` can multiply them.

    python -m benchmarks.experts [--tokens 1 2 4 8 16 32 64] [--e4m3] [--sweep 8 64]

`bench`'s routed experts (64 of d 1536, I 576, top-8), each token routed to 8 experts drawn at random. Per token
count, the two projections (gate_up, then down with the SwiGLU) three ways: `gemv` streaming each (token, expert)
pair's expert (what `Experts.few_pairs` runs below E // 3 pairs; FP8 experts: below 5E / 8 pairs),
`expert_gemm` reading each chosen expert once for all its tokens (what it runs from there to 64 tokens), and the two
`grouped_mm` calls of `Experts.grouped` on rows already sorted by expert (its sort, gathers and unsort not counted,
nor any way's shared expert or combine: the same kernels for all three). Each way is captured 50 times in a CUDA
graph and replayed (`benchmarks.common.replay_us`); calls cycle through 10 routings and two copies of the weights,
so the chosen experts come from HBM. floor = bytes of the distinct chosen experts / measured copy bandwidth.
`--e4m3`: E4M3 weights with 128x128 block scales (grouped_mm then multiplies experts dequantised to bf16 in the same
call, as `FP8Experts.weights` does). `--sweep T...`: also time expert_gemm's program shapes for gate_up and down at
those token counts. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, device_name, emit_json, print_table, replay_us
from dsv3.config import preset
from dsv3.fp8.modules import FP8Experts
from dsv3.model.expert_gemm import expert_gemm
from dsv3.model.gemv import gemv
from dsv3.model.moe import Experts, RouterOutput

ROUTINGS = 10
SWEEP = list(itertools.product((16,), (64, 128, 256), (64, 128), (4, 8), (3, 4)))


def routings(T: int, E: int, K: int, dev: torch.device) -> list[RouterOutput]:
    out = []
    for _ in range(ROUTINGS):
        idx = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
        flat = idx.flatten()
        load = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
        weights = torch.rand(T, K, device=dev)
        out.append(RouterOutput(idx, weights, torch.empty(T, E, device=dev), load))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--e4m3", action="store_true", help="E4M3 weights with 128x128 block scales")
    ap.add_argument("--sweep", nargs="*", type=int, default=[], metavar="T",
                    help="also sweep expert_gemm's program shapes at these token counts")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    cfg = preset("bench")
    E, K, d, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm

    def make() -> Experts:
        ex = Experts(cfg).to(dev, torch.bfloat16)
        torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
        torch.nn.init.normal_(ex.down_proj, std=0.02)
        return FP8Experts.from_experts(ex) if args.e4m3 else ex

    experts = [make(), make()]
    ops = [ex.gemv_operands() for ex in experts]
    expert_bytes = 3 * inter * d * experts[0].gate_up_proj.element_size()
    rows = []
    for T in args.tokens:
        rs = routings(T, E, K, dev)
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        h = torch.randn(T * K, 2 * inter, device=dev, dtype=torch.bfloat16)
        a = F.silu(h[:, :inter]) * h[:, inter:]
        xs = x.repeat_interleave(K, 0)  # (the rows' order does not change grouped_mm's work)
        offs = [r.load.cumsum(0).to(torch.int32) for r in rs]
        distinct = sum(int((r.load > 0).sum()) for r in rs) / len(rs)
        nbytes = distinct * expert_bytes

        def way(fn, rs=rs):  # noqa: ANN001, ANN202 - call i: weights copy i % 2, routing i % ROUTINGS
            return replay_us(lambda i: fn(i % 2, rs[i % ROUTINGS], i % ROUTINGS), ROUTINGS * 2)

        def per_pair(c: int, r: RouterOutput, _: int, x=x, h=h) -> None:
            gu, gu_s, dn, dn_s = ops[c]
            gemv(x, gu, r.topk_idx.flatten(), gu_s, rows_per_x=K, split=inter)
            gemv(h, dn, r.topk_idx.flatten(), dn_s, swiglu=True)

        def tiled(c: int, r: RouterOutput, _: int, x=x, h=h) -> None:
            gu, gu_s, dn, dn_s = ops[c]
            expert_gemm(x, gu, r.topk_idx, gu_s, split=inter)
            expert_gemm(h, dn, r.topk_idx, dn_s, swiglu=True)

        def sorted_grouped(c: int, r: RouterOutput, j: int, xs=xs, a=a, offs=offs) -> None:
            gu, dn = experts[c].weights(torch.bfloat16)
            grouped(xs, gu.transpose(1, 2), offs=offs[j])
            grouped(a, dn.transpose(1, 2), offs=offs[j])

        times = {"per-pair gemv us": way(per_pair), "expert_gemm us": way(tiled), "grouped_mm us": way(sorted_grouped)}
        best = min(times, key=times.get)
        rows.append({"tokens": T, "experts": f"{distinct:.1f}", "MB": f"{nbytes / 1e6:.1f}",
                     "floor us": f"{nbytes / bw * 1e6:.1f}", **{k: f"{v:.1f}" for k, v in times.items()},
                     "expert_gemm bw": f"{nbytes / (times['expert_gemm us'] * 1e-6) / bw:.0%}",
                     "best": best.removesuffix(" us")})
        print(rows[-1], flush=True)
    print(f"decode's routed experts (gate_up + SwiGLU down), bench shapes, {'E4M3' if args.e4m3 else 'bf16'}, "
          f"{device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(rows, ["tokens", "experts", "MB", "floor us", "per-pair gemv us", "expert_gemm us", "grouped_mm us",
                       "expert_gemm bw", "best"])
    result = {"bench": "experts", "device": device_name(dev), "copy_bandwidth": bw, "torch": torch.__version__,
              "e4m3": args.e4m3, "rows": rows}
    if args.sweep:
        result["sweep"] = {T: sweep(ops, T, E, K, d, inter, dev) for T in args.sweep}
    emit_json(result)


def sweep(ops: list[tuple], T: int, E: int, K: int, d: int, inter: int, dev: torch.device) -> dict:
    """expert_gemm's gate_up and down alone at every program shape of SWEEP: us per shape."""
    rs = routings(T, E, K, dev)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    h = torch.randn(T * K, 2 * inter, device=dev, dtype=torch.bfloat16)
    out = {}
    for name, fn in (
        ("gate_up", lambda o, r, t: expert_gemm(x, o[0], r.topk_idx, o[1], split=inter, tiles=t)),
        ("down", lambda o, r, t: expert_gemm(h, o[2], r.topk_idx, o[3], swiglu=True, tiles=t)),
    ):
        times = {}
        for t in SWEEP:
            try:
                times["x".join(map(str, t))] = round(replay_us(
                    lambda i, t=t, fn=fn: fn(ops[i % 2], rs[i % ROUTINGS], t), ROUTINGS * 2), 2)
            except Exception as e:  # noqa: BLE001 - a shape Triton cannot build (shared memory): skip it
                print(f"  {name} {t}: {type(e).__name__}", flush=True)
        best = sorted(times, key=times.get)[:5]
        print(f"sweep {name} at {T} tokens (BLOCK_M x BLOCK_N x BLOCK_K x warps x stages: us), best: "
              + ", ".join(f"{b}: {times[b]}" for b in best), flush=True)
        out[name] = times
    return out


if __name__ == "__main__":
    main()
