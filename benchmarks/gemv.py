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
the launch and latency left once the bytes are near. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, device_name, emit_json, n_copies, print_table, replay_us
from dsv3.model.gemv import gemv

LINEARS = [(768, 1536), (3072, 768), (576, 1536), (1536, 2048), (1152, 1536), (1536, 576), (8192, 1536),
           (1536, 8192), (32768, 1536)]
SWEEP = [(n, k, w) for n in (4, 8, 16) for k in (128, 256, 512, 1024) for w in (4, 8)]


def sweep(fn, copies: int, nbytes: int, bw: float) -> dict:  # noqa: ANN001
    """Every (BLOCK_N, BLOCK_K, warps) of SWEEP for fn(i, tiles): the default's time, the best and its tiles."""
    times = {t: replay_us(lambda i, t=t: fn(i, t), copies) for t in SWEEP}
    print("  sweep (BLOCK_N x BLOCK_K x warps: us):", ", ".join(f"{'x'.join(map(str, t))}: {v:.1f}"
                                                             for t, v in times.items()), flush=True)
    best = min(times, key=times.get)
    return {"best us": times[best], "best tiles": "x".join(map(str, best)),
            "best bw": f"{nbytes / (times[best] * 1e-6) / bw:.0%}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time every program shape of SWEEP (bf16), keep the best")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    fp8 = torch.float8_e4m3fn
    rows = []

    def add(name: str, nbytes: int, best: dict | None = None, **times: float) -> None:
        row = {"case": name, "MB": f"{nbytes / 1e6:.1f}", "floor us": f"{nbytes / bw * 1e6:.1f}"}
        row.update({k: f"{v:.1f}" for k, v in times.items()})
        if best:
            row.update({k: f"{v:.1f}" if isinstance(v, float) else v for k, v in best.items()})
        rows.append(row)

    for n, k in LINEARS:
        c = n_copies(n * k * 2)
        w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(c)]
        q = [x.to(fp8) for x in w]
        s = torch.rand(-(-n // 128), -(-k // 128), device=dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        best = sweep(lambda i, t, x=x, w=w: gemv(x, w[i], tiles=t), c, n * k * 2, bw) if args.sweep else None
        add(f"linear {n}x{k}", n * k * 2, best, **{
            "cuBLAS bf16 us": replay_us(lambda i, x=x, w=w: F.linear(x, w[i]), c),
            "gemv bf16 us": replay_us(lambda i, x=x, w=w: gemv(x, w[i]), c),
            "gemv e4m3 us": replay_us(lambda i, x=x, q=q, s=s: gemv(x, q[i], scale_inv=s), c),
            "gemv L2 us": replay_us(lambda i, x=x, w=w: gemv(x, w[0])),  # (the output head, 100 MB, does not fit)
        })
        del w, q

    # one token's 8 pairs; call i takes experts 8i..8i+7 (mod 64), so 8 calls sweep all 226 MB of a stack
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
    gate_up = torch.randn(E, 2 * inter, d, device=dev, dtype=torch.bfloat16)
    down = torch.randn(E, d, inter, device=dev, dtype=torch.bfloat16)
    gate_up8, down8 = gate_up.to(fp8), down.to(fp8)
    s_gu = torch.rand(E, 2 * -(-inter // 128), d // 128, device=dev)
    s_dn = torch.rand(E, d // 128, -(-inter // 128), device=dev)
    a = F.silu(h[:, :inter]) * h[:, inter:]
    c = len(idx)
    sw = (lambda f, n: sweep(f, c, n, bw)) if args.sweep else (lambda f, n: None)
    add("experts gate_up, 8 pairs", topk * 2 * inter * d * 2,
        sw(lambda i, t: gemv(x, gate_up, idx[i], rows_per_x=topk, tiles=t), topk * 2 * inter * d * 2),
        **{"cuBLAS bf16 us": replay_us(lambda i: grouped(xs, gate_up.transpose(1, 2), offs=offs[i]), c),
           "gemv bf16 us": replay_us(lambda i: gemv(x, gate_up, idx[i], rows_per_x=topk), c),
           "gemv e4m3 us": replay_us(lambda i: gemv(x, gate_up8, idx[i], s_gu, rows_per_x=topk, split=inter), c),
           "gemv L2 us": replay_us(lambda i: gemv(x, gate_up, idx[0], rows_per_x=topk))})
    add("experts down (+SwiGLU), 8 pairs", topk * inter * d * 2,
        sw(lambda i, t: gemv(h, down, idx[i], swiglu=True, tiles=t), topk * inter * d * 2),
        **{"cuBLAS bf16 us": replay_us(lambda i: grouped(a, down.transpose(1, 2), offs=offs[i]), c),
           "gemv bf16 us": replay_us(lambda i: gemv(h, down, idx[i], swiglu=True), c),
           "gemv e4m3 us": replay_us(lambda i: gemv(h, down8, idx[i], s_dn, swiglu=True), c),
           "gemv L2 us": replay_us(lambda i: gemv(h, down, idx[0], swiglu=True))})

    print(f"few-row GEMMs, {device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s; floor = bf16 weight bytes / "
          "bandwidth (E4M3: half); experts: cuBLAS column = grouped_mm (grouped path, SwiGLU not included)")
    print_table(rows, ["case", "MB", "floor us", "cuBLAS bf16 us", "gemv bf16 us", "gemv e4m3 us", "gemv L2 us"]
                + (["best us", "best tiles", "best bw"] if args.sweep else []))
    emit_json({"bench": "gemv", "device": device_name(dev), "copy_bandwidth": bw, "torch": torch.__version__,
               "rows": rows})


if __name__ == "__main__":
    main()
