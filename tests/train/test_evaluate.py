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
    tokens = torch.tensor([[0, 3, 2, 1], [1, 1, 3, 0]])  # targets: 3 2 1 | 1 3 0
    token_bytes = np.array([0, 1, 2, 4])  # id 0 is a special token: no bytes, but its loss counts
    z = math.log(sum(math.exp(i) for i in range(4)))
    nll = {i: z - i for i in range(4)}  # -log softmax
    targets = [3, 2, 1, 1, 3, 0]
    nats = sum(nll[t] for t in targets)
    nbytes = sum(int(token_bytes[t]) for t in targets)  # 4 + 2 + 1 + 1 + 4 + 0 = 12
    res = evaluate(FixedLogits(), [Batch(tokens, None)], token_bytes)
    assert res.tokens == 6 and res.bytes == nbytes == 12
    assert math.isclose(res.loss, nats / 6, rel_tol=1e-6)
    assert math.isclose(res.bpb, nats / (math.log(2) * 12), rel_tol=1e-6)
    # MTP depth 1 at input position i predicts targets[i + 1]: targets 2 1 | 3 0
    assert math.isclose(res.mtp[0], sum(nll[t] for t in [2, 1, 3, 0]) / 4, rel_tol=1e-6)


def test_sample_greedy_and_seeded(loop_tok_dir):
    from dsv3.data.tokenizer import Tokenizer
    from dsv3.model import DeepSeekV3
    from tests.train.conftest import tiny_config

    tok = Tokenizer.from_pretrained(loop_tok_dir)  # 300 ids; the model has 320 rows, 20 of them padding
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=320))
    model.init_weights(0.2)
    with torch.no_grad():  # make a padding row the favourite: sampling must still never produce it
        model.lm_head.weight[310] = model.norm.weight.detach() * 5
    prompt = "def f(x):"
    a = sample(model, tok, prompt, max_new_tokens=5)
    logits = model(torch.tensor([tok.encode(prompt)]), mtp=False).logits[0, -1]
    first = tok.decode([int(logits[: len(tok)].argmax())])
    assert a.startswith(first) and a == sample(model, tok, prompt, max_new_tokens=5)
    b = sample(model, tok, prompt, max_new_tokens=5, temperature=1.0, top_k=10, seed=3)
    assert b == sample(model, tok, prompt, max_new_tokens=5, temperature=1.0, top_k=10, seed=3)
