"""The engine against independent references: full-recompute greedy decoding, one request at a time, the
stop rules applied by hand to a reference output, and exact distributions of sampled tokens."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsv3.infer import Engine, SamplingParams, generate
from dsv3.infer.block_manager import CacheExhausted
from dsv3.infer.scheduler import Scheduler
from tests.infer.conftest import CharTokenizer
from tests.infer.test_sampling import _reference


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding by full recompute: the uncached forward over the whole sequence at each step."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor([tokens], device=model.embed_tokens.weight.device)
            tokens.append(int(model(x, mtp=False).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def tv_bound(exact: torch.Tensor, n: int, fail: float = 1e-6) -> float:
    """A total-variation bound between n samples' frequencies and their exact distribution that a correct
    sampler exceeds with probability < `fail`: E[TV] <= 1/2 sum sqrt(p(1-p)/n) (Jensen), and one sample moves
    TV by at most 1/n, so P(TV > E[TV] + e) <= exp(-2 n e^2) (McDiarmid)."""
    return float(0.5 * (exact * (1 - exact) / n).sqrt().sum()) + math.sqrt(math.log(1 / fail) / (2 * n))


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def model64(make_cfg, make_model):
    return make_model(make_cfg(num_nextn_predict_layers=0), dtype=torch.float64)


def test_batched_greedy_equals_one_at_a_time(model64) -> None:
    prompts = _prompts(model64.cfg.vocab_size, (1, 5, 12, 3, 20))
    params = SamplingParams(max_tokens=10, temperature=0)
    alone = [generate(model64, None, p, params=params, block_size=4)[0].token_ids for p in prompts]
    for p, out in zip(prompts, alone, strict=True):
        assert out == greedy_reference(model64, p, 10)
    batched = Engine(model64, None, block_size=4).generate(prompts, params)
    assert [r.token_ids for r in batched] == alone
    assert all(r.finish_reason == "length" for r in batched)
    # a pool too small for all five at once: sequences are preempted, recomputed, and no token changes
    small = Engine(model64, None, block_size=4, cache_tokens=40)
    assert [r.token_ids for r in small.generate(prompts, params)] == alone
    assert small.scheduler.num_preempted > 0
    small.blocks.check()
    assert small.blocks.num_free == small.blocks.num_blocks - 1  # every block came back


def test_seeded_sampling_is_reproducible_and_batch_independent(model64) -> None:
    prompts = _prompts(model64.cfg.vocab_size, (4, 9, 2))
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=s) for s in (7, 8, 9)]
    engine = Engine(model64, None, block_size=4)
    alone = [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    assert [r.token_ids for r in engine.generate(prompts, params)] == alone
    reseeded = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=s) for s in (1, 2, 3)]
    assert [r.token_ids for r in engine.generate(prompts, reseeded)] != alone


def test_sampling_follows_each_requests_temperature_top_k_top_p(make_cfg, make_model) -> None:
    """Interleaved seeded requests of two kinds, T=0.3 with top_k=2 and T=0.8 with top_p=0.7, on a vocabulary
    of 8. Their first two tokens (a prefill draw, then a decode draw) must stay inside each kind's allowed set,
    and their joint frequencies must match the exact P(t1, t2) = r(t1 | prompt) r(t2 | prompt, t1), r being
    softmax(logits / T) restricted and renormalised, from full forwards in float64. Sampling at T=1 alone
    already moves kind 1's P(t1 = argmax) from 0.85 to 0.63, far past the bound (~0.11)."""
    model = make_model(make_cfg(vocab_size=8, num_nextn_predict_layers=0), std=0.3)
    V, prompt, n = 8, [1, 2, 3], 1200
    kinds = [SamplingParams(max_tokens=2, temperature=0.3, top_k=2),
             SamplingParams(max_tokens=2, temperature=0.8, top_p=0.7)]
    with torch.inference_mode():
        first = model(torch.tensor([prompt]), mtp=False).logits[0, -1].double()
        second = model(torch.tensor([[*prompt, t] for t in range(V)]), mtp=False).logits[:, -1].double()
    engine = Engine(model, None, block_size=4, cache_tokens=8 * 2 * n, max_num_seqs=2 * n,
                    max_num_batched_tokens=len(prompt) * 2 * n)
    params = [dataclasses.replace(kind, seed=i) for i in range(n) for kind in kinds]
    out = torch.tensor([r.token_ids for r in engine.generate([prompt] * (2 * n), params)]).view(n, 2, 2)
    for j, kind in enumerate(kinds):
        exact = _reference(first, kind).unsqueeze(1) * torch.stack([_reference(row, kind) for row in second])
        counts = torch.bincount(out[:, j, 0] * V + out[:, j, 1], minlength=V * V).view(V, V)
        assert counts[exact == 0].sum() == 0, kind  # no token outside top-k / the nucleus, at either step
        tv = 0.5 * (counts / n - exact).abs().sum()
        assert tv < tv_bound(exact, n), (kind, tv)


def test_stop_rules_against_reference_output(model64) -> None:
    prompt = _prompts(model64.cfg.vocab_size, (6,), seed=3)[0]
    ref = greedy_reference(model64, prompt, 16)
    tok = CharTokenizer()
    text = tok.decode(ref)

    def run(eos: int | None = None, **kw) -> object:
        return generate(model64, CharTokenizer(eos), prompt, temperature=0, **{"max_tokens": 16, **kw})[0]

    r = run(max_tokens=4)
    assert (r.token_ids, r.text, r.finish_reason) == (ref[:4], text[:4], "length")
    stop_id = ref[5]
    cut = ref.index(stop_id)
    r = run(stop_token_ids=[stop_id])
    assert (r.token_ids, r.text, r.finish_reason) == (ref[: cut + 1], text[:cut], "stop")  # id kept, text not
    r = run(eos=stop_id)
    assert (r.token_ids, r.text, r.finish_reason) == (ref[: cut + 1], text[:cut], "stop")
    r = run(eos=stop_id, ignore_eos=True)
    assert r.token_ids == ref
    stop = text[7:10]  # a stop string spanning three tokens
    r = run(stop=[stop, "never there"])
    assert (r.text, r.finish_reason) == (text[: text.find(stop)], "stop")
    assert run(stop=stop).text == r.text  # one string is one stop string, not one for each of its characters


class OracleDrafter:
    """Drafts the next k tokens of a known greedy continuation: every draft is accepted, so one step appends
    up to k + 1 tokens (random MTP weights would accept none)."""

    def __init__(self, full: list[int], k: int):
        self.full, self.k = full, k

    def after_prefill(self, *args: object) -> None:
        pass

    def after_verify(self, *args: object) -> None:
        pass

    def propose(self, runner, seqs):  # noqa: ANN001, ANN201
        rows = [(self.full[len(s.tokens): len(s.tokens) + self.k] + [0] * self.k)[: self.k] for s in seqs]
        return torch.tensor(rows), None


@pytest.mark.parametrize("k", [1, 4])
def test_stops_inside_accepted_drafts_cut_where_plain_decoding_stops(model64, k) -> None:
    prompt = _prompts(model64.cfg.vocab_size, (6,), seed=3)[0]
    ref = greedy_reference(model64, prompt, 24)
    text = CharTokenizer().decode(ref)
    for kw in (dict(stop=[text[6:8]]), dict(stop=[text[2:3]]), dict(stop_token_ids=[ref[7]]), dict(max_tokens=5)):
        params = SamplingParams(temperature=0, **{"max_tokens": 24, **kw})
        plain = Engine(model64, CharTokenizer(), block_size=4).generate(prompt, params)[0]
        engine = Engine(model64, CharTokenizer(), block_size=4, drafter=OracleDrafter(prompt + ref, k))
        deltas = list(engine.generate(prompt, params, stream=True))
        spec = deltas[-1].result
        assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        assert [t for d in deltas for t in d.token_ids] == spec.token_ids  # streamed ids cut too
        assert spec.accepted == len(spec.token_ids) - spec.num_steps - 1  # what the steps emitted, no more
        assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_a_stream_ends_when_another_call_finishes_or_aborts_its_request(model64) -> None:
    engine = Engine(model64, None, block_size=4)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    alone = engine.generate([1, 2, 3], params)[0]
    a = engine.generate([1, 2, 3], params, stream=True)
    first = next(a)
    engine.generate([4, 5, 6], SamplingParams(max_tokens=20, ignore_eos=True))  # runs a's request to its end
    rest = list(a)  # used to spin forever: a's steps found no work
    assert rest[-1].result is not None and rest[-1].result.token_ids == alone.token_ids
    assert first.token_ids + [t for d in rest for t in d.token_ids] == alone.token_ids
    b = engine.generate([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), stream=True)
    next(b)
    engine.abort(max(engine._seqs))
    assert [(d.finish_reason, d.result) for d in b] == [("abort", None)]
    assert not engine._seqs and engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_a_refused_batch_queues_none_of_its_prompts(model64) -> None:
    engine = Engine(model64, None, block_size=4, cache_tokens=16)
    with pytest.raises(CacheExhausted):
        engine.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=40)])
    assert not engine.has_unfinished() and not engine._seqs
    assert len(engine.generate([7, 8], SamplingParams(max_tokens=2))) == 1


def test_stream_deltas_add_up_and_never_pass_a_stop_string(model64) -> None:
    prompt = _prompts(model64.cfg.vocab_size, (5,), seed=4)[0]
    ref = greedy_reference(model64, prompt, 12)
    text = CharTokenizer().decode(ref)
    stop = text[6:8]
    engine = Engine(model64, CharTokenizer(), block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    deltas = list(engine.generate(prompt, params, stream=True))
    final = deltas[-1].result
    assert final is not None and all(d.result is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == final.text == text[: text.find(stop)]
    assert [t for d in deltas for t in d.token_ids] == final.token_ids


def test_abandoned_stream_frees_its_cache(model64) -> None:
    engine = Engine(model64, None, block_size=4)
    prompts = _prompts(model64.cfg.vocab_size, (3, 7))
    stream = engine.generate(prompts, SamplingParams(max_tokens=50), stream=True)
    next(stream)
    stream.close()
    assert not engine.has_unfinished()
    engine.blocks.check()
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_user_errors_are_clear(model64, tokenizer) -> None:
    engine = Engine(model64, None, max_model_len=16)
    with pytest.raises(ValueError, match="prompt has 16 tokens but the context holds 16"):
        engine.generate([1] * 16)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.generate("hello")
    with pytest.raises(ValueError, match=r"vocab_size"):
        engine.generate([model64.cfg.vocab_size])
    with pytest.raises(ValueError, match="temperature"):
        generate(model64, tokenizer, "hi", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model64, tokenizer, "hi", top_p=0)
    with pytest.raises(ValueError, match="MTP modules"):
        Engine(model64, None, mtp=2)
    with pytest.raises(CacheExhausted, match="raise cache_tokens"):
        Engine(model64, None, cache_tokens=8, block_size=4).generate([1, 2, 3], SamplingParams(max_tokens=10))
    assert not engine.has_unfinished()  # refused requests left nothing queued


@pytest.mark.parametrize("option", ["max_num_seqs", "block_size", "cache_tokens", "max_num_batched_tokens",
                                    "max_model_len"])
def test_engine_sizes_below_one_are_refused_naming_the_option(model64, option) -> None:
    # max_num_seqs=0 admitted nothing and generate() spun for ever; block_size=0 divided by zero; 0 for
    # max_model_len or cache_tokens quietly meant the default
    with pytest.raises(ValueError, match=option):
        Engine(model64, None, **{option: 0})


def test_max_model_len_beyond_the_positions_is_refused(model64) -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model64, None, max_model_len=model64.cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):  # they would be ignored silently
        Engine(model64, None).generate([1, 2], SamplingParams(stop=["x"]))


# -- overlap: the next decode step launched before the current one is read ------------------------------------
def _overlap_matches_plain(model, prompts, params, tokenizer=None, **kw) -> list:
    """Stream `prompts` with overlap on and off: the same deltas (tokens, text, finish reasons, statistics,
    in the same calls), and every cache block back afterwards. Returns the results."""
    runs = []
    for overlap in (True, False):
        engine = Engine(model, tokenizer, block_size=4, overlap=overlap, **kw)
        runs.append(list(engine.generate(prompts, params, stream=True)))
        engine.blocks.check()
        assert engine.blocks.num_free == engine.blocks.num_blocks - 1 and not engine.has_unfinished()
    assert runs[0] == runs[1]
    return sorted((d.result for d in runs[0] if d.result is not None), key=lambda r: r.prompt_token_ids)


def _step_trace(model, prompts, params, tokenizer=None, **kw) -> list:
    """What each step() call returns, with overlap on and off (asserted equal): per call, each sequence's id,
    output and finish reason, so a sequence is reported once when it finishes and never again."""
    runs = []
    for overlap in (True, False):
        engine = Engine(model, tokenizer, block_size=4, overlap=overlap, **kw)
        for p, sp in zip(prompts, params, strict=True):
            engine.add_request(p, sp)
        trace = []
        while engine.has_unfinished():
            trace.append([(s.seq_id, list(s.output), s.finish_reason) for s in engine.step()])
        runs.append(trace)
    assert runs[0] == runs[1]
    return runs[0]


def test_overlap_ragged_greedy_batches_and_a_small_pool(model64, monkeypatch) -> None:
    """Rows finish at different steps (max_tokens 1 ends at the prefill), so the batch launched ahead drops
    rows; a pool too small for all preempts, and the blocks to reserve ahead are refused rather than taken."""
    prompts = _prompts(model64.cfg.vocab_size, (1, 5, 12, 3, 20))
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (3, 9, 1, 14, 6)]
    results = _overlap_matches_plain(model64, prompts, params)
    ref = sorted((p, greedy_reference(model64, p, sp.max_tokens)) for p, sp in zip(prompts, params, strict=True))
    assert [(r.prompt_token_ids, r.token_ids) for r in results] == ref
    reserve_ahead, answers = Scheduler.reserve_ahead, []

    def counted(self, seqs):  # noqa: ANN001, ANN202
        answers.append(reserve_ahead(self, seqs))
        return answers[-1]

    monkeypatch.setattr(Scheduler, "reserve_ahead", counted)
    _overlap_matches_plain(model64, prompts, params, cache_tokens=40)
    assert False in answers and True in answers


def test_overlap_stops_mid_run(model64) -> None:
    """Stop ids, EOS and stop strings end rows while others go on: the row launched ahead is dropped."""
    prompts = _prompts(model64.cfg.vocab_size, (6, 3, 9, 4), seed=3)
    ref = [greedy_reference(model64, p, 16) for p in prompts]
    text = [CharTokenizer().decode(r) for r in ref]
    params = [SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[ref[0][5]]),
              SamplingParams(max_tokens=16, temperature=0, stop=[text[1][7:9]]),
              SamplingParams(max_tokens=16, temperature=0, stop=[text[2][3:4], "never"]),
              SamplingParams(max_tokens=16, temperature=0)]
    results = _overlap_matches_plain(model64, prompts, params, CharTokenizer(eos_id=ref[3][10]))
    assert sorted(r.finish_reason for r in results) == ["stop"] * 4
    assert all(len(r.token_ids) < 16 for r in results)
    trace = _step_trace(model64, prompts, params, CharTokenizer(eos_id=ref[3][10]))
    finished = [sid for call in trace for sid, _, reason in call if reason]
    assert sorted(finished) == [0, 1, 2, 3]  # each reported once


def test_overlap_seeded_sampling(model64) -> None:
    """Sampled rows (with a greedy one) draw their uniforms in the same order: the same tokens. Stop ids
    that end rows at random steps, and the max_tokens of others."""
    prompts = _prompts(model64.cfg.vocab_size, (4, 9, 2, 7))
    params = [SamplingParams(max_tokens=n, temperature=0.9, top_k=40, top_p=0.9, seed=s,
                             stop_token_ids=list(range(0, 300, 23)))
              for n, s in ((12, 1), (5, 2), (15, 3))] + [SamplingParams(max_tokens=10, temperature=0)]
    results = _overlap_matches_plain(model64, prompts, params)
    assert {r.finish_reason for r in results} == {"stop", "length"}
    _step_trace(model64, prompts, params)


def test_overlap_up_to_max_model_len(model64) -> None:
    prompts = _prompts(model64.cfg.vocab_size, (3, 9, 14, 15))
    results = _overlap_matches_plain(model64, prompts, SamplingParams(max_tokens=50, temperature=0),
                                     max_model_len=16)
    assert all(r.finish_reason == "length" and len(r.prompt_token_ids + r.token_ids) == 16 for r in results)


def test_overlap_request_added_while_others_decode(model64) -> None:
    """The next step() completes the step in flight without launching another; the one after prefills."""
    prompts = _prompts(model64.cfg.vocab_size, (4, 9, 6))
    runs = []
    for overlap in (True, False):
        engine = Engine(model64, None, block_size=4, overlap=overlap)
        ids = [engine.add_request(prompts[0], SamplingParams(max_tokens=12, temperature=0)),
               engine.add_request(prompts[1], SamplingParams(max_tokens=7, temperature=0.8, seed=3))]
        for _ in range(4):
            engine.step()
        ids.append(engine.add_request(prompts[2], SamplingParams(max_tokens=9, temperature=0.8, seed=4)))
        if overlap:
            assert [s.seq_id for s in engine.step()] == ids[:2] and engine._inflight is None
        assert [s.seq_id for s in engine.step()] == ids[2:]  # the prefill
        while engine.has_unfinished():
            engine.step()
        runs.append([engine.result(i) for i in ids])
        assert engine.blocks.num_free == engine.blocks.num_blocks - 1
    assert runs[0] == runs[1]
    assert runs[0][0].token_ids == greedy_reference(model64, prompts[0], 12)


def test_overlap_abort_mid_stream(model64) -> None:
    prompts = _prompts(model64.cfg.vocab_size, (4, 9, 6))
    params = SamplingParams(max_tokens=20, temperature=0.7, seed=5)
    runs = []
    for overlap in (True, False):
        engine = Engine(model64, None, block_size=4, overlap=overlap)
        stream = engine.generate(prompts, params, stream=True)
        deltas = [next(stream) for _ in range(7)]
        assert (engine._inflight is not None) == overlap  # its step ahead holds a row of the aborted one
        engine.abort(min(engine._seqs))
        deltas += list(stream)
        runs.append(deltas)
        engine.blocks.check()
        assert engine.blocks.num_free == engine.blocks.num_blocks - 1
    assert runs[0] == runs[1]
    assert [(d.index, d.finish_reason) for d in runs[0] if d.finish_reason] == [(0, "abort"), (1, "length"),
                                                                                (2, "length")]


def test_overlap_abandoned_stream_frees_its_cache(model64) -> None:
    """The step in flight when the consumer stops is dropped unread; its blocks serve the next request."""
    engine = Engine(model64, None, block_size=4)
    stream = engine.generate(_prompts(model64.cfg.vocab_size, (3, 7)), SamplingParams(max_tokens=50), stream=True)
    for _ in range(5):
        next(stream)
    assert engine._inflight is not None
    stream.close()
    assert not engine.has_unfinished() and engine.sync() == []
    engine.blocks.check()
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1
    prompt = _prompts(model64.cfg.vocab_size, (5,), seed=7)[0]
    assert engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0].token_ids == \
        greedy_reference(model64, prompt, 8)


def test_sync_before_using_the_runner_directly(model64) -> None:
    """The decode benchmark's pattern: steps, sync(), a forward of other inputs through the runner's buffers
    (and the cache slot it writes), then more steps. Without sync() the step in flight would be fed from the
    overwritten outputs and its predecessor's slot left wrong."""
    prompt = _prompts(model64.cfg.vocab_size, (6,), seed=1)[0]
    engine = Engine(model64, None, block_size=4)
    sid = engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0))
    for _ in range(3):
        engine.step()
    assert [s.seq_id for s in engine.sync()] == [sid] and engine.sync() == []
    seq = engine.scheduler.running[0]
    with torch.inference_mode():
        engine.runner.prepare_decode([seq], [[(seq.tokens[-1] + 1) % model64.cfg.vocab_size]])
        engine.runner.decode()
    while engine.has_unfinished():
        engine.step()
    assert engine.result(sid).token_ids == greedy_reference(model64, prompt, 10)


def test_overlap_step_interrupted_while_read(model64, monkeypatch) -> None:
    """An exception while a step is read (Ctrl-C during the wait) loses that step and the one launched ahead,
    which follows its tokens: the next steps recompute from the host's state, so the output stays right."""
    prompt = _prompts(model64.cfg.vocab_size, (6,), seed=1)[0]  # ten distinct tokens: a lost one shows
    engine = Engine(model64, None, block_size=4)
    read, reads = engine._read, []

    def interrupted(cur):  # noqa: ANN001, ANN202
        reads.append(cur)
        if len(reads) == 3:
            raise KeyboardInterrupt
        return read(cur)

    monkeypatch.setattr(engine, "_read", interrupted)
    sid = engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0))
    with pytest.raises(KeyboardInterrupt):
        while engine.has_unfinished():
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.result(sid).token_ids == greedy_reference(model64, prompt, 10)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_launches_before_reading(model64, monkeypatch, overlap) -> None:
    """The order of launches (L) and host reads (R) of decode steps. Two rows of 4 and 7 tokens: 6 decode
    steps. With overlap each step after the first is launched before the previous one is read (the 4th
    without the row that the 3rd step's token ends)."""
    engine = Engine(model64, None, block_size=4, overlap=overlap)
    log = []
    decode, read = engine.runner.decode, engine._read
    monkeypatch.setattr(engine.runner, "decode", lambda *a: log.append("L") or decode(*a))
    monkeypatch.setattr(engine, "_read", lambda cur: log.append("R") or read(cur))
    prompts = _prompts(model64.cfg.vocab_size, (5, 3))
    results = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in (4, 7)])
    assert "".join(log) == ("LL" + "RL" * 4 + "RR" if overlap else "LR" * 6)
    assert [r.token_ids for r in results] == [greedy_reference(model64, p, n)
                                              for p, n in zip(prompts, (4, 7), strict=True)]


@pytest.mark.parametrize("mtp", [0, 1])
def test_a_prefill_cut_short_is_run_again(make_cfg, make_model, monkeypatch, mtp) -> None:
    """Ctrl-C inside a prefill (after the scheduler took the batch): its rows go back to waiting and are
    prefilled again, so the output is the greedy reference (it was decoded from an empty cache; with MTP the
    engine then failed on the missing drafter state)."""
    model = make_model(make_cfg(num_nextn_predict_layers=1), dtype=torch.float64)
    prompt = _prompts(model.cfg.vocab_size, (6,), seed=1)[0]
    engine = Engine(model, None, block_size=4, mtp=mtp)
    prefill, calls = engine.runner.prefill, []

    def interrupted(seqs):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return prefill(seqs)

    monkeypatch.setattr(engine.runner, "prefill", interrupted)
    sid = engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0))
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.result(sid).token_ids == greedy_reference(model, prompt, 10)
    assert len(calls) >= 2
    engine.blocks.check()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_step_cut_short_while_its_tokens_are_handed_over(model64, overlap) -> None:
    """Ctrl-C inside the host's bookkeeping of a step (here the tokenizer, after some rows took their tokens
    and before others did): the next steps recompute, so every row's output is still the greedy reference."""

    class Interrupting(CharTokenizer):
        def __init__(self, at: int):
            super().__init__()
            self.calls, self.at = 0, at

        def decode(self, ids: list[int]) -> str:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return super().decode(ids)

    prompts = _prompts(model64.cfg.vocab_size, (5, 9), seed=3)
    want = [greedy_reference(model64, p, 8) for p in prompts]
    for at in (1, 2, 5, 6, 9, 13):
        engine = Engine(model64, Interrupting(at), block_size=4, overlap=overlap)
        ids = [engine.add_request(p, SamplingParams(max_tokens=8, temperature=0)) for p in prompts]
        with pytest.raises(KeyboardInterrupt):
            while engine.has_unfinished():
                engine.step()
        while engine.has_unfinished():
            engine.step()
        assert [engine.result(i).token_ids for i in ids] == want, at
        engine.blocks.check()
        assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_a_stream_closed_before_its_first_delta_frees_its_cache(model64) -> None:
    engine = Engine(model64, None, block_size=4)
    prompts = _prompts(model64.cfg.vocab_size, (5, 9))
    stream = engine.generate(prompts, SamplingParams(max_tokens=40), stream=True)
    stream.close()  # never iterated: a plain generator would not run its cleanup
    assert not engine.has_unfinished() and not engine._seqs
    del stream
    stream = engine.generate(prompts, SamplingParams(max_tokens=40), stream=True)
    del stream  # dropped unread
    assert not engine.has_unfinished() and not engine._seqs
    engine.blocks.check()
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_prompts_as_tensors_arrays_and_numpy_ids(model64) -> None:
    import numpy as np

    engine = Engine(model64, None, block_size=4)
    prompt = _prompts(model64.cfg.vocab_size, (6,), seed=2)[0]
    params = SamplingParams(max_tokens=4, temperature=0)
    want = engine.generate(prompt, params)[0].token_ids
    for p in (torch.tensor(prompt), np.array(prompt), [np.int64(t) for t in prompt]):
        assert engine.generate(p, params)[0].token_ids == want
    assert [r.token_ids for r in engine.generate(torch.tensor([prompt, prompt]), iter([params, params]))] == [want] * 2
