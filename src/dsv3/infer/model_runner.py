"""Turns a batch of sequences into tensors and runs the model over the paged latent cache.

Prefill: every prompt padded to the longest (padding writes go to the null block and sit after every real
query, so causal attention never sees them), index tensors built from the block tables once per request.

Decode: a fixed shape per step so that a CUDA graph can replay it. A step of B sequences, each feeding S
tokens (the newest one, then the drafts it verifies), runs padded to a batch bucket Bp >= B with every block
table padded to a width bucket Wp (`bucket`; at least MIN_TABLE_TOKENS positions, so short contexts share one
shape, at most the longest table the engine allows). Its inputs live in one preallocated device buffer: tokens
[Bp, S], start positions [Bp] and block tables [Bp, Wp], staged in pinned host memory and copied with one
non-blocking transfer (a step launched before the previous one is read takes its tokens from that step's
outputs with a device copy after it); positions, slots and the gathered keys are computed from them on the
device. Padding rows have start 0 and an all-null block table: they write only into the null block and no real
row reads them. The host keeps the block tables in a persistent array and rewrites a row only when its table
changed. The forward (`hidden_states`, `lm_head`, argmax) writes into preallocated outputs: logits [Bp, S, V],
greedy tokens [Bp, S] and, for the drafter, hidden [Bp, S, d]. On CUDA each (Bp, Wp) is captured once in a
`torch.cuda.CUDAGraph` (warm-up on a side stream, one memory pool shared by all graphs, as vLLM does) and
replayed; elsewhere, or with cuda_graphs=False, the very same function runs eagerly, so the CPU tests cover
the buffer bookkeeping of the graph path. Nothing between staging and the outputs waits on the device.
compile=True runs that function through torch.compile first (one compilation per shape, before capture): it
fuses the hundreds of small element-wise kernels of a decode step (norms, RoPE, routing, casts) that a graph
otherwise replays one by one. It stops at the cache's write-and-gather (`PagedStep.update`), which runs as is.

The MTP drafter runs its modules eagerly over the same step's device tensors (`mtp`). The model's own code
does all the math: `hidden_states` for the main decoder, `MTPModule` for drafting, `lm_head` for logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.infer.block_manager import NULL_BLOCK, BlockManager
from dsv3.infer.paged_cache import PagedLatentCache, PagedStep
from dsv3.infer.sampling import argmax
from dsv3.infer.sequence import Sequence
from dsv3.model import DeepSeekV3, pdl

BATCH_STEPS_PER_OCTAVE = 4  # batch buckets 1..8, 10, 12, 14, 16, 20, 24, ...: at most 25% padding rows
WIDTH_STEPS_PER_OCTAVE = 8  # table widths 1..16, 18, 20, ..., 72, 80, ...: at most 12.5% extra keys gathered
MIN_TABLE_TOKENS = 256  # short tables are padded to this many positions: one shape for every short context
GRAPH_WARMUP = 2  # eager runs on the capture stream before each capture (lazy initialisation, compilation)
# torch.compile guards each layer's attention frame on its layer index, so a shape compiles once per layer
# (identical graphs: the compile cache serves all but the first); the default limit of 8 would leave the
# deeper layers eager
COMPILE_CACHE_LIMIT = 1024


def _generated_modules() -> list | None:
    """The Python modules inductor has loaded so far (its generated code, kernels' sources included; the list
    grows as it compiles), or None where this torch keeps no such list."""
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return None
    modules = getattr(PyCodeCache, "modules", None)
    return modules if isinstance(modules, list) else None


def _inductor_pdl_checkable() -> bool:
    """Whether this torch's inductor can launch its kernels with PDL (`triton.enable_pdl`, torch 2.10+) and
    keeps the list of generated modules that `ModelRunner` checks for kernels that would not wait."""
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, "enable_pdl") and _generated_modules() is not None


def _compile_limits() -> dict[str, int]:
    """Raised recompilation limits, under whichever names this torch has (recompile_limit was cache_size_limit)."""
    cfg = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit", "accumulated_cache_size_limit")
    return {n: COMPILE_CACHE_LIMIT for n in names if hasattr(cfg, n)}


def bucket(n: int, steps_per_octave: int, cap: int | None = None) -> int:
    """The smallest size >= n on a grid with `steps_per_octave` sizes per doubling (a power of two): every
    size up to 2 * steps_per_octave, then multiples of 2^e, e growing by one per octave. Capped at `cap`."""
    if n < 1:
        raise ValueError(f"bucket of {n}: sizes start at 1")
    shift = max(0, (n - 1).bit_length() - steps_per_octave.bit_length())
    size = -(-n >> shift) << shift
    return size if cap is None else max(n, min(size, cap))


@dataclass
class DecodeStep:
    """The device tensors of the decode step being run: the first B of Bp rows are real."""

    B: int
    Bp: int
    Wp: int
    tokens: torch.Tensor  # [Bp, S]
    start: torch.Tensor  # [Bp]: position of each row's first token of the step (its num_cached)
    tables: torch.Tensor  # [Bp, Wp]

    @property
    def rows_start(self) -> torch.Tensor:
        return self.start[: self.B]

    @property
    def rows_tables(self) -> torch.Tensor:
        return self.tables[: self.B]


class DecodeGraph:
    """One decode shape: captured in a CUDA graph and replayed, or (capture=False) the same function eagerly."""

    def __init__(
        self, fn: Callable[[], None], capture: bool, device: torch.device | None = None,
        pool: object = None, stream: torch.cuda.Stream | None = None,
    ):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if not capture:
            return
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                fn()
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            fn()
        self.graph = graph

    def replay(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class ModelRunner:
    """The model, its paged latent cache, the block manager that says where each sequence lives, and the
    static decode buffers.

    max_batch: most sequences per decode step. max_blocks: longest block table (default: the whole pool).
    tokens_per_step: S, tokens each row feeds per decode step (1 + draft tokens). keep_hidden: also output the
    final hidden states of decode steps (the MTP drafter needs them). cuda_graphs: capture decode steps in CUDA
    graphs (default: on CUDA devices). compile: torch.compile the decode forward (slow to start: a compilation
    per decode shape; bf16 models, the only dtype the compiled grouped GEMM takes).
    """

    def __init__(
        self, model: DeepSeekV3, cache: PagedLatentCache, blocks: BlockManager, *, max_batch: int = 256,
        max_blocks: int | None = None, tokens_per_step: int = 1, keep_hidden: bool = False,
        cuda_graphs: bool | None = None, compile: bool = False,
    ):
        self.model = model
        self.cache = cache
        self.blocks = blocks
        w = model.embed_tokens.weight
        self.device = dev = w.device
        self.max_batch = max_batch
        self.max_blocks = min(max_blocks or blocks.num_blocks - 1, blocks.num_blocks - 1)
        self.S = S = tokens_per_step
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda"
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device (it is on {dev})")
        self.cuda_graphs = cuda_graphs
        # inputs, packed per (Bp, Wp): tokens [Bp*S] | start [Bp] | tables [Bp*Wp]; two pinned stagings in turn
        n = max_batch * (S + 1 + self.max_blocks)
        pin = dev.type == "cuda"
        self._staging = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._staged: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._inputs = torch.zeros(n, dtype=torch.long, device=dev)
        self._tables = np.full((max_batch, self.max_blocks), NULL_BLOCK, dtype=np.int64)
        self._rows: list[list[int]] = [[] for _ in range(max_batch)]  # what each row of _tables holds
        self._offsets = torch.arange(S, device=dev)
        cfg = model.cfg
        self.out_logits = torch.zeros(max_batch, S, cfg.vocab_size, dtype=w.dtype, device=dev)
        self.out_tokens = torch.zeros(max_batch, S, dtype=torch.long, device=dev)
        self.out_hidden = torch.zeros(max_batch, S, cfg.hidden_size, dtype=w.dtype, device=dev) if keep_hidden \
            else None
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.step: DecodeStep | None = None  # the decode step being run (prepare_decode .. the next one)
        self.min_blocks = blocks.blocks_for(MIN_TABLE_TOKENS)
        # combo_kernels: inductor launches independent small kernels of the step (the norms and RoPE of MLA's
        # two latents, ...) as one: batch 1, `bench`, H200: 247 -> 235 kernels, +2% tok/s in three pairs of runs.
        # triton.enable_pdl: its kernels launch with PDL too, as dsv3's own decode kernels do (`dsv3.model.pdl`),
        # so that the chain of launches overlaps through them: batch 1, `bench`, H200: 1,366 -> 1,515 tok/s.
        # Each compiled graph is checked for kernels that launch so without waiting (`pdl.waitless_kernels`)
        # and compiled again without it where one turns up; without the means to check, it stays off.
        self._options = {"combo_kernels": True} if dev.type == "cuda" else None
        self.inductor_pdl = (compile and self._options is not None and pdl.mode(dev) != pdl.OFF
                             and _inductor_pdl_checkable())
        options = {**self._options, "triton.enable_pdl": True} if self.inductor_pdl else self._options
        self.compiled = torch.compile(self._forward, dynamic=False, options=options) if compile else None
        self._checked: set[tuple[int, int]] = set()  # shapes whose compiled code was checked for PDL waits
        self._scanned: set[str] = set()  # inductor's module files read by those checks
        self.capture_error: str | None = None  # set when a capture failed and decoding fell back to eager

    # -- prefill -------------------------------------------------------------------------------------
    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _fresh_step(
        self, seqs: list[Sequence], S: int, lengths: torch.Tensor
    ) -> tuple[PagedStep, torch.Tensor]:
        """View for tokens 0 .. S-1 of each row starting its sequence here (only the first lengths[b] real)."""
        bs = self.blocks.block_size
        tables = [self.blocks.table(s.seq_id) for s in seqs]
        width = max(map(len, tables))
        bt = self._tensor([b for t in tables for b in t + [NULL_BLOCK] * (width - len(t))]).view(len(seqs), -1)
        positions = torch.arange(S, device=self.device).expand(len(seqs), S)
        slots = bt.gather(1, (positions // bs).clamp(max=width - 1)) * bs + positions % bs
        pad = positions >= lengths.view(-1, 1)  # padding tokens write into the null block
        slots = slots.masked_fill(pad, NULL_BLOCK * bs)
        return self.cache.step(slots, positions, None), positions

    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token of every sequence, from position 0. Returns the final hidden states [B, L, d], the
        logits at each row's last token [B, V], the tokens fed [B, L] (padded with 0) and the lengths [B]."""
        n = [len(s.tokens) for s in seqs]
        L = max(n)
        padded = [t for s in seqs for t in s.tokens + [0] * (L - len(s.tokens))]
        tokens = self._tensor(padded).view(len(seqs), L)
        lengths = self._tensor(n)
        step, positions = self._fresh_step(seqs, L, lengths)
        h, _, _ = self.model.hidden_states(tokens, positions=positions, cache=step)
        last = h[torch.arange(len(seqs), device=self.device), lengths - 1]
        return h, self.model.lm_head(last), tokens, lengths

    # -- decode --------------------------------------------------------------------------------------
    def _views(self, flat: torch.Tensor, Bp: int, Wp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [Bp, S], start [Bp], tables [Bp, Wp]: the packed layout of shape (Bp, Wp) in `flat`."""
        S = self.S
        a, b = Bp * S, Bp * (S + 1)
        return flat[:a].view(Bp, S), flat[a:b], flat[b : b + Bp * Wp].view(Bp, Wp)

    def _forward(self, Bp: int, Wp: int) -> None:
        """The decode forward of shape (Bp, Wp), from the input buffer to the output buffers (what is captured)."""
        tokens, start, tables = self._views(self._inputs, Bp, Wp)
        bs = self.blocks.block_size
        positions = start.unsqueeze(1) + self._offsets  # [Bp, S]
        slots = tables.gather(1, positions // bs) * bs + positions % bs
        h, _, _ = self.model.hidden_states(tokens, positions=positions, cache=self.cache.step(slots, positions, tables))
        logits = self.model.lm_head(h)
        self.out_logits[:Bp].copy_(logits)
        self.out_tokens[:Bp].copy_(argmax(logits))
        if self.out_hidden is not None:
            self.out_hidden[:Bp].copy_(h)

    def _run(self, Bp: int, Wp: int) -> None:
        if self.compiled is None:
            self._forward(Bp, Wp)
            return
        with torch._dynamo.config.patch(_compile_limits()):
            self.compiled(Bp, Wp)
        if not self.inductor_pdl or (Bp, Wp) in self._checked:
            return
        # a shape's first call compiles it (or reuses code compiled before): check inductor's loaded code, each
        # file once (one read clean stays clean; one with a kernel that would not wait turned inductor's PDL off)
        self._checked.add((Bp, Wp))
        files = sorted({m.__file__ for m in _generated_modules() or [] if getattr(m, "__file__", None)}
                       - self._scanned)
        self._scanned.update(files)
        bad = pdl.waitless_kernels(Path(f).read_text() for f in files if Path(f).is_file())
        if bad:  # compile this shape again without inductor's PDL, and run that instead
            warnings.warn(f"inductor launched {', '.join(sorted(set(bad)))} with PDL but without waiting for the "
                          "kernel before it; compiling the decode step without inductor's PDL", RuntimeWarning,
                          stacklevel=2)
            self.inductor_pdl = False
            self.compiled = torch.compile(self._forward, dynamic=False, options=self._options)
            self._run(Bp, Wp)

    def graph(self, Bp: int, Wp: int) -> DecodeGraph:
        """The decode step of shape (Bp, Wp), captured on first use. Capture runs on zeroed inputs (every row
        padding: only the null block is written), so call it before staging a real step's inputs."""
        g = self._graphs.get((Bp, Wp))
        if g is None:
            fn = lambda: self._run(Bp, Wp)  # noqa: E731
            if self.cuda_graphs:
                self._inputs.zero_()
                try:
                    g = DecodeGraph(fn, True, self.device, self._pool, self._stream)
                except Exception as e:  # noqa: BLE001 - decode on without graphs (and without compile)
                    self.capture_error = f"{type(e).__name__}: {e}"
                    warnings.warn(f"CUDA graph capture failed, decoding without CUDA graphs or compile from now "
                                  f"on: {self.capture_error}", RuntimeWarning, stacklevel=2)
                    self.cuda_graphs, self.compiled = False, None
                    self._graphs.clear()
                    g = DecodeGraph(fn, False)
            else:
                g = DecodeGraph(fn, False)
            self._graphs[(Bp, Wp)] = g
        return g

    def set_cuda_graphs(self, on: bool) -> None:
        """Switch decode steps between replayed CUDA graphs and the eager twin (drops every shape built so far)."""
        if on and self._pool is None:
            raise ValueError(f"CUDA graphs need the model on a CUDA device (it is on {self.device})")
        self.cuda_graphs = on
        self._graphs.clear()

    @torch.inference_mode()
    def capture(self, batch_size: int, min_tokens: int, max_tokens: int) -> int:
        """Capture ahead of time every decode shape a batch of `batch_size` sequences holding between
        min_tokens and max_tokens positions (drafts included) will use. Returns the number of shapes."""
        Bp = bucket(batch_size, BATCH_STEPS_PER_OCTAVE, self.max_batch)
        lo, hi = self.blocks.blocks_for(min_tokens), self.blocks.blocks_for(max_tokens)
        widths = sorted({self._width(w) for w in range(lo, hi + 1)})
        for Wp in widths:
            self.graph(Bp, Wp)
        return len(widths)

    def _stage(self) -> torch.Tensor:
        """A pinned host staging buffer whose previous transfer has finished."""
        self._turn ^= 1
        event = self._staged[self._turn]
        if event is not None and not event.query():
            event.synchronize()  # not normally reached: the engine reads every step's tokens back
        return self._staging[self._turn]

    def shape(self, seqs: list[Sequence]) -> tuple[int, int]:
        """(Bp, Wp): the batch and table-width buckets a decode step of `seqs` runs as."""
        B = len(seqs)
        if not 0 < B <= self.max_batch:
            raise ValueError(f"a decode step takes 1 to {self.max_batch} sequences (max_batch), got {B}")
        width = max(len(self.blocks.table(s.seq_id)) for s in seqs)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds max_blocks={self.max_blocks}")
        return bucket(B, BATCH_STEPS_PER_OCTAVE, self.max_batch), self._width(width)

    def _width(self, blocks: int) -> int:
        """Table width bucket of a longest table of `blocks` blocks (at least min_blocks, at most max_blocks)."""
        return bucket(min(max(blocks, self.min_blocks), self.max_blocks), WIDTH_STEPS_PER_OCTAVE, self.max_blocks)

    def prepare_decode(
        self, seqs: list[Sequence], tokens: list[list[int]] | None = None, follow: torch.Tensor | None = None,
    ) -> DecodeStep:
        """Stage a decode step of `seqs` and copy its inputs to the device (non-blocking). Row b feeds
        tokens[b] (at most S; default: its newest token), the rest of its S tokens come from `decode(drafts)`,
        at positions num_cached.. . follow [B] (device; S = 1): row b feeds follow[b] at num_cached + 1 instead,
        the token a step still in flight samples, copied on the device. Blocks for all positions must be
        reserved."""
        B, S = len(seqs), self.S
        tables = [self.blocks.table(s.seq_id) for s in seqs]
        Bp, Wp = self.shape(seqs)
        if follow is not None and (Bp, Wp) not in self._graphs:
            follow = follow.clone()  # it may view the outputs, which a capture's warm-up runs rewrite
        self.graph(Bp, Wp)  # capture (on zeroed inputs) before this step's inputs are staged
        # the persistent tables: entries past what a row holds are always the null block
        for b in range(Bp):
            old, new = self._rows[b], tables[b] if b < B else []
            if old != new:
                self._tables[b, : len(new)] = new
                if len(old) > len(new):
                    self._tables[b, len(new) : len(old)] = NULL_BLOCK
                self._rows[b] = list(new)
        host = self._stage()
        tok, start, tab = (x.numpy() for x in self._views(host, Bp, Wp))
        tok.fill(0)
        if tokens is None:
            tok[:B, 0] = [s.tokens[-1] for s in seqs]
        else:
            for b, row in enumerate(tokens):
                tok[b, : len(row)] = row
        start.fill(0)
        start[:B] = [s.num_cached + (follow is not None) for s in seqs]
        tab[:] = self._tables[:Bp, :Wp]
        n = Bp * (S + 1 + Wp)
        self._inputs[:n].copy_(host[:n], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._staged[self._turn] = event
        self.step = DecodeStep(B, Bp, Wp, *self._views(self._inputs, Bp, Wp))
        if follow is not None:  # after the staged copy, in stream order: no host sync
            self.step.tokens[:B, 0].copy_(follow, non_blocking=True)
        return self.step

    def decode(self, drafts: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Run the prepared step; drafts [B, S-1] (any device) fill the tokens after each row's newest.
        Returns views of the outputs for the B real rows: hidden [B, S, d] (None without keep_hidden), logits
        [B, S, V] and greedy tokens [B, S], valid until the next decode."""
        st = self.step
        if st is None:
            raise RuntimeError("decode() needs prepare_decode() first")
        if drafts is not None and drafts.shape[1]:
            st.tokens[: st.B, 1:].copy_(drafts, non_blocking=True)
        self._graphs[(st.Bp, st.Wp)].replay()
        hidden = None if self.out_hidden is None else self.out_hidden[: st.B]
        return hidden, self.out_logits[: st.B], self.out_tokens[: st.B]

    # -- MTP drafting --------------------------------------------------------------------------------
    def mtp(
        self, depth: int, seqs: list[Sequence], h_prev: torch.Tensor, tokens: torch.Tensor,
        start: torch.Tensor, lengths: torch.Tensor | None = None, fresh: bool = False,
    ) -> torch.Tensor:
        """MTP module `depth` (0-based) over slots start[b] .. start[b]+S-1: h_prev [B, S, d] with the
        embeddings of tokens [B, S] -> its normed output [B, S, d]. Its latents go to its own pool layers.
        fresh (after a prefill; lengths [B] real tokens per row): the slots start at 0 and nothing earlier is
        gathered. Otherwise the block tables are the current decode step's."""
        S = tokens.shape[1]
        if fresh:
            step, positions = self._fresh_step(seqs, S, lengths)
        else:
            bs = self.blocks.block_size
            tables = self.step.rows_tables
            positions = start.view(-1, 1) + torch.arange(S, device=self.device)
            slots = tables.gather(1, positions // bs) * bs + positions % bs
            step = self.cache.step(slots, positions, tables)
        cos, sin = self.model.rope(positions)
        out, _ = self.model.mtp[depth](h_prev, self.model.embed_tokens(tokens), cos, sin, step)
        return out
