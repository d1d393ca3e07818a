"""dsv3.model.pdl's switches: when decode's kernels launch with programmatic dependent launch, and `launched_here`
keeping a launching function a call into Python (a custom op) under torch.compile. Whether PDL launches decode
the same tokens as plain ones: tests/infer/test_model_runner.py (GPU)."""

from __future__ import annotations

import torch

from dsv3.model import pdl


def test_mode_is_off_off_hopper_and_when_switched_off(monkeypatch) -> None:
    assert pdl.mode(torch.device("cpu")) == pdl.OFF
    assert pdl.launch(torch.device("cpu")) == {"PDL": pdl.OFF}  # no launch_pdl for a plain launch
    monkeypatch.setenv("DSV3_PDL", "0")
    assert pdl.mode(torch.device("cuda")) == pdl.OFF  # decided before any CUDA query
    monkeypatch.setenv("DSV3_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.mode(torch.device("cuda")) == pdl.OFF


def test_mode_waits_or_prefetches_as_dsv3_pdl_says(monkeypatch) -> None:
    """On a Hopper GPU with Triton, outside the interpreter: PREFETCH (wait, with constant weights pulled toward
    L2 first) by default and for DSV3_PDL=1, WAIT for DSV3_PDL=wait, OFF for 0; below compute capability 9.0,
    OFF whatever it says. The kernels' PDL constexpr: nonzero waits, 2 prefetches."""
    monkeypatch.setattr(pdl, "triton", pdl.triton or object())  # CPU-only installs: as if Triton were there
    monkeypatch.setattr(pdl, "_hopper", lambda device: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DSV3_PDL", raising=False)
    cuda = torch.device("cuda")
    assert (pdl.OFF, pdl.WAIT, pdl.PREFETCH) == (0, 1, 2)
    assert pdl.mode(cuda) == pdl.PREFETCH
    assert pdl.launch(cuda) == {"PDL": pdl.PREFETCH, "launch_pdl": True}
    for setting, want in [("1", pdl.PREFETCH), ("wait", pdl.WAIT), ("0", pdl.OFF)]:
        monkeypatch.setenv("DSV3_PDL", setting)
        assert pdl.mode(cuda) == want, setting
    monkeypatch.setenv("DSV3_PDL", "wait")
    assert pdl.launch(cuda) == {"PDL": pdl.WAIT, "launch_pdl": True}
    monkeypatch.setattr(pdl, "_hopper", lambda device: False)
    assert pdl.mode(cuda) == pdl.OFF
    monkeypatch.setattr(pdl, "_hopper", lambda device: True)
    monkeypatch.setattr(pdl, "triton", None)  # no Triton, no kernels to launch
    assert pdl.mode(cuda) == pdl.OFF


calls: list[bool] = []


def _scaled_shape(x: torch.Tensor, factor: float, rows: int | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0] if rows is None else rows, x.shape[1])


@pdl.launched_here("test_scaled", _scaled_shape)
def _scaled(x: torch.Tensor, factor: float, rows: int | None = None) -> torch.Tensor:
    calls.append(torch.compiler.is_compiling())
    return (x * factor)[: x.shape[0] if rows is None else rows].clone()


def test_launched_here_runs_its_body_only_outside_tracing() -> None:
    calls.clear()
    x = torch.arange(12.0).view(4, 3)
    assert torch.equal(_scaled(x, 2.0, rows=3), x[:3] * 2)  # eager: the function itself
    assert calls == [False]

    @torch.compile(backend="inductor", fullgraph=True)
    def f(x: torch.Tensor) -> torch.Tensor:
        return _scaled(x + 1, 0.5) - 1  # the op's output shape comes from the fake while tracing

    assert torch.equal(f(x), (x + 1) * 0.5 - 1)
    assert calls and not any(calls)  # the body ran at run time only, never under dynamo
    assert _scaled.__name__ == "_scaled"  # functools.wraps: the function, not the wrapper
    assert torch.ops.dsv3.test_scaled.default is not None


def _kernel(name: str, pdl_on: bool, waits: bool, releases: bool | None = None) -> str:
    """One kernel as inductor's generated module embeds it (decorator with triton_meta, then the body); waits:
    with gdc_wait, releases (default: as waits): with gdc_launch_dependents."""
    wait = ("    tl.extra.cuda.gdc_wait()\n" if waits else "") + (
        "    tl.extra.cuda.gdc_launch_dependents()\n" if (waits if releases is None else releases) else "")
    return (f"async_compile.triton('{name}', '''\n@triton_heuristics.pointwise(\n    size_hints={{'x': 64}}, "
            f"filename=__file__,\n    triton_meta={{'signature': {{'out_ptr0': '*fp32', 'xnumel': 'i32'}}, "
            f"'constants': {{}}, 'launch_pdl': {pdl_on}, 'disable_ftz': False}},\n)\n@triton.jit\n"
            f"def {name}(out_ptr0, xnumel, XBLOCK : tl.constexpr):\n    x0 = tl.arange(0, XBLOCK)\n{wait}"
            f"    tl.store(out_ptr0 + x0, 1.0, x0 < xnumel)\n''', device_str='cuda')\n")


def test_waitless_kernels_finds_pdl_launches_without_a_wait() -> None:
    module = (_kernel("triton_poi_fused_add_0", True, True) + _kernel("triton_poi_fused_ones_1", True, False)
              + _kernel("triton_poi_fused_zeros_2", False, False) + "\ndef call(args):\n    pass\n")
    assert pdl.waitless_kernels([module]) == ["triton_poi_fused_ones_1"]
    assert pdl.waitless_kernels([_kernel("triton_poi_fused_add_0", True, True), "no kernels here"]) == []


def test_waitless_kernels_goes_by_the_wait_not_the_release() -> None:
    # a kernel that lets its successor start (gdc_launch_dependents) but never waits itself is waitless; one
    # that waits but never releases keeps the rule (its successor merely starts later)
    module = (_kernel("triton_poi_fused_fill_0", True, waits=False, releases=True)
              + _kernel("triton_poi_fused_add_1", True, waits=True, releases=False))
    assert pdl.waitless_kernels([module]) == ["triton_poi_fused_fill_0"]
