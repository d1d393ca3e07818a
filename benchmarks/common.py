"""Shared benchmark plumbing: timing with warm-up and medians, the device's peak, JSON output."""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense peaks used for MFU (shared/HARDWARE.md): count against the datasheet bf16 / fp8 figures.
PEAK_FLOPS = {"cuda-bf16": 989e12, "cuda-fp8": 1979e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, iters: int = 5
) -> dict[str, float]:
    """Median wall time of each fn, the calls taken round-robin so that load from other processes (a shared
    CPU, a noisy GPU neighbour) falls on every implementation alike and their ratio stays meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:  # each goes first in turn
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy. On CUDA: the median over 10 rounds of
    8 back-to-back 1 GiB copies between events (no launch or host-sync latency in the time); elsewhere the
    median wall time of 20 copies."""
    n = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type != "cuda":
        return 2 * n / time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(8):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 8)
    return 2 * n / statistics.median(times)


def cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Measured matmul rate of this CPU in `dtype` (there is no datasheet peak to count against)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)  # the best of 10: a peak, so load from other processes must not lower it


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def emit_json(obj: dict) -> None:
    """The benchmark's last stdout line: one JSON object (BENCHMARKS.md rows are regenerated from it)."""
    print(json.dumps(obj, sort_keys=True))


def _profiled(fn: Callable[[], object], device: torch.device, n: int) -> torch.profiler.profile:
    """The finished CUDA-kernel profile of `n` calls of fn, the device synchronised inside it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync(device)
    return prof


def profile_kernels(fn: Callable[[], object], device: torch.device, label: str, n: int = 3, rows: int = 30) -> None:
    """Print the device kernels of `n` calls of fn (already warm): count and kernel time per call, then the
    top `rows` by self device time. Profiler failures are printed, never raised (measurements come first)."""
    if device.type != "cuda":
        return
    try:
        prof = _profiled(fn, device, n)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(e.count for e in events) / n
        total = sum(e.self_device_time_total for e in events) / n
        print(f"\nprofile of {label}: {kernels:.0f} kernels per call, {total / 1e3:.3f} ms of kernel time per call",
              flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90),
              flush=True)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the measurements
        print(f"profile failed: {type(e).__name__}: {e}", flush=True)


def kernel_timeline(fn: Callable[[], object], device: torch.device, path: str, n: int = 3) -> None:
    """Write the device kernels of the last of `n` calls of fn (already warm) to `path` in launch order: start
    (us from the first), the gap since the previous kernel ended, duration and name, under a line with the
    count, busy time and span. Where a step's time goes kernel by kernel (per layer, between kernels)."""
    if device.type != "cuda":
        return
    try:
        prof = _profiled(fn, device, n)
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(f"{d}/trace.json")
            events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
        kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
        last = kernels[-(len(kernels) // n):]
        t0 = end = last[0]["ts"]
        lines = []
        for k in last:
            lines.append(f"{k['ts'] - t0:9.1f} gap {k['ts'] - end:5.1f} dur {k['dur']:6.1f}  {k['name'][:150]}")
            end = k["ts"] + k["dur"]
        head = f"{len(last)} kernels, busy {sum(k['dur'] for k in last):.1f} us, span {end - t0:.1f} us"
        Path(path).write_text(head + "\n" + "\n".join(lines) + "\n")
        print(f"kernel timeline of one call: {head} -> {path}", flush=True)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the measurements
        print(f"timeline failed: {type(e).__name__}: {e}", flush=True)


COLD_BYTES = 256e6  # each timed call reads weights the previous ~256 MB of calls did not (L2: 60 MB)


def replay_us(fn, copies: int = 1, n: int = 50) -> float:  # noqa: ANN001
    """Mean GPU time of one call in microseconds, from a CUDA graph of n calls replayed twice (`graph_us`). Call
    i runs fn(i % copies) on its own copy of the weights, so with enough copies every call streams them from HBM
    (as decode does: each weight once per step) instead of from the L2 cache."""
    us, _ = graph_us(lambda: [fn(i % copies) for i in range(n)], reps=2)
    return us / n


def graph_us(fn: Callable[[], Any], reps: int = 20) -> tuple[float, Any]:
    """(mean GPU time of one replay in microseconds, fn's output) for fn() captured once in a CUDA graph (after one
    eager call) and replayed `reps` times; the output tensors hold the last replay's values."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps, out


def n_copies(nbytes: float) -> int:
    """Copies of an operand of `nbytes` to cycle through so that each call reads it from HBM (50 at most)."""
    return max(1, min(50, math.ceil(COLD_BYTES / nbytes)))
