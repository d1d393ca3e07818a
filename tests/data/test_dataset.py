import json

import numpy as np
import pytest
import torch

from dsv3.data.corpus import is_validation
from dsv3.data.dataset import TokenDataset, encode_documents, pack_documents, tokenize_corpus
from dsv3.data.tokenizer import BOS, EOS, Tokenizer, train_bpe

# hand-made documents as token ids: BOS (0) ... EOS (1)
DOCS = [[0, 10, 11, 12, 1], [0, 20, 21, 1], [0, 30, 1]]


def test_pack_documents():
    stream, starts = pack_documents(DOCS)
    assert stream.dtype == np.uint32 and stream.tolist() == [0, 10, 11, 12, 1, 0, 20, 21, 1, 0, 30, 1]
    assert starts.tolist() == [0, 5, 9, 12]


def test_sequences_and_doc_ids_exact():
    stream, starts = pack_documents(DOCS)
    ds = TokenDataset(stream, 3, 8, doc_starts=starts, shuffle=False, doc_ids=True)
    assert ds.n_sequences == 3  # (12 - 1) // 3: windows of 4 tokens, one shared between neighbours
    [b] = ds.iter_in_order()
    assert b.tokens.dtype == torch.int64
    assert b.tokens.tolist() == [[0, 10, 11, 12], [12, 1, 0, 20], [20, 21, 1, 0]]
    # document of each input token (positions 0-2, 3-5, 6-8), numbered from 0 within its row
    assert b.doc_ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    ds = TokenDataset(stream, 4, 2, doc_starts=starts, shuffle=False, doc_ids=True)
    [b] = ds.iter_in_order()
    assert b.tokens.tolist() == [[0, 10, 11, 12, 1], [1, 0, 20, 21, 1]]
    assert b.doc_ids.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]
    assert TokenDataset(stream, 4, 2).sequences(np.array([1])).doc_ids is None  # only when asked


def test_documents_joined_with_eos(small_tok):
    texts = ["first doc", "second\ndoc", "third 文档"]
    stream, starts = pack_documents(encode_documents(texts, small_tok, fim_rate=0.0))
    expect = [t for text in texts for t in [0, *small_tok.encode(text, bos=False), 1]]
    assert stream.tolist() == expect
    assert [stream[s] for s in starts[:-1]] == [0, 0, 0] and [stream[s - 1] for s in starts[1:]] == [1, 1, 1]
    assert small_tok.decode(stream) == "".join(f"{BOS}{t}{EOS}" for t in texts)


def test_special_token_strings_in_a_document_are_text(small_tok, v3_tok):
    # a document that quotes the markers (this repository's own sources do) must not end early or hold a FIM
    # layout it did not get, and all of its bytes count in bits per byte
    for tok in (small_tok, v3_tok):
        marks = [tok.tokenizer.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.fim_begin, tok.fim_hole)]
        text = f"x = {marks[1]!r}\n# {marks[2]} prefix {marks[3]} suffix\n{marks[0]}"
        (doc,) = encode_documents([text], tok, fim_rate=0.0)
        specials = {tok.bos_id, tok.eos_id, tok.fim_begin, tok.fim_hole, tok.fim_end}
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and not specials & set(doc[1:-1])
        assert tok.decode(doc[1:-1]) == text
        assert tok.token_bytes()[doc].sum() == len(text.encode("utf-8"))
        assert tok.eos_id in tok.encode(text)  # prompts keep them: a chat turn is written with its markers


def test_shuffled_epochs_cover_every_sequence():
    stream = np.arange(1 + 10 * 4, dtype=np.uint32)  # 10 sequences of 4 (+1) tokens
    ds = TokenDataset(stream, 4, 5, seed=1)
    epochs = []
    for _ in range(3):
        firsts = [int(x) // 4 for _ in range(2) for x in next(ds).tokens[:, 0]]
        epochs.append(firsts)
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and ds.epoch == 2
    first = TokenDataset(stream, 4, 5, seed=1).next_batch().tokens[:, 0]
    assert [int(x) // 4 for x in first] == epochs[0][:5]
    assert TokenDataset(stream, 4, 5, seed=2).next_batch().tokens.tolist() != \
        TokenDataset(stream, 4, 5, seed=1).next_batch().tokens.tolist()
    # a tail that does not fill a batch waits for the next epoch's shuffle
    ds = TokenDataset(stream, 4, 3, seed=1)
    [next(ds) for _ in range(3)]
    assert (ds.epoch, ds.position) == (0, 9)
    next(ds)
    assert (ds.epoch, ds.position) == (1, 3)


def test_resume_gives_identical_batches():
    stream = np.random.default_rng(0).integers(0, 500, 1 + 37 * 8).astype(np.uint32)
    starts = np.array([0, 50, 130, len(stream)])
    ds = TokenDataset(stream, 8, 4, doc_starts=starts, seed=7, doc_ids=True)
    sizes = [4, 4, 2, 6, 4, 4, 4, 3, 5, 4, 4, 4]  # a batch-size ramp, crossing epoch boundaries
    for b in sizes[:5]:
        ds.next_batch(b)
    state = json.loads(json.dumps(ds.state_dict()))  # it is a small plain dict
    rest = [ds.next_batch(b) for b in sizes[5:]]
    again = TokenDataset(stream, 8, 4, doc_starts=starts, seed=0, doc_ids=True)
    again.load_state_dict(state)
    for a, b, n in zip(rest, (again.next_batch(b) for b in sizes[5:]), sizes[5:], strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids) and len(a.tokens) == n
    assert ds.epoch >= 1
    with pytest.raises(ValueError, match="seq_len"):
        TokenDataset(stream, 16, 4).load_state_dict(state)
    other = stream.copy()
    other[len(other) // 2] += 1  # one token of another corpus (FIM rate, tokenizer...): as many sequences
    with pytest.raises(ValueError, match="training data differs"):
        TokenDataset(other, 8, 4, doc_starts=starts).load_state_dict(state)


def test_validation_order_is_fixed():
    stream = np.arange(1 + 10 * 4, dtype=np.uint32)
    ds = TokenDataset(stream, 4, 3, shuffle=False)
    batches = list(ds.iter_in_order())
    assert [len(b.tokens) for b in batches] == [3, 3, 3, 1]
    assert torch.cat([b.tokens for b in batches])[:, 0].tolist() == list(range(0, 40, 4))
    assert len(list(ds.iter_in_order(max_batches=2))) == 2 and ds.state_dict()["position"] == 0


def test_sampled_validation_order_covers_every_sequence_once():
    stream = np.arange(1 + 10 * 4, dtype=np.uint32)
    ds = TokenDataset(stream, 4, 3, shuffle=False)
    firsts = [torch.cat([b.tokens for b in ds.iter_in_order(sample_seed=s)])[:, 0].tolist() for s in (1, 1, 2)]
    assert sorted(firsts[0]) == list(range(0, 40, 4))  # every sequence once
    assert firsts[0] == firsts[1] != firsts[2]  # the seed decides the order
    assert firsts[0] != list(range(0, 40, 4))
    [b] = ds.iter_in_order(batch_size=2, max_batches=1, sample_seed=1)
    assert b.tokens[:, 0].tolist() == firsts[0][:2] and ds.state_dict()["position"] == 0


def test_dataset_errors():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenDataset(np.arange(5, dtype=np.uint32), 8, 1)
    with pytest.raises(ValueError, match="doc_starts"):
        TokenDataset(np.arange(50, dtype=np.uint32), 8, 1, doc_ids=True)
    with pytest.raises(ValueError, match="exceeds"):
        TokenDataset(np.arange(50, dtype=np.uint32), 8, 1).next_batch(7)


def make_corpus(root):
    root.mkdir()
    texts = [f"def f{i}(x):\n    return x + {i}  # 第{i}个\n" * (1 + i % 5) for i in range(120)]
    for i, t in enumerate(texts[:60]):
        (root / f"m{i:03d}.py").write_text(t, encoding="utf-8")
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[60:]))
    return texts  # in file order: m000.py ... m059.py, then more.jsonl


def test_token_cache_contents(small_tok, tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    caches = tokenize_corpus(small_tok, tmp_path / "corpus", cache_dir=tmp_path / "cache", fim_rate=0.5,
                             seed=3, val_fraction=0.1, progress=False)
    val = [t for t in texts if is_validation(t, 0.1)]
    train = [t for t in texts if not is_validation(t, 0.1)]
    assert 0 < len(val) < len(train)
    # train: FIM applied (deterministically per document); val: plain documents
    for split, docs, rate in (("train", train, 0.5), ("val", val, 0.0)):
        stream, starts = pack_documents(encode_documents(docs, small_tok, fim_rate=rate, seed=3))
        c = caches[split]
        assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint32
        assert np.array_equal(c.tokens, stream) and np.array_equal(c.doc_starts, starts)
        assert c.meta["splits"][split] == {"n_docs": len(docs), "n_tokens": len(stream),
                                           "n_bytes": sum(len(t.encode()) for t in docs)}
    assert small_tok.fim_begin in caches["train"].tokens and small_tok.fim_begin not in caches["val"].tokens
    # document ids step up exactly where a document's BOS is
    b = caches["train"].dataset(32, 16, doc_ids=True, shuffle=False).next_batch()
    steps = (b.doc_ids[:, 1:] - b.doc_ids[:, :-1]).bool()
    assert torch.equal(steps, b.tokens[:, 1:-1] == small_tok.bos_id)


def test_token_cache_reused_and_invalidated(small_tok, v3_tok, tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    kw = dict(cache_dir=tmp_path / "cache", val_fraction=0.1, progress=False)
    first = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    path, mtime = first["train"].path, (first["train"].path / "meta.json").stat().st_mtime_ns
    calls = []
    real = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))

    again = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)  # second run: nothing re-tokenised
    assert not calls and again["train"].path == path and (path / "meta.json").stat().st_mtime_ns == mtime
    assert np.array_equal(again["train"].tokens, first["train"].tokens)

    paths = {path}
    for change in (dict(fim_rate=0.2), dict(seed=1), dict(val_fraction=0.2), dict(bos=False)):
        calls.clear()
        c = tokenize_corpus(small_tok, tmp_path / "corpus", **{**kw, **change})
        assert calls and c["train"].path not in paths, change
        paths.add(c["train"].path)
    calls.clear()
    c = tokenize_corpus(v3_tok, tmp_path / "corpus", **kw)  # another tokenizer
    assert calls and c["train"].path not in paths and c["train"].tokens.max() > 512
    calls.clear()
    (tmp_path / "corpus" / "m000.py").write_text("changed = True\n")  # an edited corpus
    c = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    assert calls and c["train"].path != path


def test_token_cache_of_another_tokenizer_with_the_same_special_ids_is_its_own(small_tok, tmp_path):
    # two BPEs trained on different text: the same special-token ids (0..7), other merges. The second must get
    # its own tokens, not the first one's cache, and the first one's cache stays valid beside it
    texts = make_corpus(tmp_path / "corpus")
    other = train_bpe(texts, 300)
    ids = [(t.bos_id, t.eos_id, t.fim_begin, t.fim_hole, t.fim_end) for t in (small_tok, other)]
    assert ids[0] == ids[1] and small_tok.fingerprint != other.fingerprint
    kw = dict(cache_dir=tmp_path / "cache", val_fraction=0.1, fim_rate=0.0, progress=False)
    first = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    second = tokenize_corpus(other, tmp_path / "corpus", **kw)
    train = [t for t in texts if not is_validation(t, 0.1)]
    for tok, cache in ((small_tok, first), (other, second)):
        stream, starts = pack_documents([[0, *tok.encode(t, bos=False), 1] for t in train])
        assert np.array_equal(cache["train"].tokens, stream) and np.array_equal(cache["train"].doc_starts, starts)
    assert second["train"].path != first["train"].path
    mtime = (first["train"].path / "meta.json").stat().st_mtime_ns
    assert tokenize_corpus(small_tok, tmp_path / "corpus", **kw)["train"].path == first["train"].path
    assert (first["train"].path / "meta.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_token_cache_without_bos(small_tok, tmp_path):
    # bos=False: each document is `body EOS`, in the cache as in encode_documents
    texts = make_corpus(tmp_path / "corpus")
    caches = tokenize_corpus(small_tok, tmp_path / "corpus", cache_dir=tmp_path / "cache", val_fraction=0.1,
                             fim_rate=0.0, bos=False, progress=False)
    for split, docs in (("train", [t for t in texts if not is_validation(t, 0.1)]),
                        ("val", [t for t in texts if is_validation(t, 0.1)])):
        bodies = [small_tok.encode(t, bos=False) for t in docs]
        c = caches[split]
        assert c.tokens.tolist() == [i for b in bodies for i in [*b, 1]], split
        assert c.doc_starts.tolist() == np.cumsum([0] + [len(b) + 1 for b in bodies]).tolist(), split
        assert small_tok.bos_id not in c.tokens and c.meta["settings"]["bos"] is False


def test_token_cache_ignores_incomplete_build(small_tok, tmp_path):
    make_corpus(tmp_path / "corpus")
    kw = dict(cache_dir=tmp_path / "cache", val_fraction=0.0, progress=False)
    c = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    assert len(c["val"].tokens) == 0 and c["val"].meta["splits"]["val"]["n_docs"] == 0  # empty split is fine
    n = len(c["train"].tokens)
    (c["train"].path / "meta.json").unlink()  # as if interrupted before the sidecar was written
    (c["train"].path / "train.tokens.u32").write_bytes(b"")
    again = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    assert len(again["train"].tokens) == n


def test_token_cache_cut_short_is_rebuilt(small_tok, tmp_path):
    # meta.json says complete, but a power loss after the rename cut the token file: not to be trusted
    make_corpus(tmp_path / "corpus")
    kw = dict(cache_dir=tmp_path / "cache", val_fraction=0.0, progress=False)
    c = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    want = c["train"].tokens.tolist()
    path = c["train"].path / "train.tokens.u32"
    path.write_bytes(path.read_bytes()[:400])
    assert tokenize_corpus(small_tok, tmp_path / "corpus", **kw)["train"].tokens.tolist() == want


def test_token_cache_finished_by_another_process_is_kept(small_tok, tmp_path, monkeypatch):
    # two runs build the same cache at once: the later one must not delete the one the first just finished
    import dsv3.data.dataset as dataset

    make_corpus(tmp_path / "corpus")
    kw = dict(cache_dir=tmp_path / "cache", val_fraction=0.0, progress=False)
    first = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    root = first["train"].path
    real_valid, calls = dataset._valid, []

    def valid_after_the_first_check(path, settings):  # noqa: ANN001, ANN202 - the first run's cache "appears"
        calls.append(path)
        return len(calls) > 1 and real_valid(path, settings)

    monkeypatch.setattr(dataset, "_valid", valid_after_the_first_check)
    inode = (root / "meta.json").stat().st_ino
    again = tokenize_corpus(small_tok, tmp_path / "corpus", **kw)
    assert len(calls) == 2 and (root / "meta.json").stat().st_ino == inode  # kept, not replaced
    assert again["train"].tokens.tolist() == first["train"].tokens.tolist()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [root.name]  # no temporary left


def test_token_cache_interrupted_build_leaves_nothing(small_tok, tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(small_tok, tmp_path / "corpus", cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
