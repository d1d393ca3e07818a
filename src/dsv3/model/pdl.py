"""Programmatic dependent launch (PDL, Hopper+) for decode's Triton kernels.

At batch 1 every decode kernel is a few microseconds of latency: launching its programs, the first loads'
trip to HBM, the tail. CUDA runs a stream's kernels one after another, so each step pays all of them in
series. Launched with PDL, a kernel's programs start while the previous kernel still runs: each does what
does not depend on that kernel (address arithmetic, pulling its constant weights toward L2), then waits in
`griddepcontrol.wait` until the previous kernel has finished and its writes are visible, and only then
reads activations or writes anything. After its main loop it lets the next kernel start the same way
(`griddepcontrol.launch_dependents`; small one-wave kernels right after the wait), so at most one kernel runs
ahead and its waiting programs do not take the SM slots this one's later programs need.

The rule every kernel launched this way keeps: nothing before `wait` reads memory an earlier kernel of the
step may write, nor writes memory at all. Waiting means the previous kernel completed, which (it having
waited too) means every earlier one did. CUDA graphs keep the dependency as a programmatic edge.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no kernels to launch
    triton = None


F = TypeVar("F", bound=Callable[..., Any])

# What a kernel's `PDL` constexpr asks for: a plain launch, waiting only, or waiting with its constant weights
# prefetched toward L2 first. DSV3_PDL=0 / wait / 1 (the default) picks one for every launch (an A/B knob).
OFF, WAIT, PREFETCH = 0, 1, 2


@torch.compiler.assume_constant_result
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def mode(device: torch.device) -> int:
    """OFF, WAIT or PREFETCH for decode's kernels on `device`: PREFETCH on CUDA compute capability 9.0+ unless
    DSV3_PDL says otherwise; OFF in Triton's interpreter and while torch.compile traces (inductor launches the
    kernels it traces itself, without the launch attribute)."""
    setting = os.environ.get("DSV3_PDL", "1")
    if (triton is None or device.type != "cuda" or torch.compiler.is_compiling() or setting == "0"
            or os.environ.get("TRITON_INTERPRET", "0") == "1" or not _hopper(device)):
        return OFF
    return WAIT if setting == "wait" else PREFETCH


def launch(device: torch.device) -> dict[str, int | bool]:
    """Launch keywords for a kernel taking a `PDL` constexpr: {"PDL": mode, "launch_pdl": True} where `mode` is
    not OFF, else {"PDL": OFF} (the kernel then waits on nothing and launches as any other)."""
    m = mode(device)
    return {"PDL": m, "launch_pdl": True} if m != OFF else {"PDL": OFF}


def launched_here(name: str, fake: Callable[..., Any]) -> Callable[[F], F]:
    """Decorator for a function that launches decode kernels, with tensor / number / None arguments annotated
    as `torch.library.custom_op` takes them: while torch.compile traces, it is called as the custom op
    dsv3::name (its outputs' shapes from `fake`), otherwise directly. Inductor launches the Triton kernels it
    traces itself, without the PDL attribute; a custom op stays a call into this Python, which launches them
    with it when the compiled step runs (and is captured)."""

    def wrap(fn: F) -> F:
        op = torch.library.custom_op(f"dsv3::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return (op if torch.compiler.is_compiling() else fn)(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def waitless_kernels(sources: Iterable[str]) -> list[str]:
    """Names of the Triton kernels in inductor-generated modules `sources` that launch with PDL but never wait.
    torch 2.11's inductor (`triton.enable_pdl`) waits in a kernel only before or after its first load, so a
    kernel that only stores (a fill) has no wait: it may write while its predecessor still reads, and may finish
    before it, so that its successor's wait no longer means every earlier kernel is done, which the rule above
    needs. ModelRunner checks each compiled decode graph with this and compiles it again without inductor's PDL
    where any turns up."""
    bad = []
    for source in sources:
        for kernel in source.split("@triton_heuristics.")[1:]:  # each generated kernel's decorator on
            if "'launch_pdl': True" in kernel and "gdc_wait" not in kernel:
                name = re.search(r"def (\w+)\(", kernel)
                bad.append(name.group(1) if name else "?")
    return bad


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible (a no-op without PDL)."""
        if PDL != 0:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Let the next kernel's programs start once every program of this one has come here (or ended): after
        a kernel's main loop, so that they take SM slots only as this kernel's last programs finish, not while
        its later programs still wait for one (a no-op without PDL)."""
        if PDL != 0:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_prefetch_rows(rows, n, LINE: tl.constexpr, PDL: tl.constexpr, LINES: tl.constexpr = 16):
        """Ask L2 for the first `n` elements of each row at `rows` (a [rows, 1] tensor of pointers), one
        `prefetch.global.L2` a 128-byte line of LINE elements, LINES lines of a row at a time: for constant
        weights a program streams after `wait`, so that their trip from HBM overlaps the previous kernel.
        Nothing comes back, nothing waits; only in PREFETCH mode."""
        if PDL == 2:
            for k0 in range(0, n, LINES * LINE):
                ptrs = rows + tl.minimum(k0 + tl.arange(0, LINES) * LINE, n - 1)[None, :]
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0 unused", "=r,l", [ptrs], dtype=tl.int32,
                                          is_pure=False, pack=1)

else:  # the kernels' modules import these names either way
    pdl_wait = pdl_release = pdl_prefetch_rows = None
