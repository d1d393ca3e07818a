"""Bits per byte against a hand computation, and the sampling loop."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dsv3.data.dataset import Batch
from dsv3.model.transformer import DeepSeekV3Output
from dsv3.train.evaluate import evaluate, sample


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same at every position: softmax([0, 1, 2, 3])."""

    def forward(self, tokens, doc_ids=None):
        B, S = tokens.shape
        logits = torch.arange(4.0).expand(B, S, 4)
        return DeepSeekV3Output(logits=logits, hidden=torch.zeros(B, S, 1), mtp_logits=[logits])


def test_bits_per_byte_by_hand():
    tokens = torch.tensor([[3, 0, 2, 1], [1, 1, 3, 0]])  # targets: 0 2 1 | 1 3 0
    token_bytes = np.array([0, 1, 2, 4])  # id 0 is a special token: no bytes, but its loss counts
    z = math.log(sum(math.exp(i) for i in range(4)))
    nll = {i: z - i for i in range(4)}  # -log softmax
    targets = [0, 2, 1, 1, 3, 0]
    nats = sum(nll[t] for t in targets)
    nbytes = sum(int(token_bytes[t]) for t in targets)  # 0 + 2 + 1 + 1 + 4 + 0 = 8 (the inputs hold 12)
    res = evaluate(FixedLogits(), [Batch(tokens, None)], token_bytes)
    assert res.tokens == 6 and res.bytes == nbytes == 8
    assert math.isclose(res.loss, nats / 6, rel_tol=1e-6)
    assert math.isclose(res.bpb, nats / (math.log(2) * 8), rel_tol=1e-6)
    # MTP depth 1 at input position i predicts targets[i + 1]: targets 2 1 | 3 0
    assert math.isclose(res.mtp[0], sum(nll[t] for t in [2, 1, 3, 0]) / 4, rel_tol=1e-6)


class DocLogits(nn.Module):
    """Logits [d, 0, 0, 0] at a token of document d when given doc_ids (masking on), [0, 0, 0, 0] without."""

    def forward(self, tokens, doc_ids=None):
        B, S = tokens.shape
        logits = torch.zeros(B, S, 4)
        if doc_ids is not None:
            logits[..., 0] = doc_ids.float()
        return DeepSeekV3Output(logits=logits, hidden=torch.zeros(B, S, 1), mtp_logits=[])


def test_doc_mask_reaches_the_model():
    tokens = torch.tensor([[0, 0, 0, 0]])  # every target is id 0
    doc_ids = torch.tensor([[0, 0, 1]])  # document of each input token
    batch = [Batch(tokens, doc_ids)]
    nb = np.ones(4, dtype=np.int64)
    # -log softmax([d, 0, 0, 0])[0] = log(e^d + 3) - d
    want = sum(math.log(math.exp(d) + 3) - d for d in (0, 0, 1)) / 3
    assert math.isclose(evaluate(DocLogits(), batch, nb, doc_mask=True).loss, want, rel_tol=1e-6)
    assert math.isclose(evaluate(DocLogits(), batch, nb).loss, math.log(4), rel_tol=1e-6)  # masking off


def test_sample_greedy_and_seeded(loop_tok_dir, monkeypatch):
    import copy

    from dsv3.data.tokenizer import Tokenizer
    from dsv3.model import DeepSeekV3
    from tests.train.conftest import tiny_config

    tok = Tokenizer.from_pretrained(loop_tok_dir)  # 300 ids; the model has 320 rows, 20 of them padding
    n = len(tok)
    assert n == 300
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=320))
    model.init_weights(0.2)
    with torch.no_grad():  # make the padding rows the favourites: sampling must still never produce them
        g = torch.Generator().manual_seed(0)
        model.lm_head.weight[n:] = torch.randn(320 - n, model.lm_head.weight.shape[1], generator=g) * 2
    ref_model = copy.deepcopy(model).double().eval()  # the reference: the same weights, float64 forward
    prompt = "def f(x):"
    prompt_ids = tok.encode(prompt)

    def ref_logits(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return ref_model(torch.tensor([prompt_ids + prefix]), mtp=False).logits[0, -1]

    # the setup has teeth: unmasked, a padding row would win the first step
    assert int(ref_logits([]).argmax()) >= n

    decoded: list[list[int]] = []  # every id list that sample() hands to the tokenizer
    real_decode = tok.decode

    def spy(ids):
        ids = [int(i) for i in ids]
        decoded.append(ids)
        return real_decode(ids)

    monkeypatch.setattr(tok, "decode", spy)

    # greedy: every step is the float64 argmax over the tokenizer's ids (1e-4: float32 vs float64 ties)
    a = sample(model, tok, prompt, max_new_tokens=6)
    greedy = decoded[-1]
    assert a == real_decode(greedy) and 0 < len(greedy) <= 6
    for t, nxt in enumerate(greedy):
        ref = ref_logits(greedy[:t])
        assert nxt < n, f"greedy step {t} produced padding id {nxt}"
        assert int(ref.argmax()) >= n  # ... and at every later step
        assert ref[nxt] >= ref[:n].max() - 1e-4, f"greedy step {t}: {nxt} is not the argmax"
    assert a == sample(model, tok, prompt, max_new_tokens=6)

    # top-k sampling: every sampled id is a real token among the k best of the reference logits at its step
    k, seen, drawn = 10, 0, set()
    for seed in range(4):
        b = sample(model, tok, prompt, max_new_tokens=8, temperature=1.0, top_k=k, seed=seed)
        ids = decoded[-1]
        drawn.add(tuple(ids))
        assert b == real_decode(ids) and len(ids) <= 8
        for t, nxt in enumerate(ids):
            assert nxt < n, f"seed {seed} step {t} produced padding id {nxt}"
            ref = ref_logits(ids[:t])[:n]
            kth = ref.topk(k).values[-1]
            assert ref[nxt] >= kth - 1e-4, f"seed {seed} step {t}: {nxt} is outside the top {k}"
            seen += 1
        assert b == sample(model, tok, prompt, max_new_tokens=8, temperature=1.0, top_k=k, seed=seed)
    assert seen >= 16  # enough sampled steps that ignoring top_k would show
    assert len(drawn) > 1  # the seed is the draws' (four seeds, one output: a seed ignored)
    # EOS ends the text before it: the greedy run again with its third token as EOS
    monkeypatch.setattr(tok, "eos_id", greedy[2])
    sample(model, tok, prompt, max_new_tokens=6)
    assert decoded[-1] == greedy[: greedy.index(greedy[2])]
    assert all(i < n for ids in decoded for i in ids)
