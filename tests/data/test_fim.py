import math
import random

import pytest
import tokenizers
import torch

from dsv3.data.dataset import encode_documents
from dsv3.data.fim import fim_split, psm
from dsv3.data.tokenizer import BOS, EOS, Tokenizer

DOC = "def square(x):\n    return x * x\n\nprint(square(12))\n"


def test_psm_layout_exact(small_tok, v3_tok):
    for tok in (small_tok, v3_tok):
        prefix, middle, suffix = fim_split(DOC, seed=3, fim_rate=1.0)
        assert prefix + middle + suffix == DOC
        [ids] = encode_documents([DOC], tok, fim_rate=1.0, seed=3)
        p, m, s = (tok.encode(part, bos=False) for part in (prefix, middle, suffix))
        assert ids == [tok.bos_id, tok.fim_begin, *p, tok.fim_hole, *s, tok.fim_end, *m, tok.eos_id]
    # with V3's real ids: BOS, <｜fim▁begin｜> ... and EOS last
    assert ids[:2] == [0, 128801] and ids[-1] == 1 and ids.count(128800) == ids.count(128802) == 1
    text = v3_tok.decode(ids)
    assert text == f"{BOS}<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}{EOS}"


def test_no_fim_is_plain_document(small_tok):
    [ids] = encode_documents([DOC], small_tok, fim_rate=0.0)
    assert ids == [0, *small_tok.encode(DOC, bos=False), 1]
    [ids] = encode_documents([DOC], small_tok, fim_rate=0.0, bos=False)
    assert ids == [*small_tok.encode(DOC, bos=False), 1]


def test_fim_rate_and_determinism():
    docs = [f"document {i}: " + "x = 1\n" * (i % 13 + 1) for i in range(4000)]
    chosen = [fim_split(d, seed=0, fim_rate=0.1) is not None for d in docs]
    # binomial(4000, 0.1): mean 400, sd 19; a seeded draw must lie within 5 sd
    assert abs(sum(chosen) - 400) < 5 * math.sqrt(4000 * 0.1 * 0.9)
    assert chosen == [fim_split(d, seed=0, fim_rate=0.1) is not None for d in docs]  # same seed, same result
    other = [fim_split(d, seed=1, fim_rate=0.1) is not None for d in docs]
    assert other != chosen and abs(sum(other) - 400) < 5 * math.sqrt(4000 * 0.1 * 0.9)
    # a document's split depends on itself and the seed only, not on its neighbours
    alone = fim_split(docs[7], 5, 1.0)
    random.seed(123)  # nor on any global RNG's state
    torch.manual_seed(123)
    for d in docs[:7]:
        fim_split(d, 5, 1.0)
    assert fim_split(docs[7], 5, 1.0) == alone
    cuts = {tuple(map(len, fim_split(d, 0, 1.0))) for d in docs[:200]}
    assert len(cuts) > 100  # cut points vary from document to document


def test_cut_points_cover_the_document():
    text = "abcdefghij"
    seen = set()
    for seed in range(2000):
        p, m, s = fim_split(text, seed, 1.0)
        assert p + m + s == text
        seen.add((len(p), len(p) + len(m)))
    # two uniform cuts over positions 0..10: every ordered pair (i <= j) occurs
    assert seen == {(i, j) for i in range(11) for j in range(i, 11)}


def test_fim_needs_fim_tokens():
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.add_special_tokens([BOS, EOS])
    with pytest.raises(ValueError, match="fim"):
        psm([], [], [], Tokenizer(raw))
