"""The static, graph-ready decode path (dsv3/infer/model_runner.py) on the CPU twin of the CUDA-graph path:
bucket grids, padding rows that never touch real rows, the persistent block tables under random workloads,
greedy output equal to full recompute, and no host synchronisation inside a decode step. The `gpu` tests at
the end run the captured CUDA graphs against the eager twin, token for token, and under CUDA's sync
debugging."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.infer import Engine, SamplingParams
from dsv3.infer.block_manager import NULL_BLOCK, BlockManager
from dsv3.infer.model_runner import ModelRunner, bucket
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.infer.sequence import Sequence
from tests.conftest import random_model, tiny_config
from tests.infer.test_engine import _prompts, greedy_reference

aten = torch.ops.aten
# ops that make the host wait for the device on CUDA (a data-dependent size, or a value read back)
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten._unique2, aten.unique_dim,
             aten.unique_consecutive, aten.bincount, aten.masked_select, aten.argwhere}
_SYNC_METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu"}


class NoHostSync(TorchDispatchMode):
    """Fails on any operation that would synchronise the host with a CUDA device (checked on the CPU, where
    it cannot be observed directly). strict (a captured graph's body): also no tensors from Python data, which
    a graph would bake in as constants, and no numpy views."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.methods = _Methods(strict)

    def __enter__(self):
        self.methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bad = packet in _SYNC_OPS
        bad |= func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if packet in (aten.index, aten.index_put, aten.index_put_):  # boolean masks index through nonzero
            bad |= any(i is not None and i.dtype == torch.bool for i in args[1])
        bad |= self.strict and packet is aten.lift_fresh
        if bad:
            raise AssertionError(f"host sync (or a host constant) inside the decode step: {func}")
        return func(*args, **kwargs)


class _Methods(TorchFunctionMode):
    def __init__(self, strict: bool):
        super().__init__()
        self.names = _SYNC_METHODS | ({"numpy"} if strict else set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.names:
            raise AssertionError(f"host sync inside the decode step: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def _check_tables(runner: ModelRunner, seqs: list[Sequence] | None = None) -> None:
    """The persistent host tables hold what `_rows` says, then only null blocks; row b is seqs[b]'s table."""
    for b, row in enumerate(runner._rows):
        assert runner._tables[b, : len(row)].tolist() == row
        assert (runner._tables[b, len(row) :] == NULL_BLOCK).all()
    for b, s in enumerate(seqs or []):
        assert runner._rows[b] == runner.blocks.table(s.seq_id)


def test_bucket_grid() -> None:
    for steps in (4, 8):
        sizes, prev = set(), 0
        for n in range(1, 5000):
            b = bucket(n, steps)
            assert n <= b < n + n / steps and b >= prev  # at most 1/steps padding, monotone
            if n <= 2 * steps:
                assert b == n
            sizes.add(b)
            prev = b
        assert len([s for s in sizes if 1024 < s <= 2048]) == steps  # `steps` sizes per octave
    assert bucket(289, 8, cap=290) == 290 and bucket(300, 8, cap=290) == 300  # never below n
    assert [bucket(n, 4) for n in (1, 8, 9, 64, 65)] == [1, 8, 10, 64, 80]
    assert [bucket(n, 8) for n in (16, 17, 65, 257)] == [16, 18, 72, 288]


def test_padding_rows_never_affect_real_rows(make_cfg, make_model) -> None:
    """9 rows run as a bucket of 10: real rows match the uncached forward, the padding row writes only into
    the null block, and garbage tokens in the padding row change no bit of the real rows' outputs."""
    cfg = make_cfg(num_nextn_predict_layers=0)
    model = make_model(cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    lengths = [1, 6, 13, 4, 9, 2, 7, 3, 11]
    full = [torch.randint(0, cfg.vocab_size, (n + 4,), generator=g).tolist() for n in lengths]
    bs = 4
    blocks = BlockManager(num_blocks=80, block_size=bs)
    cache = PagedLatentCache(cfg, 80, bs, cfg.num_hidden_layers, dtype=torch.float64)
    cache.pool.normal_(0, 100.0, generator=g)
    runner = ModelRunner(model, cache, blocks, max_batch=16)
    seqs = [Sequence(i, full[i][:n], SamplingParams(), None) for i, n in enumerate(lengths)]
    for upto in range(1, max(lengths) + 2):  # scattered block tables
        for s, n in zip(seqs, lengths, strict=True):
            blocks.reserve(s.seq_id, min(upto, n + 1))
    with torch.inference_mode():
        ref = [model(torch.tensor([f])).logits[0] for f in full]
        runner.prefill(seqs)
        for s in seqs:
            s.num_cached = len(s.tokens)
            s.tokens.append(full[s.seq_id][s.num_cached])
        before = cache.pool.clone()
        step = runner.prepare_decode(seqs)
        assert (step.B, step.Bp) == (9, 10)
        _, logits, greedy = runner.decode()
        for b, s in enumerate(seqs):
            torch.testing.assert_close(logits[b, 0], ref[b][s.num_cached], rtol=0, atol=1e-6)
        assert torch.equal(greedy[:, 0], logits[:, 0].argmax(-1))
        changed = (cache.pool != before).any(-1).any(0).nonzero().flatten().tolist()
        null = set(range(NULL_BLOCK * bs, NULL_BLOCK * bs + bs))
        allowed = null | {blocks.slot(s.seq_id, s.num_cached) for s in seqs}
        assert set(changed) <= allowed and len(set(changed) - null) == len(seqs)
        first = logits.clone()
        step.tokens[9:] = torch.randint(0, cfg.vocab_size, (1, 1), generator=g)  # garbage in the padding row
        _, again, _ = runner.decode()  # same step again: the same slots are rewritten with the same latents
        assert torch.equal(again, first)
    _check_tables(runner, seqs)


def test_static_decode_equals_full_recompute(make_cfg, make_model) -> None:
    """Greedy through the engine (batched, ragged, finishing at different steps so the batch shrinks through
    buckets, tables growing through width buckets), with and without MTP: equal to full recompute."""
    model = make_model(make_cfg(), dtype=torch.float64)
    prompts = _prompts(model.cfg.vocab_size, (2, 9, 5, 1, 14, 3, 7, 11, 4, 6))
    max_tokens = [6 + 2 * i for i in range(len(prompts))]
    ref = [greedy_reference(model, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
    for mtp in (0, 2):
        engine = Engine(model, None, mtp=mtp, block_size=4)
        engine.runner.min_blocks = 1  # no floor under the table width: let it grow through its buckets
        assert [r.token_ids for r in engine.generate(prompts, params)] == ref, mtp
        shapes = set(engine.runner._graphs)
        assert len({bp for bp, _ in shapes}) >= 3 and len({wp for _, wp in shapes}) >= 3, shapes
        assert all(g.graph is None for g in engine.runner._graphs.values())  # the CPU twin runs eagerly


def test_tables_under_random_workload(make_cfg, make_model) -> None:
    """Requests arriving, finishing, preempted and rolled back (MTP drafts rejected) in a pool too small for
    all of them: after every step the persistent tables equal the block manager's, padding rows are null, and
    the tokens equal full recompute."""
    model = make_model(make_cfg(), dtype=torch.float64)
    rng = random.Random(0)
    prompts = _prompts(model.cfg.vocab_size, tuple(rng.randint(1, 12) for _ in range(12)), seed=5)
    max_tokens = [rng.randint(1, 14) for _ in prompts]
    engine = Engine(model, None, mtp=2, block_size=4, cache_tokens=120)
    ids = []
    pending = list(zip(prompts, max_tokens, strict=True))
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                p, n = pending.pop(0)
                ids.append(engine.add_request(p, SamplingParams(max_tokens=n, temperature=0)))
        seqs = engine.step()
        if seqs and engine.runner.step is not None:
            _check_tables(engine.runner)
    assert engine.scheduler.num_preempted > 0
    for sid, p, n in zip(ids, prompts, max_tokens, strict=True):
        assert engine.result(sid).token_ids == greedy_reference(model, p, n)
    engine.blocks.check()


@pytest.mark.parametrize("mtp", [0, 2])
@pytest.mark.parametrize("greedy", [True, False])
def test_decode_step_has_no_host_sync(make_cfg, make_model, mtp, greedy) -> None:
    """Every decode step from staging to the sampled tokens (the graph body strictly: no Python data baked
    in), and the launch of the next one before it is read (overlap), runs without an operation that would wait
    for a CUDA device; the engine's one sync comes after."""
    model = make_model(make_cfg(), dtype=torch.float32)
    engine = Engine(model, None, mtp=mtp, block_size=4)
    runner = engine.runner
    launch, launch_next, forward = engine._launch_decode, engine._launch_next, runner._forward
    calls = []

    def checked_launch(seqs, *args):
        with NoHostSync():
            calls.append(len(seqs))
            return launch(seqs, *args)

    def checked_launch_next(cur):
        with NoHostSync():
            return launch_next(cur)

    def checked_forward(Bp, Wp):
        with NoHostSync(strict=True):
            return forward(Bp, Wp)

    engine._launch_decode, engine._launch_next, runner._forward = checked_launch, checked_launch_next, checked_forward
    params = SamplingParams(max_tokens=8, temperature=0) if greedy else \
        SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=1)
    prompts = _prompts(model.cfg.vocab_size, (3, 8, 5))
    results = engine.generate(prompts, [dataclasses.replace(params, max_tokens=n) for n in (8, 5, 8)])
    assert calls and [len(r.token_ids) for r in results] == [8, 5, 8]  # a row leaves: the next step's gather


def test_failed_capture_falls_back_to_eager(make_cfg, make_model) -> None:
    """A capture that raises (here: no CUDA at all) warns once and leaves decoding eager and correct."""
    model = make_model(make_cfg(num_nextn_predict_layers=0), dtype=torch.float64)
    prompts = _prompts(model.cfg.vocab_size, (3, 7))
    engine = Engine(model, None, block_size=4)
    engine.runner.cuda_graphs = True  # pretend: the capture will fail on this CPU-only machine
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        results = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [r.token_ids for r in results] == [greedy_reference(model, p, 6) for p in prompts]
    assert engine.runner.capture_error and not engine.runner.cuda_graphs


def test_new_shapes_under_overlap_keep_the_fed_tokens(make_cfg, make_model, monkeypatch) -> None:
    """A CUDA capture's warm-up runs write the outputs, which the token fed to a step launched ahead (overlap)
    may view. Here the CPU twin runs the forward once on zeroed inputs for each new shape, as the warm-up does,
    while ragged rows take the batch through new shapes mid-run: the tokens stay those of full recompute."""
    model = make_model(make_cfg(num_nextn_predict_layers=0), dtype=torch.float64)
    engine = Engine(model, None, block_size=4)
    runner, graph = engine.runner, engine.runner.graph
    runner.min_blocks = 1  # no floor under the table width: new widths mid-run

    def graph_with_warm_up(Bp: int, Wp: int):
        new = (Bp, Wp) not in runner._graphs
        g = graph(Bp, Wp)
        if new:
            runner._inputs.zero_()
            g.fn()
        return g

    monkeypatch.setattr(runner, "graph", graph_with_warm_up)
    prompts = _prompts(model.cfg.vocab_size, (2, 9, 5, 1, 14))
    max_tokens = [6 + 3 * i for i in range(len(prompts))]
    results = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens])
    assert [r.token_ids for r in results] == [greedy_reference(model, p, n)
                                              for p, n in zip(prompts, max_tokens, strict=True)]
    assert len(runner._graphs) >= 4


def test_detector_catches_syncs() -> None:
    x = torch.arange(4.0)
    for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x[x > 1], lambda: x.nonzero(),
                lambda: bool(x[0] > 0), lambda: int(x[1])):
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            bad()
    with pytest.raises(AssertionError, match="host"), NoHostSync(strict=True):
        torch.tensor([1, 2])
    with NoHostSync(strict=True):
        torch.arange(3).repeat_interleave(2)


# -- CUDA -------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_model():
    # bf16 grouped GEMM (the sync-free kernel) wants 16-byte aligned widths: multiples of 8
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, intermediate_size=192, v_head_dim=32,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, kv_lora_rank=64, q_lora_rank=64)
    return random_model(cfg, torch.bfloat16, std=0.05).cuda()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("mtp", "compile", "paged"), [(0, False, False), (2, False, False), (0, True, False),
                                                      (0, True, True)])
def test_cuda_graph_decode_equals_eager(mtp, compile, paged, monkeypatch) -> None:
    """The replayed graphs run the kernels of the eager twin on the same static shapes: same tokens (compiled:
    against the compiled forward run eagerly, which has the same fused kernels). Nine prompts reach the paged
    attention kernel (8+ rows); `paged` sends the compiled case's three through it too."""
    if paged:
        import dsv3.model.mla_decode as mla_decode

        monkeypatch.setattr(mla_decode, "MIN_ROWS", 1)
    model = _gpu_model()
    prompts = _prompts(model.cfg.vocab_size, (2, 9, 5, 1, 14, 3, 7, 11, 4), seed=2)
    params = [SamplingParams(max_tokens=10 + 3 * i, temperature=0) for i in range(len(prompts))]
    kw = dict(mtp=mtp, block_size=4, compile=compile)
    if compile:  # a compilation per shape: keep to a few (constant batch, two table widths)
        prompts, params = prompts[:3], [SamplingParams(max_tokens=12, temperature=0)] * 3
        kw["block_size"] = 16
    eager = Engine(model, None, cuda_graphs=False, **kw).generate(prompts, params)
    engine = Engine(model, None, cuda_graphs=True, **kw)
    graphs = engine.generate(prompts, params)
    assert [r.token_ids for r in graphs] == [r.token_ids for r in eager]
    assert engine.runner.capture_error is None
    assert engine.runner._graphs and all(g.graph is not None for g in engine.runner._graphs.values())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_dependent_launch_changes_no_token(compile, monkeypatch) -> None:
    """Decode's Triton kernels launched with PDL (each starts early, prefetches its weights and waits in the
    kernel for its predecessor: dsv3.model.pdl) decode exactly what plain launches do, in replayed graphs,
    compiled or not: a kernel reading before its predecessor finished would change tokens."""
    from dsv3.model import pdl

    model = _gpu_model()
    prompts = _prompts(model.cfg.vocab_size, (2, 9, 5, 1, 14, 3, 7, 11, 4), seed=5)
    params = [SamplingParams(max_tokens=16, temperature=0)] * len(prompts)
    if compile:  # a compilation per shape: a few rows
        prompts, params = prompts[:3], params[:3]
    runs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("DSV3_PDL", setting)
        engine = Engine(model, None, cuda_graphs=True, block_size=16, compile=compile)
        runs[setting] = [r.token_ids for r in engine.generate(prompts, params)]
        assert engine.runner.capture_error is None
        if compile and setting == "1" and torch.cuda.get_device_capability() >= (9, 0):
            assert engine.runner.inductor_pdl  # every compiled graph checked: no kernel launched so unwaiting
    assert runs["1"] == runs["0"]
    if torch.cuda.get_device_capability() >= (9, 0):  # and PDL was on: not the same plain launches twice
        assert pdl.mode(torch.device("cuda")) == pdl.PREFETCH


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs PDL (compute capability 9.0+)")
def test_inductor_kernel_that_does_not_wait_turns_inductor_pdl_off(monkeypatch) -> None:
    """Where a compiled graph has a kernel inductor launches with PDL but without a wait, the runner compiles
    the step again without inductor's PDL (a warning says so) and decodes what plain launches decode."""
    from dsv3.model import pdl

    model = _gpu_model()
    prompts = _prompts(model.cfg.vocab_size, (5, 9, 3), seed=6)
    params = [SamplingParams(max_tokens=8, temperature=0)] * len(prompts)
    real, flagged = pdl.waitless_kernels, []

    def first_graph_flagged(sources):  # the first check reports a kernel without a wait, later ones are real
        if flagged:
            return real(sources)
        flagged.append(True)
        return ["triton_poi_fused_ones_0"]

    monkeypatch.setattr(pdl, "waitless_kernels", first_graph_flagged)
    engine = Engine(model, None, cuda_graphs=True, block_size=16, compile=True)
    assert engine.runner.inductor_pdl
    with pytest.warns(RuntimeWarning, match="triton_poi_fused_ones_0.*without inductor's PDL"):
        got = engine.generate(prompts, params)
    assert not engine.runner.inductor_pdl and engine.runner.capture_error is None
    # after it (a graph compiled first would be reused, unchecked): the compiled forward without graphs
    want = Engine(model, None, cuda_graphs=False, block_size=16, compile=True).generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("mtp", "compile"), [(0, False), (2, False), (0, True)])
def test_cuda_graph_step_never_syncs(mtp, compile) -> None:
    """A whole decode step (staging, replay, greedy acceptance, MTP drafting), and without drafts the next one
    launched before it is read, under set_sync_debug_mode("error") once the graph is captured; their rows then
    equal those of an eager engine in the same state."""
    model = _gpu_model()
    engines = [Engine(model, None, mtp=mtp, block_size=4, cuda_graphs=g, compile=compile) for g in (True, False)]
    for e in engines:
        for p in _prompts(model.cfg.vocab_size, (3, 12, 6), seed=3):
            e.add_request(p, SamplingParams(max_tokens=20, temperature=0))
        for _ in range(3):  # the prefill and two decode steps (lazy initialisation of every kernel)
            e.step()
        e.sync()  # the step launched ahead (overlap): the scheduler is used directly below
    engine, eager = engines
    seqs, is_prefill = engine.scheduler.schedule()
    eager_seqs, _ = eager.scheduler.schedule()
    assert not is_prefill
    engine.runner.graph(*engine.runner.shape(seqs))  # capture (and compile) outside the checked region
    assert engine.runner.capture_error is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            got = [engine._launch_decode(seqs)]
            got.append(engine._launch_next(got[0]))  # without drafts: the next step, fed on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.inference_mode():
        want = [eager._launch_decode(eager_seqs)]
        want.append(eager._launch_next(want[0]))
    assert (got[1] is None) == (want[1] is None) == bool(mtp)
    assert got[0].host.shape == ((len(seqs), 2 + mtp) if mtp else (len(seqs),))
    for g, w in zip(got, want, strict=True):  # accepted counts, next tokens and drafts: the eager step's work
        assert (g and engine._read(g)) == (w and eager._read(w))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
def test_compiled_decode_matches_eager_on_cpu(make_cfg) -> None:
    """compile=True (CPU inductor here): the same logits as the eager step up to bf16 fusion rounding, with the
    cache write-and-gather left out of the compiled graphs."""
    cfg = make_cfg(num_nextn_predict_layers=0)
    model = random_model(cfg, torch.bfloat16, std=0.05)  # grouped_mm's compiled form takes bf16 only
    blocks = BlockManager(num_blocks=64, block_size=4)
    cache = PagedLatentCache(cfg, 64, 4, cfg.num_hidden_layers, dtype=torch.bfloat16)
    eager = ModelRunner(model, cache, blocks, max_batch=4)
    compiled = ModelRunner(model, cache, blocks, max_batch=4, compile=True)
    seqs = [Sequence(i, p, SamplingParams(), None) for i, p in enumerate(_prompts(cfg.vocab_size, (5, 11, 2)))]
    with torch.inference_mode():
        for s in seqs:
            blocks.reserve(s.seq_id, len(s.tokens) + 1)
        eager.prefill(seqs)
        for s in seqs:
            s.num_cached = len(s.tokens) - 1
        eager.prepare_decode(seqs)
        want = eager.decode()[1].clone()
        compiled.prepare_decode(seqs)  # the same step again: it rewrites the same slots
        got = compiled.decode()[1]
    assert _rel(got, want) < 2e-2
