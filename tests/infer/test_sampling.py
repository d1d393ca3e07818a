"""Sampling: parameter checks, temperature/top-k/top-p against a per-row reference, inverse-CDF draws, and
the speculative acceptance rule's output distribution on fixed p and q (no model: many rows at once)."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer.sampling import ARGMAX_CHUNK, SamplingParams, argmax, probabilities, sample, uniforms
from dsv3.infer.speculative import accept_drafts


@pytest.mark.parametrize(("field", "value", "match"), [
    ("temperature", -0.1, "temperature"), ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("max_tokens", 0, "max_tokens"),
    ("stop", [""], "stop"), ("stop_token_ids", [-3], "stop_token_ids"), ("seed", 1.5, "seed"),
    ("seed", 2**70, "seed"),  # would fail later, inside torch.Generator.manual_seed
    ("stop_token_ids", 7, "stop_token_ids"), ("stop", None, "stop"),  # not lists: a TypeError naming neither
])
def test_bad_values_raise_naming_the_field(field, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_numpy_and_torch_integers_are_integers() -> None:
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(5), top_k=torch.tensor(3).item(), seed=np.uint32(7),
                       stop_token_ids=(np.int32(2),))
    assert (p.max_tokens, p.top_k, p.seed, p.stop_token_ids) == (5, 3, 7, [2])
    assert all(type(v) is int for v in (p.max_tokens, p.top_k, p.seed, *p.stop_token_ids))


def _reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, by the book: sort (ties to the lower index), keep top_k, then the smallest prefix with mass >=
    top_p, renormalise."""
    if p.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).double()
    probs = (logits.double() / p.temperature).softmax(-1)
    order = probs.argsort(descending=True, stable=True).tolist()
    kept = order[: p.top_k] if p.top_k else order
    mass, nucleus = 0.0, []
    sub = probs[kept] / probs[kept].sum()
    for i, tok in enumerate(kept):
        nucleus.append(tok)
        mass += float(sub[i])
        if mass >= p.top_p:
            break
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus] / probs[nucleus].sum()
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_two_pass_argmax_is_torch_argmax(device) -> None:
    """First index on ties (values drawn from 3 levels, so most rows tie across chunks), NaN as the largest,
    eagerly and under torch.compile, for widths that take the two passes and ones that do not."""
    g = torch.Generator().manual_seed(0)
    hand = torch.zeros(1, 4 * ARGMAX_CHUNK)
    hand[0, [ARGMAX_CHUNK + 7, 3 * ARGMAX_CHUNK + 1]] = 2.0  # the same maximum in two chunks: the first
    assert argmax(hand).tolist() == [ARGMAX_CHUNK + 7]
    compiled = torch.compile(argmax, backend="inductor", dynamic=False)
    for V in (8 * ARGMAX_CHUNK, ARGMAX_CHUNK, 1000):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randint(0, 3, (3, 2, V), generator=g).to(device, dtype)
            x[1, 0, V // 2] = float("nan")
            x[2, 1, [5, V - 3]] = float("nan")
            want = x.argmax(-1)
            assert torch.equal(argmax(x), want) and torch.equal(compiled(x), want)
            torch._dynamo.reset()  # the next width compiles afresh
            assert want[1, 0] == V // 2 and want[2, 1] == 5


def test_probabilities_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 50, generator=g) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(top_k=5),
              SamplingParams(top_p=0.6), SamplingParams(temperature=1.3, top_k=10, top_p=0.8),
              SamplingParams(temperature=2.0, top_p=0.05)]
    got = probabilities(logits, params)
    assert got.shape == logits.shape
    for b, p in enumerate(params):
        for s in range(3):
            torch.testing.assert_close(got[b, s].double(), _reference(logits[b, s], p), rtol=0, atol=1e-6)


def test_largest_is_a_stable_sort_prefix() -> None:
    # the CPU's topk over (value, -index) keys against the stable sort the GPU runs: signs, zeros of both
    # signs (equal, so tied), infinities, and many ties
    from dsv3.infer.sampling import _largest

    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (5, 2, 300), generator=g).float() * 0.25
    x[0, 0, :6] = torch.tensor([-0.0, 0.0, float("inf"), float("-inf"), 1e-30, -1e-30])
    x[1] = -x[1]
    for k in (1, 7, 60, 299, 300):
        xs, idx = _largest(x, k)
        ws, wi = x.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(idx, wi[..., :k]) and torch.equal(xs, ws[..., :k])


def test_tied_logits_keep_the_lower_index_whatever_the_batch() -> None:
    # bf16 logits tie often: which tied token makes a top-k / top-p cut must not depend on the other rows'
    # settings (the batch's largest top_k decided it, so a seeded request's tokens changed with its neighbours)
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 6, (4, 2, 64), generator=g).float() * 0.5  # six levels: ties at every cut
    rows = [SamplingParams(top_k=1), SamplingParams(top_k=3, top_p=0.81), SamplingParams(top_p=0.37),
            SamplingParams(temperature=0.7, top_k=9)]
    for b, p in enumerate(rows):
        want = torch.stack([_reference(logits[b, s], p) for s in range(2)])
        for neighbour in (None, SamplingParams(top_p=0.5), SamplingParams(top_k=40), SamplingParams(top_k=2)):
            batch = [p] if neighbour is None else [p, neighbour]
            got = probabilities(logits[[b] * len(batch)], batch)[0]
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_a_row_without_limits_keeps_its_whole_distribution_beside_limited_rows() -> None:
    # a large vocabulary: float32 cumulative sums reach 1.0 before the tail, which top_p = 1 must still keep
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 129_280, generator=g) * 2
    plain = SamplingParams(temperature=1.0)
    got = probabilities(logits, [plain, SamplingParams(top_k=5)])[0]
    torch.testing.assert_close(got, probabilities(logits[:1], [plain])[0], rtol=1e-5, atol=0)
    assert bool((got > 0).all())


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-50),
                                    SamplingParams(temperature=5e-324), SamplingParams(top_p=1e-46),
                                    SamplingParams(top_p=5e-324, top_k=3)])
def test_a_tiny_temperature_or_top_p_is_the_argmax_not_nan(params) -> None:
    # 1e-40 is a float32 subnormal; 1e-50, 1e-46 and 5e-324 round to 0 in float32, where 0 / 0 or an empty
    # nucleus would leave a row of NaN (and `sample` its last index)
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    probs = probabilities(logits, [params])
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert sample(probs, torch.tensor([0.99], dtype=torch.float64)).tolist() == [1]


def test_sample_follows_probs() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    u = uniforms([torch.Generator().manual_seed(1)], 200_000, "cpu")[0]
    draws = sample(probs.expand(len(u), -1), u)
    freq = torch.bincount(draws, minlength=6).double() / len(u)
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert (freq - probs.double()).abs().max() < 0.005  # binomial sd ~0.0011
    onehot = torch.zeros(4, 6).scatter_(1, torch.tensor([[5], [0], [2], [3]]), 1.0)
    u = torch.tensor([0.0, 0.999999, 0.5, 0.3], dtype=torch.float64)
    assert sample(onehot, u).tolist() == [5, 0, 2, 3]


def _resample_from_p(p, q, drafts, u):
    """A WRONG rule: on rejection draw from p, not norm(max(0, p - q)). Over-weights the draft's tokens."""
    accepted, _ = accept_drafts(p, q, drafts, u)
    at = accepted.view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    return accepted, sample(p.gather(1, at).squeeze(1), u[:, -1])


def _emitted_distributions(rule, p, q, n: int, seed: int) -> list[torch.Tensor]:
    """Empirical distribution of emitted token j given that it was emitted this step, j = 0..k."""
    k, V = q.shape[0], q.shape[1]
    g = torch.Generator().manual_seed(seed)
    drafts = sample(q.expand(n, k, V), torch.rand(n, k, generator=g, dtype=torch.float64))
    u = torch.rand(n, k + 1, generator=g, dtype=torch.float64)
    accepted, nxt = rule(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, u)
    emitted = torch.cat([drafts, nxt.unsqueeze(1)], 1).scatter(1, accepted.unsqueeze(1), nxt.unsqueeze(1))
    out = []
    for j in range(k + 1):
        rows = accepted >= j  # token j is emitted when the first j drafts were accepted
        out.append(torch.bincount(emitted[rows, j], minlength=V).double() / rows.sum())
    return out


def test_acceptance_rule_preserves_target_distribution() -> None:
    """With targets p_j that ignore the context, emitted token j (when emitted) must be distributed as p_j,
    whatever the draft distribution q. 400k rows: sampling noise in total variation ~0.003; the bound 0.01
    passes the right rule and fails the plausible wrong one (resampling from p after a rejection, TV ~0.1)."""
    g = torch.Generator().manual_seed(0)
    k, V = 3, 6
    p = (torch.randn(k + 1, V, generator=g) * 1.5).softmax(-1)
    q = (torch.randn(k, V, generator=g) * 1.5).softmax(-1)  # a different, fixed draft distribution
    right = _emitted_distributions(accept_drafts, p, q, 400_000, seed=1)
    for j in range(k + 1):
        tv = 0.5 * (right[j] - p[j].double()).abs().sum()
        assert tv < 0.01, (j, tv)
    wrong = _emitted_distributions(_resample_from_p, p, q, 400_000, seed=1)
    assert 0.5 * (wrong[0] - p[0].double()).abs().sum() > 0.03


def test_acceptance_rule_is_exact_for_greedy() -> None:
    """One-hot p and q: keep drafts up to the first that differs from the target argmax, then the argmax."""
    target = torch.tensor([[3, 1, 4, 1], [3, 1, 4, 1], [3, 1, 4, 1], [2, 7, 1, 8]])
    drafts = torch.tensor([[3, 1, 4], [3, 0, 4], [5, 1, 4], [2, 7, 1]])
    p = torch.nn.functional.one_hot(target, 9).float()
    q = torch.nn.functional.one_hot(drafts, 9).float()
    u = torch.rand(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    accepted, nxt = accept_drafts(p, q, drafts, u)
    assert accepted.tolist() == [3, 1, 0, 3]
    assert nxt.tolist() == [1, 1, 3, 8]
