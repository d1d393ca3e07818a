"""The routed experts' gated SwiGLU on the GPU: forward + backward of `dsv3.model.swiglu` (inductor's forward,
the Triton backward) against torch.compile of the same math differentiated by autograd, and the bytes floor.

    python -m benchmarks.swiglu [--pairs 262144] [--inter 576]

Default shape: one `bench` MoE layer of a 16 x 2048 training batch (32,768 tokens x 8 experts, I = 576), bf16
activations with float32 gates. floor = bytes that must move (forward: read h [N, 2I], write [N, I]; backward:
read h and dout, write dh) over the measured copy bandwidth. Also sweeps the backward kernel's tile (rows x
columns, warps). Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import copy_bandwidth, device_name, emit_json, print_table, time_interleaved
from dsv3.model.swiglu import _forward, swiglu, swiglu_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32768 * 8)
    ap.add_argument("--inter", type=int, default=576)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    N, I = args.pairs, args.inter
    h = torch.randn(N, 2 * I, device=dev, dtype=torch.bfloat16, requires_grad=True)
    s = torch.rand(N, 1, device=dev, requires_grad=True)
    dout = torch.randn(N, I, device=dev, dtype=torch.bfloat16)
    reference, ours = torch.compile(_forward), torch.compile(swiglu)

    def fwd_bwd(f):  # noqa: ANN001, ANN202
        return lambda: torch.autograd.grad(f(h, s), (h, s), dout)

    # the two agree before they are timed
    g_ref = torch.autograd.grad(reference(h, s), (h, s), dout)
    g_ours = torch.autograd.grad(ours(h, s), (h, s), dout)
    diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g_ours, g_ref, strict=True))
    t = time_interleaved({"compiled autograd": fwd_bwd(reference), "dsv3": fwd_bwd(ours)}, dev, iters=args.iters)
    floor = (3 * I + 5 * I) * 2 * N / bw  # forward 2I in + I out; backward 2I + I in, 2I out (bf16)
    rows = [{"impl": k, "fwd+bwd us": round(v * 1e6, 1), "floor us": round(floor * 1e6, 1),
             "% of bw": round(100 * floor / v, 1)} for k, v in t.items()]
    print(f"\ngated SwiGLU forward + backward, {N} pairs x I={I}, bf16, {device_name(dev)}, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; gradients of the two differ by {diff:.1e} (relative)")
    print_table(rows, ["impl", "fwd+bwd us", "floor us", "% of bw"])

    sweep = []
    bwd_floor = 5 * I * 2 * N / bw
    configs = [(r, c, w) for r in (8, 16, 32, 64) for c in (64, 128) for w in (4, 8) if r * c <= 8192]
    fns = {cfg: (lambda cfg=cfg: swiglu_backward(h.detach(), s.detach(), dout, *cfg)) for cfg in configs}
    for cfg, v in time_interleaved(fns, dev, iters=args.iters).items():
        sweep.append({"rows": cfg[0], "cols": cfg[1], "warps": cfg[2], "bwd us": round(v * 1e6, 1),
                      "% of bw": round(100 * bwd_floor / v, 1)})
    sweep.sort(key=lambda r: r["bwd us"])
    print(f"\nbackward kernel tiles (floor {bwd_floor * 1e6:.1f} us)")
    print_table(sweep, ["rows", "cols", "warps", "bwd us", "% of bw"])
    emit_json({"bench": "swiglu", "device": device_name(dev), "pairs": N, "inter": I, "copy_bandwidth": bw,
               "rows": rows, "grad_rel_diff": diff, "sweep": sweep, "torch": torch.__version__})


if __name__ == "__main__":
    main()
