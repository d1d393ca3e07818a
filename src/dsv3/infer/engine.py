"""The inference engine: requests in, tokens and text out, one batched step at a time.

`Engine.step()` asks the scheduler for a batch, runs it through the model runner (a prefill, or a decode step
that verifies the drafter's tokens), samples, and hands the new tokens to the sequences, which apply stop
rules and decode text. `generate(model, tokenizer, prompts, ...)` is the one-call API on top, returning
results or, with `stream=True`, an iterator of text/token deltas.

One code path serves plain and speculative decoding: a plain step is a verification of zero drafts
(`accept_drafts` with k = 0 just samples the next token). A decode step is launched without waiting on the
device (`_launch_decode`: static buffers, a CUDA graph replay, sampling on the device) and ends with a single
host transfer of the sampled tokens, which the stop checks need. When every row is greedy the argmax computed
inside the graph is the result (the acceptance rule with one-hot distributions reduces to comparing drafts
with it), so no probabilities or uniforms are formed.

Overlap (plain decoding, on by default): when the next step's batch is already certain, it is launched before
the current step's tokens are read back, each row fed its token on the device, so the host's per-step work
(the read, stop checks, text, scheduling, staging) no longer leaves the device idle. `step()` still completes
one step per call with the same results; `sync()` completes the step left in flight.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from dsv3.infer.block_manager import BlockManager
from dsv3.infer.model_runner import ModelRunner
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.infer.sampling import SamplingParams, probabilities, sample, to_device, uniforms
from dsv3.infer.scheduler import Scheduler
from dsv3.infer.sequence import Sequence, Status, TokenizerLike
from dsv3.infer.speculative import Drafter, MTPDrafter, accept_drafts
from dsv3.model import DeepSeekV3


@dataclass
class GenerationResult:
    """One finished request. `token_ids` are all generated ids (a final stop id included); `text` is their
    decoding without the stop id and cut before a stop string. Speculation statistics count decode steps
    (after the prefill), drafted and accepted tokens."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_steps: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 without speculation)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per decode step: 1 + accepted drafts per step (1.0 without speculation)."""
        return (self.num_steps + self.accepted) / self.num_steps if self.num_steps else 0.0


@dataclass
class GenerationDelta:
    """What one request produced in one step (streaming). `result` is set on its last delta (None when the
    request was aborted while it ran: finish_reason "abort")."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    result: GenerationResult | None = None


@dataclass
class _Launch:
    """A decode step queued on the device: next tokens [B] on the device, and its rows on their way to the
    host (`host`: the next tokens alone without drafts; else [B, 2 + k] accepted drafts, next token, drafts),
    there once `done` has passed (None: off CUDA, already there)."""

    seqs: list[Sequence]
    nxt: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None


class Engine:
    """Batched generation over a paged latent cache, optionally with MTP speculative decoding.

    mtp: draft tokens per step with the model's MTP modules (0: plain decoding). drafter: another `Drafter`
    instead. cache_tokens: token slots in the pool (default: one sequence of max_model_len, shared by all).
    cuda_graphs: replay decode steps from CUDA graphs (default: when the model is on a CUDA device).
    compile: torch.compile the decode forward first (faster steps, a compilation per decode shape).
    overlap: without drafts, launch the next decode step before reading the current one's tokens when its
    batch is certain, so the host's per-step work runs while the device computes (the same tokens either way, but
    for the GPU's batch-size dependence of low bits that plain decoding has too: a row a stop token ends still
    runs in the step already launched, so its batch's other rows may run at another batch size).
    Call `sync()` before using `runner` directly: a step may be in flight between calls of `step()`.
    """

    def __init__(
        self, model: DeepSeekV3, tokenizer: TokenizerLike | None = None, *, mtp: int = 0,
        drafter: Drafter | None = None, block_size: int = 16, cache_tokens: int | None = None,
        max_num_seqs: int = 256, max_num_batched_tokens: int = 16384, max_model_len: int | None = None,
        cuda_graphs: bool | None = None, compile: bool = False, overlap: bool = True,
    ):
        cfg = model.cfg
        dtype = model.embed_tokens.weight.dtype
        if compile and dtype != torch.bfloat16:
            raise ValueError(f"compile=True needs a bfloat16 model: torch.compile's grouped GEMM (the routed "
                             f"experts) takes bf16 only (got {dtype}; load with dtype=torch.bfloat16)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size), ("cache_tokens", cache_tokens)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        self.max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
        if not 1 < self.max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} must be in [2, {cfg.max_position_embeddings}] "
                             f"(the model's max_position_embeddings: RoPE is defined up to there)")
        if mtp < 0:
            raise ValueError(f"mtp (draft tokens per step) must be >= 0 (got {mtp})")
        self.drafter = drafter if drafter is not None else MTPDrafter(model, mtp) if mtp else None
        k = self.drafter.k if self.drafter else 0
        # the MTP blocks' latents live in the same pool, after the main layers, only when they draft
        n_layers = cfg.num_hidden_layers + (len(model.mtp) if isinstance(self.drafter, MTPDrafter) else 0)
        cache_tokens = self.max_model_len + k if cache_tokens is None else cache_tokens
        num_blocks = 1 + -(-cache_tokens // block_size)
        w = model.embed_tokens.weight
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = PagedLatentCache(cfg, num_blocks, block_size, n_layers, w.device, w.dtype)
        self.runner = ModelRunner(
            model, self.cache, self.blocks, max_batch=max_num_seqs,
            max_blocks=self.blocks.blocks_for(self.max_model_len + k), tokens_per_step=1 + k,
            keep_hidden=self.drafter is not None, cuda_graphs=cuda_graphs, compile=compile,
        )
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, lookahead=k)
        self._seqs: dict[int, Sequence] = {}
        self._next_id = 0
        self.overlap = overlap
        self._inflight: _Launch | None = None  # a decode step launched before its predecessor was read

    # -- requests ------------------------------------------------------------------------------------
    def _sequence(self, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        """Validate one request and build its sequence (not queued yet)."""
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass token ids or give the engine one")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token (V3 prompts start with BOS)")
        check_prompt_length(len(ids), self.max_model_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the output: give the engine one, or stop "
                             "on token ids (stop_token_ids)")
        vocab = self.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (vocab_size)")
        seq = Sequence(self._next_id, ids, params, self.eos_id)
        self._next_id += 1
        return seq

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text or token ids); returns its request id."""
        seq = self._sequence(prompt, params or SamplingParams())
        self._queue(seq)
        return seq.seq_id

    def _queue(self, seq: Sequence) -> None:
        self.scheduler.add(seq, min(len(seq.tokens) + seq.params.max_tokens, self.max_model_len))
        self._seqs[seq.seq_id] = seq

    def abort(self, seq_id: int) -> None:
        """Drop a request, finished or not, and free its cache blocks (its row in a step in flight is dropped
        when read: see `_launch_next` for that step's cache write)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self.scheduler.finish([seq])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()  # a step in flight counts through its sequences, which are running

    def result(self, seq_id: int) -> GenerationResult:
        s = self._seqs[seq_id]
        return GenerationResult(s.tokens[: s.num_prompt], s.output, s.text, s.finish_reason or "",
                                s.steps, s.drafted, s.accepted)

    # -- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one batch; returns the sequences it advanced (finished ones included). With overlap the step
        may have been launched by the previous call: this one launches the next, then reads it back."""
        cur = self._take_inflight()
        if cur is None:
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs:
                return []
            if is_prefill:
                try:
                    new = self._prefill(seqs)
                except BaseException:  # its latents or drafter state may be half written: prefill again
                    self.scheduler.recompute(seqs)
                    raise
                return self._advance(seqs, new, prefill=True)
            cur = self._launch_decode(seqs)
        self._inflight = self._launch_next(cur)
        try:
            return self._complete(cur)
        except BaseException:  # the step ahead follows tokens the host did not take: the next step recomputes
            self._inflight = None
            raise

    @torch.inference_mode()
    def sync(self) -> list[Sequence]:
        """Complete the decode step in flight, if any, as `step()` would (its sequences are returned). After
        it the sequences' state is the device's and nothing is launched ahead: the runner can be used directly."""
        cur = self._take_inflight()
        return [] if cur is None else self._complete(cur)

    def _take_inflight(self) -> _Launch | None:
        """The step in flight, unless every sequence in it finished or was aborted since (then it is dropped
        unread)."""
        cur, self._inflight = self._inflight, None
        return cur if cur is not None and any(s.status is Status.RUNNING for s in cur.seqs) else None

    def _advance(self, seqs: list[Sequence], new: list[list[int]], prefill: bool) -> list[Sequence]:
        """Hand each sequence its new tokens: stop rules, text, cache bookkeeping; finished ones leave."""
        ahead = {s.seq_id for s in self._inflight.seqs} if self._inflight else set()
        try:
            for seq, tokens in zip(seqs, new, strict=True):
                before = len(seq.tokens)
                seq.append(tokens, self.max_model_len)
                seq.update_text(self.tokenizer)
                seq.num_cached = len(seq.tokens) - 1
                if not prefill:  # tokens kept beyond one per step (a stop can cut accepted drafts off)
                    seq.accepted += min(len(tokens) - 1, len(seq.tokens) - before - 1)
                if seq.finish_reason is None:
                    self.scheduler.rollback(seq, in_flight=seq.seq_id in ahead)
        except BaseException:  # cut short (a tokenizer error, Ctrl-C): some rows advanced, some not, one maybe
            # halfway; the step ahead follows tokens the host did not all take, and the unfinished rows' caches
            # are recomputed from their tokens, which are the truth
            self._inflight = None
            self.scheduler.finish([s for s in seqs if s.finish_reason is not None])
            self.scheduler.recompute(seqs)
            raise
        self.scheduler.finish([s for s in seqs if s.finish_reason is not None])
        return seqs

    def _prefill(self, seqs: list[Sequence]) -> list[list[int]]:
        h, logits, tokens, lengths = self.runner.prefill(seqs)
        u = uniforms([s.generator for s in seqs], 1, logits.device)
        nxt = sample(probabilities(logits, [s.params for s in seqs]), u[:, 0])
        if self.drafter is not None:
            self.drafter.after_prefill(self.runner, seqs, h, tokens, lengths, nxt)
        return [[t] for t in nxt.tolist()]

    def _complete(self, cur: _Launch) -> list[Sequence]:
        """Read a launched decode step back (the step's one host sync) and advance its sequences; rows of
        sequences that finished or were aborted after the launch are dropped."""
        k = self.drafter.k if self.drafter else 0
        seqs, new = [], []
        for seq, row in zip(cur.seqs, self._read(cur), strict=True):
            if seq.status is not Status.RUNNING:
                continue
            a, x, *d = row if k else (0, row)
            seq.steps += 1
            seq.drafted += k
            seqs.append(seq)
            new.append(d[:a] + [x])  # (_advance counts the accepted drafts that the output keeps)
        return self._advance(seqs, new, prefill=False)

    def _read(self, cur: _Launch) -> list:
        """The launched step's rows on the host (as `_Launch.host`, in lists)."""
        if cur.done is not None:
            cur.done.synchronize()  # this step's copy only: a step launched after it keeps running
        return cur.host.tolist()

    def _launch_next(self, cur: _Launch) -> _Launch | None:
        """Launch the decode step after `cur` before `cur` is read (overlap), each row fed its token from `cur`
        on the device. Only when that step's batch is certain now: no drafts (their count per row depends on
        `cur`'s acceptance), no request waiting (its prefill goes first) and blocks for every row's next
        position at hand without preempting; else None, and the next step is scheduled after `cur` is read.
        A row that `cur`'s token ends by length leaves the batch, as it would without overlap. A row that a
        stop token or string ends (or an abort) is computed and dropped when read; its write at one slot of
        blocks freed meanwhile is harmless: it is queued on the device's one stream before anything launched
        after the freeing, so a new owner of the block, which writes every position before a step reads it
        (its prefill, its decode steps), overwrites it."""
        if not self.overlap or self.drafter is not None or self.scheduler.waiting:
            return None
        row = {s.seq_id: b for b, s in enumerate(cur.seqs)}
        seqs = [s for s in self.scheduler.running if s.room(self.max_model_len) > 1]
        if not seqs or any(s.seq_id not in row for s in seqs) or not self.scheduler.reserve_ahead(seqs):
            return None
        idx = [row[s.seq_id] for s in seqs]
        same = idx == list(range(len(cur.seqs)))
        nxt = cur.nxt if same else cur.nxt[to_device(torch.tensor(idx), cur.nxt.device)]
        return self._launch_decode(seqs, nxt)

    def _launch_decode(self, seqs: list[Sequence], follow: torch.Tensor | None = None) -> _Launch:
        """Everything a decode step does, queued on the device without waiting for it, its rows' copy to the
        host included. follow [B] (device): each row feeds this token, which a step in flight samples, at the
        position after its newest token's."""
        runner = self.runner
        runner.prepare_decode(seqs, follow=follow)
        if self.drafter is not None:
            drafts, q = self.drafter.propose(runner, seqs)
            drafts = drafts.to(runner.device, non_blocking=True)
        else:
            drafts, q = None, None
        h, logits, greedy = runner.decode(drafts)
        if drafts is None:
            drafts = greedy.new_empty(len(seqs), 0)
        k = drafts.shape[1]
        if not all(s.params.greedy for s in seqs):
            if q is None:
                q = torch.empty(len(seqs), 0, logits.shape[-1], device=runner.device)
            p = probabilities(logits, [s.params for s in seqs])
            u = uniforms([s.generator for s in seqs], k + 1, runner.device)
            accepted, nxt = accept_drafts(p, q.to(runner.device), drafts, u)
        elif k:
            # one-hot p: a draft is accepted iff it is the argmax, and the next token is the argmax after them
            accepted = (drafts == greedy[:, :k]).long().cumprod(-1).sum(-1)
            nxt = greedy.gather(1, accepted.unsqueeze(1)).squeeze(1)
        else:  # nothing to accept: the argmax is the next token, with no kernel to find it
            accepted, nxt = None, greedy[:, 0]
        if self.drafter is not None:
            self.drafter.after_verify(runner, seqs, h, drafts, accepted, nxt)
        rows = torch.cat([accepted.unsqueeze(1), nxt.unsqueeze(1), drafts], dim=1) if k else nxt
        cuda = runner.device.type == "cuda"
        # a copy (nxt may be a view of the runner's outputs, which the next step rewrites) into pinned memory,
        # so that reading it waits for this step alone
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=cuda).copy_(rows, non_blocking=True)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(runner.device))  # the model's device, current or not
        return _Launch(seqs, nxt, host, done)

    # -- whole requests ------------------------------------------------------------------------------
    def generate(
        self, prompts: str | Seq[int] | Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None, stream: bool = False,
    ) -> list[GenerationResult] | Iterator[GenerationDelta]:
        """Run prompts to completion. A single prompt (text or one list of ids) counts as a batch of one.
        `params`: one SamplingParams for all, or one per prompt. stream=True returns an iterator of deltas."""
        if hasattr(prompts, "tolist"):  # a tensor or array of ids (or of id rows)
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(prompts)
        else:
            plist = list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        seqs = [self._sequence(p, sp) for p, sp in zip(prompts, plist, strict=True)]  # validate all first
        queued: list[Sequence] = []
        try:
            for seq in seqs:
                self._queue(seq)
                queued.append(seq)
        except BaseException:  # one prompt refused (the cache cannot hold it): none of the batch runs
            for seq in queued:
                self.abort(seq.seq_id)
            raise
        deltas = self._run([s.seq_id for s in seqs])
        if stream:
            return _Stream(self, [s.seq_id for s in seqs], deltas)
        results: list[GenerationResult | None] = [None] * len(seqs)
        for d in deltas:
            if d.result is not None:
                results[d.index] = d.result
        return results  # type: ignore[return-value]

    def _run(self, ids: list[int]) -> Iterator[GenerationDelta]:
        """Step until the given requests finish, yielding their deltas; requests left when the consumer stops
        iterating are aborted, so an abandoned stream frees its cache."""
        index = {sid: i for i, sid in enumerate(ids)}
        pending = set(ids)
        try:
            while pending:
                stepped = self.step()
                # ours among them, and ours that another caller's steps finished or that were aborted meanwhile
                mine = [s for s in stepped if s.seq_id in pending]
                mine += [self._seqs[sid] for sid in pending - {s.seq_id for s in mine}
                         if sid in self._seqs and self._seqs[sid].finished]
                for sid in [sid for sid in pending if sid not in self._seqs]:
                    pending.discard(sid)
                    yield GenerationDelta(index[sid], "", [], "abort", None)
                for seq in mine:
                    text, tokens = seq.take_delta()
                    if seq.finished:
                        pending.discard(seq.seq_id)
                        result = self.result(seq.seq_id)
                        del self._seqs[seq.seq_id]
                        yield GenerationDelta(index[seq.seq_id], text, tokens, seq.finish_reason, result)
                    elif text or tokens:
                        yield GenerationDelta(index[seq.seq_id], text, tokens)
                if not stepped and pending and not self.has_unfinished():
                    raise RuntimeError(f"requests {sorted(pending)} are neither finished nor scheduled")
        finally:
            for sid in pending:
                self.abort(sid)


class _Stream(Iterator[GenerationDelta]):
    """`generate(..., stream=True)`'s iterator. Closing it (or dropping it) aborts its unfinished requests and
    frees their cache, also before its first delta, when a bare generator's cleanup would never run."""

    def __init__(self, engine: Engine, ids: list[int], deltas: Iterator[GenerationDelta]):
        self._engine, self._ids, self._deltas = engine, ids, deltas

    def __next__(self) -> GenerationDelta:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()  # a started stream aborts what it has not finished itself
        for sid in self._ids:  # never started: all of them (finished ones too, whose results nobody will take)
            self._engine.abort(sid)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - at interpreter exit the engine may be half torn down
            pass


def check_prompt_length(n: int, max_model_len: int) -> None:
    """ValueError unless a prompt of n tokens leaves room for a generated token in the context."""
    if n >= max_model_len:
        raise ValueError(f"the prompt has {n} tokens but the context holds {max_model_len} "
                         f"(max_model_len): shorten it to at most {max_model_len - 1} tokens")


def generate(
    model: DeepSeekV3, tokenizer: TokenizerLike | None, prompts: str | Seq[int] | Seq[str | Seq[int]], *,
    max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    seed: int | None = None,
    stop: Seq[str] = (), stop_token_ids: Seq[int] = (), ignore_eos: bool = False,
    params: SamplingParams | Seq[SamplingParams] | None = None, mtp: int = 0, stream: bool = False,
    **engine_options: object,
) -> list[GenerationResult] | Iterator[GenerationDelta]:
    """Generate continuations of `prompts` (one text, one list of ids, or a list of either) with `model`.

    Sampling: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed (per request; None = random),
    stop strings, stop token ids (plus the tokenizer's EOS unless ignore_eos), max_tokens; or `params`, one
    SamplingParams or one per prompt, instead. mtp=K drafts K tokens per step with the model's MTP modules.
    Returns one GenerationResult per prompt, or with stream=True an iterator of GenerationDelta.
    `engine_options` go to `Engine` (block_size, cache_tokens, max_num_seqs, max_model_len, drafter, ...).
    """
    if params is None:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop, stop_token_ids=stop_token_ids,  # type: ignore[arg-type]
                                ignore_eos=ignore_eos)
    engine = Engine(model, tokenizer, mtp=mtp, **engine_options)  # type: ignore[arg-type]
    return engine.generate(prompts, params, stream=stream)
