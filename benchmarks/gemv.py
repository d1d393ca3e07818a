"""Decode's few-row GEMMs on the GPU: dsv3.model.gemv against cuBLAS / grouped_mm and the bandwidth floor.

    python -m benchmarks.gemv

Shapes of the `bench` preset at batch 1: each dense linear [N, K] times one row (bf16 cuBLAS vs gemv, and
gemv with E4M3 weights + 128x128 scales), and one token's 8 routed pairs of 64 experts (gate_up [1152, 1536],
down [1536, 576] with SwiGLU applied on load) against the two grouped_mm calls the grouped path makes. Each
kernel is captured 50 times in a CUDA graph and replayed (what decode does), so the time is the GPU's, not
the launcher's; the calls cycle through enough copies of the weights (experts: through all 64) that each one
reads them from HBM, as decode does, not from the L2 cache. floor = weight bytes / the measured
device-to-device copy bandwidth. `gemv L2 us` times the same gemv on one copy, so that from the second call on
its weight comes from the L2 cache: what prefetching the next weights while other kernels run could reach,
the launch and latency left once the bytes are near. Kernels launch as decode launches them (with PDL on
Hopper, `dsv3.model.pdl`; DSV3_PDL=0 for plain launches). Prints a table, then one JSON line.

    python -m benchmarks.gemv --chain

instead times decode's GEMVs and router of `bench`'s 11 MoE layers back to back, each kernel reading the
previous one's output (W_DQ + [W_DKV; W_KR], W_UQ with q_a_layernorm, W_O, the router's two launches, the
routed experts' gate_up and down), every layer on its own weights (so from HBM), in one CUDA graph: with
programmatic dependent launch (`dsv3.model.pdl`: waiting only, and with each weight prefetched toward L2
before the wait) and without, outputs compared bit for bit.

    python -m benchmarks.gemv --dense-ffn

times `bench`'s dense FFN (layer 0: d 1536, I 8192, 75 MB) at one row, as decode runs it (RMSNorm, cuBLAS gate and
up, SiLU, cuBLAS down, the skip connection; eager and torch.compiled) against gemv's norm-fused pair launch for
gate and up and its SwiGLU-on-load down launch with the skip connection, at a few program shapes each.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, device_name, emit_json, graph_us, n_copies, print_table, replay_us
from dsv3.model.gemv import gemv, gemv_pair
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.router_kernel import fused_router

LINEARS = [(768, 1536), (3072, 768), (576, 1536), (1536, 2048), (1152, 1536), (1536, 576), (8192, 1536),
           (1536, 8192), (32768, 1536)]
# program shapes (BLOCK_N, BLOCK_K, warps) of --sweep: at least one element a thread
SWEEP = [(n, k, w) for n in (1, 2, 4, 8, 16) for k in (128, 256, 512, 1024, 2048) for w in (1, 2, 4, 8)
         if n * k >= 32 * w]


def sweep(fn, copies: int, nbytes: int, bw: float) -> dict:  # noqa: ANN001
    """Every (BLOCK_N, BLOCK_K, warps) of SWEEP for fn(i, tiles): the default's time, the best and its tiles."""
    times = {t: replay_us(lambda i, t=t: fn(i, t), copies) for t in SWEEP}
    print("  sweep (BLOCK_N x BLOCK_K x warps: us):", ", ".join(f"{'x'.join(map(str, t))}: {v:.1f}"
                                                             for t, v in times.items()), flush=True)
    best = min(times, key=times.get)
    return {"best us": times[best], "best tiles": "x".join(map(str, best)),
            "best bw": f"{nbytes / (times[best] * 1e-6) / bw:.0%}"}


def dims(text: str) -> tuple[int, ...]:
    """An argparse type: "NxK" or "NxKxW" as integers."""
    try:
        return tuple(int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not numbers joined by x, such as 7168x16384") from None


def chain(dev: torch.device, bw: float, layers: int = 11, reps: int = 20) -> None:
    """--chain: the GEMV + router kernels of `layers` MoE layers of `bench`, each on the previous output, as
    one CUDA graph replayed `reps` times, with and without PDL (see the module docstring)."""
    d, q_lora, kv, heads, qk, v, E, topk, inter = 1536, 768, 320, 16, 192, 128, 64, 8, 576
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, dtype=bf, generator=g) * shape[-1] ** -0.5)

    ws = [dict(dq=rand(q_lora, d), dkv=rand(kv, d), uq=rand(heads * qk, q_lora), norm=1 + rand(q_lora),
               o=rand(d, heads * v), gate=rand(E, d), bias=torch.zeros(E, device=dev),
               gate_up=rand(E, 2 * inter, d), down=rand(E, d, inter)) for _ in range(layers)]
    nbytes = sum(t.numel() * t.element_size() for w in ws for k, t in w.items() if k not in ("gate_up", "down"))
    nbytes += layers * topk * 3 * inter * d * 2  # the 8 routed experts a token reads of each stack
    x0 = torch.randn(1, d, device=dev, dtype=bf)

    def step() -> torch.Tensor:
        x = x0
        for w in ws:
            qa = gemv_pair(x, w["dq"], w["dkv"])[:, :q_lora]
            q = gemv(qa, w["uq"], norm=(w["norm"], 1e-6))
            o = gemv(q[:, : heads * v], w["o"])
            _, idx, _, _, _ = fused_router(o, w["gate"], w["bias"], 8, 4, topk)
            h = gemv(o, w["gate_up"], idx, rows_per_x=topk)
            x = gemv(h, w["down"], idx, swiglu=True)[:1]
        return x

    rows, outs = [], {}
    for mode in ("0", "wait", "1"):
        os.environ["DSV3_PDL"] = mode
        us, out = graph_us(step, reps)
        outs[mode] = out.clone()
        label = {"0": "off", "wait": "wait", "1": "wait + L2 prefetch"}[mode]
        rows.append({"pdl": label, "us per step": f"{us:.1f}", "us per layer": f"{us / layers:.2f}",
                     "MB per step": f"{nbytes / 1e6:.0f}", "of bandwidth": f"{nbytes / (us * 1e-6) / bw:.1%}"})
    os.environ.pop("DSV3_PDL")
    same = all(torch.equal(outs["0"], o) for o in outs.values())
    print(f"decode GEMV + router chain, {layers} `bench` MoE layers (7 kernels each), {device_name(dev)}, copy "
          f"bandwidth {bw / 1e12:.2f} TB/s; outputs with and without PDL identical: {same}")
    print_table(rows, ["pdl", "us per step", "us per layer", "MB per step", "of bandwidth"])
    emit_json({"bench": "gemv-chain", "device": device_name(dev), "copy_bandwidth": bw, "torch": torch.__version__,
               "identical": same, "rows": rows})
    if not same:
        raise SystemExit("outputs differ with PDL")


def dense_ffn(dev: torch.device, bw: float) -> None:
    """--dense-ffn: `bench`'s dense FFN at one row, cuBLAS (eager, compiled) against two gemv launches (see the
    module docstring); every call on its own copy of the weights (from HBM)."""
    d, inter, bf = 1536, 8192, torch.bfloat16
    nbytes = 3 * d * inter * 2
    c = n_copies(nbytes)
    torch.manual_seed(0)
    mlps = [MLP(d, inter).to(dev, bf) for _ in range(c)]
    ws = [(m.gate_proj.weight.detach(), m.up_proj.weight.detach(), m.down_proj.weight.detach()) for m in mlps]
    norm = RMSNorm(d).to(dev, bf)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(d, device=dev))
    nw = norm.weight.detach()
    x = torch.randn(1, d, device=dev, dtype=bf)

    @torch.no_grad()
    def modules(i: int) -> torch.Tensor:  # the MLP module and its block's norm and skip connection
        return x + mlps[i](norm(x))

    def pair(i: int, t: tuple[int, int, int] | None = None) -> torch.Tensor:
        return gemv_pair(x, ws[i][0], ws[i][1], norm=(nw, norm.eps), tiles=t)

    h = pair(0)

    def down(i: int, t: tuple[int, int, int] | None = None) -> torch.Tensor:
        return gemv(h, ws[i][2], swiglu=True, residual=x, tiles=t)

    def both(i: int, tiles: tuple[tuple[int, int, int] | None, ...] = (None, None)) -> torch.Tensor:
        return gemv(pair(i, tiles[0]), ws[i][2], swiglu=True, residual=x, tiles=tiles[1])

    best = ((16, 512, 8), (8, 512, 8))  # the shapes below that were fastest on the H200

    rows = []
    for name, fn, by in [("cuBLAS chain, eager", modules, nbytes),
                         ("cuBLAS chain, compiled", torch.compile(modules), nbytes), ("gemv pair + down", both, nbytes),
                         ("gemv pair + down, 16x512x8 + 8x512x8", lambda i: both(i, best), nbytes),
                         ("gemv pair (gate, up, norm)", pair, 2 * d * inter * 2),
                         ("gemv down (SwiGLU, skip)", down, d * inter * 2)]:
        us = replay_us(fn, c)
        rows.append({"case": name, "MB": f"{by / 1e6:.1f}", "floor us": f"{by / bw * 1e6:.1f}", "us": f"{us:.1f}",
                     "of bandwidth": f"{by / (us * 1e-6) / bw:.0%}"})
    for name, fn, shapes in [("gemv pair", pair, [(16, 256, 8), (16, 512, 8), (8, 512, 8), (32, 256, 8)]),
                             ("gemv down", down, [(4, 128, 4), (8, 256, 4), (16, 256, 4), (8, 512, 8), (16, 512, 8)])]:
        for t in shapes:
            us = replay_us(lambda i, fn=fn, t=t: fn(i, t), c)
            rows.append({"case": f"{name} {'x'.join(map(str, t))}", "us": f"{us:.1f}"})
    ref = modules(0).double()  # the two ways compute the same FFN: their difference against its scale
    err = ((both(0).double() - ref).abs().max() / ref.abs().max()).item()
    print(f"`bench` dense FFN at one row, {device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s; gemv against "
          f"cuBLAS: max difference {err:.1e} of the output's largest value")
    print_table(rows, ["case", "MB", "floor us", "us", "of bandwidth"])
    emit_json({"bench": "gemv-dense-ffn", "device": device_name(dev), "copy_bandwidth": bw,
               "torch": torch.__version__, "max_difference": err, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time every program shape of SWEEP (bf16), keep the best")
    ap.add_argument("--chain", action="store_true", help="time the chain of one decode step's GEMVs, PDL on / off")
    ap.add_argument("--dense-ffn", action="store_true", help="time bench's dense FFN: cuBLAS against gemv")
    ap.add_argument("--linears", nargs="+", type=dims, default=LINEARS, metavar="NxK",
                    help="the dense linears [N, K] to time (default: bench's); V3's single-row ones: 2112x7168 "
                         "(W_DQ with [W_DKV; W_KR]) 24576x1536 (W_UQ) 7168x16384 (W_O)")
    ap.add_argument("--tiles", nargs="+", type=dims, default=None, metavar="NxKxW",
                    help="the program shapes --sweep tries (BLOCK_N x BLOCK_K x warps; default every one of SWEEP)")
    ap.add_argument("--no-experts", action="store_true", help="only the linears, not bench's routed experts")
    ap.add_argument("--sweep-e4m3", action="store_true", help="--sweep the linears' E4M3 weights instead of bf16")
    args = ap.parse_args()
    if args.tiles:
        SWEEP[:] = args.tiles
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    if args.chain:
        chain(dev, bw)
        return
    if args.dense_ffn:
        dense_ffn(dev, bw)
        return
    fp8 = torch.float8_e4m3fn
    rows = []

    def add(name: str, nbytes: int, best: dict | None = None, **times: float) -> None:
        row = {"case": name, "MB": f"{nbytes / 1e6:.1f}", "floor us": f"{nbytes / bw * 1e6:.1f}"}
        row.update({k: f"{v:.1f}" for k, v in times.items()})
        if best:
            row.update({k: f"{v:.1f}" if isinstance(v, float) else v for k, v in best.items()})
        rows.append(row)

    for n, k in args.linears:
        c, c8 = n_copies(n * k * 2), n_copies(n * k)  # E4M3 copies are half the bytes: more of them stay cold
        w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(c)]
        q = [w[i % c].to(fp8) for i in range(c8)]
        s = torch.rand(-(-n // 128), -(-k // 128), device=dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        best = None
        if args.sweep and args.sweep_e4m3:  # (the best column's bandwidth then counts the E4M3 bytes)
            best = sweep(lambda i, t, x=x, q=q, s=s: gemv(x, q[i], scale_inv=s, tiles=t), c8, n * k, bw)
        elif args.sweep:
            best = sweep(lambda i, t, x=x, w=w: gemv(x, w[i], tiles=t), c, n * k * 2, bw)
        add(f"linear {n}x{k}", n * k * 2, best, **{
            "cuBLAS bf16 us": replay_us(lambda i, x=x, w=w: F.linear(x, w[i]), c),
            "gemv bf16 us": replay_us(lambda i, x=x, w=w: gemv(x, w[i]), c),
            "gemv e4m3 us": replay_us(lambda i, x=x, q=q, s=s: gemv(x, q[i], scale_inv=s), c8),
            "gemv L2 us": replay_us(lambda i, x=x, w=w: gemv(x, w[0])),  # (the output head, 100 MB, does not fit)
        })
        del w, q

    if args.no_experts:
        report(rows, bw, dev, args.sweep)
        return
    # one token's 8 pairs; call i takes experts 8i..8i+7 (mod 64) of stack copy i // 8, so 8 calls sweep a whole
    # stack (226 MB for gate_up in bf16, down half that, E4M3 half again) and enough copies of the smaller stacks
    # are cycled that each call reads its experts from HBM
    E, topk, d, inter = 64, 8, 1536, 576
    idx = [torch.arange(i * topk, (i + 1) * topk, device=dev) % E for i in range(E // topk)]
    x = torch.randn(1, d, device=dev, dtype=torch.bfloat16)
    h = torch.randn(topk, 2 * inter, device=dev, dtype=torch.bfloat16)
    offs = []
    for ix in idx:
        o = torch.zeros(E, dtype=torch.int32, device=dev)
        o[ix] = 1
        offs.append(o.cumsum(0).to(torch.int32))
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm
    xs = x.expand(topk, d).contiguous()

    def stacks(n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
        t = torch.randn(E, n, k, device=dev, dtype=torch.bfloat16)
        nbytes = t.numel() * torch.finfo(dtype).bits // 8
        return [(t if i == 0 else torch.randn_like(t)).to(dtype) for i in range(n_copies(nbytes))]

    gate_up, down = stacks(2 * inter, d, torch.bfloat16), stacks(d, inter, torch.bfloat16)
    gate_up8, down8 = stacks(2 * inter, d, fp8), stacks(d, inter, fp8)
    s_gu = torch.rand(E, 2 * -(-inter // 128), d // 128, device=dev)
    s_dn = torch.rand(E, d // 128, -(-inter // 128), device=dev)
    a = F.silu(h[:, :inter]) * h[:, inter:]
    n_idx = len(idx)

    def cold(stack: list[torch.Tensor], fn):  # noqa: ANN001, ANN202 - call i: stack copy i // 8, pairs idx[i % 8]
        return (lambda i, *t: fn(stack[i // n_idx % len(stack)], i % n_idx, *t)), n_idx * len(stack)

    def timed(stack: list[torch.Tensor], fn) -> float:  # noqa: ANN001
        f, c = cold(stack, fn)
        return replay_us(f, c)

    def swept(stack: list[torch.Tensor], fn, nbytes: int) -> dict | None:  # noqa: ANN001
        if not args.sweep:
            return None
        f, c = cold(stack, fn)
        return sweep(f, c, nbytes, bw)

    add("experts gate_up, 8 pairs", topk * 2 * inter * d * 2,
        swept(gate_up, lambda w, i, t: gemv(x, w, idx[i], rows_per_x=topk, tiles=t), topk * 2 * inter * d * 2),
        **{"cuBLAS bf16 us": timed(gate_up, lambda w, i: grouped(xs, w.transpose(1, 2), offs=offs[i])),
           "gemv bf16 us": timed(gate_up, lambda w, i: gemv(x, w, idx[i], rows_per_x=topk)),
           "gemv e4m3 us": timed(gate_up8, lambda w, i: gemv(x, w, idx[i], s_gu, rows_per_x=topk, split=inter)),
           "gemv L2 us": replay_us(lambda i: gemv(x, gate_up[0], idx[0], rows_per_x=topk))})
    add("experts down (+SwiGLU), 8 pairs", topk * inter * d * 2,
        swept(down, lambda w, i, t: gemv(h, w, idx[i], swiglu=True, tiles=t), topk * inter * d * 2),
        **{"cuBLAS bf16 us": timed(down, lambda w, i: grouped(a, w.transpose(1, 2), offs=offs[i])),
           "gemv bf16 us": timed(down, lambda w, i: gemv(h, w, idx[i], swiglu=True)),
           "gemv e4m3 us": timed(down8, lambda w, i: gemv(h, w, idx[i], s_dn, swiglu=True)),
           "gemv L2 us": replay_us(lambda i: gemv(h, down[0], idx[0], swiglu=True))})
    report(rows, bw, dev, args.sweep)


def report(rows: list[dict], bw: float, dev: torch.device, swept: bool) -> None:
    """The table and the JSON line."""
    print(f"few-row GEMMs, {device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s; floor = bf16 weight bytes / "
          "bandwidth (E4M3: half); experts: cuBLAS column = grouped_mm (grouped path, SwiGLU not included)")
    print_table(rows, ["case", "MB", "floor us", "cuBLAS bf16 us", "gemv bf16 us", "gemv e4m3 us", "gemv L2 us"]
                + (["best us", "best tiles", "best bw"] if swept else []))
    emit_json({"bench": "gemv", "device": device_name(dev), "copy_bandwidth": bw, "torch": torch.__version__,
               "rows": rows})


if __name__ == "__main__":
    main()
