"""What a dependent kernel boundary costs on the GPU, with no work in it: the floor under decode's chain.

    python -m benchmarks.launch_floor [--stages 256] [--programs 1 132 264]

Batch-1 decode is a chain of ~13 dependent kernels a layer, each moving a few MB. Whatever a kernel does, the
next one cannot read its output before it has finished, so each link costs at least the time from one kernel's
last store to the next one's first load of it. This times that link alone: `--stages` stages, each of G
programs loading one value another program of the previous stage wrote, adding one and storing it, as

- `graph`: one kernel a stage, captured in a CUDA graph (what decode replays), plain launches;
- `graph + PDL`: the same launched with programmatic dependent launch (`dsv3.model.pdl`): each kernel's
  programs start early and wait in `griddepcontrol.wait`, and let the next start after their load;
- `persistent`: one kernel of G programs for all stages, the stages separated by a grid-wide barrier (an
  atomic counter, release / acquire at GPU scope; G at most what fits on the GPU at once): what a persistent
  decode kernel would pay per dependency instead of a launch.

us per stage = replay time / stages. The last stage's values are checked (= stages) for every design. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.common import device_name, emit_json, graph_us, print_table
from dsv3.model import pdl
from dsv3.model.pdl import pdl_release, pdl_wait


@triton.jit
def _stage(src, dst, G, PDL: tl.constexpr):
    p = tl.program_id(0)
    pdl_wait(PDL)
    v = tl.load(src + (p + 1) % G)
    pdl_release(PDL)
    tl.store(dst + p, v + 1)


@triton.jit
def _persistent(buf, counter, G, STAGES: tl.constexpr):
    p = tl.program_id(0)
    for s in range(STAGES):
        src = buf + (s % 2) * G
        dst = buf + ((s + 1) % 2) * G
        v = tl.load(src + (p + 1) % G, cache_modifier=".cg")  # written by another SM: not from this SM's L1
        tl.store(dst + p, v + 1)
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        target = G * (s + 1)
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=256)
    ap.add_argument("--programs", type=int, nargs="+", default=[1, 132, 264])
    args = ap.parse_args()
    dev = torch.device("cuda")
    n = args.stages
    resident = torch.cuda.get_device_properties(dev).multi_processor_count * 8  # 4-warp programs, 8 an SM
    if max(args.programs) > resident:
        # the persistent kernel's barrier waits for every program: more than fit at once would never finish
        raise SystemExit(f"--programs: at most {resident} on this GPU (all must be resident at once)")
    rows = []
    for G in args.programs:
        buf = torch.zeros(2, G, dtype=torch.int32, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)

        def chain(use_pdl: bool, buf: torch.Tensor = buf, G: int = G) -> None:
            buf.zero_()
            launch = pdl.launch(dev) if use_pdl else {"PDL": pdl.OFF}
            for s in range(n):
                _stage[(G,)](buf[s % 2], buf[(s + 1) % 2], G, **launch)

        def persistent(buf: torch.Tensor = buf, counter: torch.Tensor = counter, G: int = G) -> None:
            buf.zero_()
            counter.zero_()
            _persistent[(G,)](buf, counter, G, STAGES=n)

        row = {"programs": G}
        for name, fn in (("graph", lambda: chain(False)), ("graph + PDL", lambda: chain(True)),
                         ("persistent", persistent)):
            us, _ = graph_us(fn)
            ok = bool((buf[n % 2] == n).all())
            row[f"{name} us"] = f"{us / n:.2f}" + ("" if ok else " WRONG")
        rows.append(row)
        print(row, flush=True)
    print(f"dependent stages of no work, {n} a replay, {device_name(dev)}: us per stage")
    print_table(rows, list(rows[0]))
    emit_json({"bench": "launch-floor", "device": device_name(dev), "torch": torch.__version__, "stages": n,
               "rows": rows})


if __name__ == "__main__":
    main()
