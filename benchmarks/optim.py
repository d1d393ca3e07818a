"""One AdamW step over a model's parameters on the GPU: dsv3's one-launch-per-group kernel against torch's
fused and foreach AdamW, as a fraction of copy bandwidth.

    python -m benchmarks.optim --preset bench

The parameters have the preset's shapes (2.32B for `bench`, its MTP block included), random gradients, two
groups as in training (decay on matrices, none on norms). Bytes per element: read p, g, m, v and write p, m,
v: 7 x 2 B in pure bf16 (the peer's setting), 7 x 4 B in float32 (`dsv3 train`'s default on the GPU), and
3 x 4 + 4 x 2 B with float32 master weights and bf16 moments (the paper's, `train.bf16_moments`); torch has
no bf16-moment AdamW for float32 parameters, so that row has dsv3 alone. Every variant applies a clipping
factor (`grad_scale`, as training does; foreach takes none); torch's fused kernel then also writes the
unscaled gradients back, an eighth pass its "of copy BW" figure does not count. floor = bytes / the
measured device-to-device copy bandwidth. Each variant's step is timed interleaved with the others (median of 10).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import copy_bandwidth, device_name, emit_json, print_table, time_interleaved
from dsv3.config import preset
from dsv3.model.transformer import DeepSeekV3
from dsv3.train.optim import AdamW, param_groups

CASES = {  # (parameter dtype, moment dtype: None = the parameter's)
    (torch.bfloat16, None): "pure bf16",
    (torch.float32, None): "fp32",
    (torch.float32, torch.bfloat16): "fp32 master, bf16 moments",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    with torch.device("meta"):
        shapes = [(p.shape, p.dim()) for p in DeepSeekV3(preset(args.preset)).parameters()]
    n = sum(s.numel() for s, _ in shapes)
    rows = []
    for (p_dtype, m_dtype), label in CASES.items():
        gen = torch.Generator(dev).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=p_dtype, generator=gen) * 0.02)
                  for s, _ in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=dev, dtype=p_dtype, generator=gen) * 1e-3
        model = torch.nn.ParameterList(params)
        scale = torch.tensor(2.0, device=dev)
        opts = {"dsv3": AdamW(param_groups(model), lr=1e-4, moment_dtype=m_dtype)}
        if m_dtype is None:
            for impl in ("fused", "foreach"):
                opts[f"torch {impl}"] = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95),
                                                          **{impl: True})
        for name, o in opts.items():  # the clipping factor, as clip_grad_norm hands it over (foreach takes none)
            o.grad_scale = None if name == "torch foreach" else scale
        # every variant updates the same tensors: the values drift, the bytes moved do not
        times = time_interleaved({name: o.step for name, o in opts.items()}, dev, warmup=2, iters=args.iters)
        m_bytes = (m_dtype or p_dtype).itemsize
        nbytes = n * (3 * p_dtype.itemsize + 4 * m_bytes)  # read p, g, m, v; write p, m, v
        for name, t in times.items():
            rows.append({"params": label, "impl": name, "GB": f"{nbytes / 1e9:.1f}", "ms": f"{t * 1e3:.2f}",
                         "floor ms": f"{nbytes / bw * 1e3:.2f}", "of copy BW": f"{nbytes / t / bw:.0%}"})
        del opts, model, params
        torch.cuda.empty_cache()
    print(f"AdamW step, {args.preset}: {n / 1e9:.2f}B parameters in {len(shapes)} tensors, {device_name(dev)}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(rows, ["params", "impl", "GB", "ms", "floor ms", "of copy BW"])
    emit_json({"bench": "optim", "preset": args.preset, "device": device_name(dev), "copy_bandwidth": bw,
               "parameters": n, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
