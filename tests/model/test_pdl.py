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


def _kernel(name: str, pdl_on: bool, waits: bool) -> str:
    """One kernel as inductor's generated module embeds it (decorator with triton_meta, then the body)."""
    wait = "    tl.extra.cuda.gdc_wait()\n    tl.extra.cuda.gdc_launch_dependents()\n" if waits else ""
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
