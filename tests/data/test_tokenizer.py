import json

import numpy as np
import pytest

from dsv3.data.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    FIM_BEGIN,
    FIM_END,
    FIM_HOLE,
    PAD,
    SPECIAL_TOKENS,
    USER,
    Tokenizer,
    _v3_files,
    train_bpe,
)

TEXTS = [
    "def add(a, b):\n    return a + b  # 求和\n",
    "深度求索的模型：DeepSeek-V3 有 671B 个参数。",
    "  indented\ttabs\r\nCRLF lines\n\n\nand émoji 🤖🚀, Ünïcödé, русский, العربية, 日本語のテキスト。",
    "numbers 1234567 3.14159 0x1F -42",
    "\x00\x01 control chars \x7f and a lone surrogate-free \u200b zero-width space",
]
CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def test_v3_special_token_ids(v3_tok):
    t = v3_tok
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
    assert (t.fim_hole, t.fim_begin, t.fim_end) == (128800, 128801, 128802)
    ids = {s: t.tokenizer.token_to_id(s) for s in SPECIAL_TOKENS}
    assert ids == {BOS: 0, EOS: 1, PAD: 2, FIM_HOLE: 128800, FIM_BEGIN: 128801, FIM_END: 128802,
                   USER: 128803, ASSISTANT: 128804}
    assert len(t) == t.vocab_size == 128000 + 815  # 128,815 ids; the model pads to 129,280 rows
    # the R1-era package has <think>/</think> at 128798/128799; V3 has placeholders there
    assert t.tokenizer.id_to_token(128798) == "<｜place▁holder▁no▁798｜>"
    assert t.tokenizer.id_to_token(128799) == "<｜place▁holder▁no▁799｜>"
    assert t.encode("<think>", bos=False) != [128798]


@pytest.mark.parametrize("text", TEXTS)
def test_v3_round_trip(v3_tok, text):
    ids = v3_tok.encode(text)
    assert ids[0] == 0 and 0 not in ids[1:]
    assert v3_tok.decode(ids[1:]) == text
    assert v3_tok.decode(ids) == BOS + text


def test_v3_pre_tokenizer_rules(v3_tok):
    # digits in groups of at most three, CJK runs split off (SPEC 4 / V3's tokenizer.json)
    pieces = [v3_tok.decode([i]) for i in v3_tok.encode("1234567", bos=False)]
    assert pieces == ["123", "456", "7"]
    assert v3_tok.encode("<｜fim▁hole｜>", bos=False) == [128800]


def test_v3_chat_template(v3_tok):
    text = v3_tok.apply_chat_template(CHAT)
    assert text == (BOS + "You are helpful." + USER + "Hi" + ASSISTANT + "Hello!" + EOS + USER + "2+2?"
                    + ASSISTANT)
    assert v3_tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith(USER + "2+2?")
    ids = v3_tok.apply_chat_template(CHAT, tokenize=True)
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(128803) == 2 and ids[-1] == 128804
    # V3's template keeps an assistant turn whole; R1's strips everything up to </think>
    think = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a</think>b"}]
    text = v3_tok.apply_chat_template(think, add_generation_prompt=False)
    assert text.endswith(ASSISTANT + "a</think>b" + EOS)


def test_trained_special_token_layout(small_tok):
    t = small_tok
    assert [t.tokenizer.id_to_token(i) for i in range(8)] == list(SPECIAL_TOKENS)
    assert (t.bos_id, t.eos_id, t.pad_id, t.fim_hole, t.fim_begin, t.fim_end) == (0, 1, 2, 3, 4, 5)
    assert len(t) == 512
    for s in SPECIAL_TOKENS:  # a special token in the text is that one id
        assert t.encode(s, bos=False) == [t.tokenizer.token_to_id(s)]


def test_trained_copies_v3_rules(small_tok):
    v3, _ = _v3_files()
    ours = json.loads(small_tok.tokenizer.to_str())
    for k in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[k] == v3[k]
    flags = {t["content"]: t for t in v3["added_tokens"]}
    for t in ours["added_tokens"]:  # same added-token flags as V3 (FIM/User/Assistant are not "special")
        assert {k: t[k] for k in ("normalized", "special", "lstrip", "rstrip")} == \
            {k: flags[t["content"]][k] for k in ("normalized", "special", "lstrip", "rstrip")}


@pytest.mark.parametrize("text", TEXTS)
def test_trained_round_trip(small_tok, text):
    ids = small_tok.encode(text)
    assert ids[0] == 0 and max(ids) < 512
    assert small_tok.decode(ids[1:]) == text


def test_token_bytes_count_utf8(small_tok, v3_tok):
    for tok in (small_tok, v3_tok):
        nb = tok.token_bytes()
        assert nb[tok.bos_id] == nb[tok.eos_id] == nb[tok.fim_begin] == 0
        for text in TEXTS:
            assert nb[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_save_and_load(small_tok, tmp_path):
    small_tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == small_tok.fingerprint and again.config == small_tok.config
    assert again.encode(TEXTS[1]) == small_tok.encode(TEXTS[1])
    assert again.apply_chat_template(CHAT) == small_tok.apply_chat_template(CHAT)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    # damaged files name themselves (the Rust library's own error is a bare Exception)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not a JSON file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        Tokenizer.from_pretrained(tmp_path)
    for bos in (5, ["a"], {"x": 1}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos}))
        with pytest.raises(ValueError, match="a special token must be a string"):
            Tokenizer.from_pretrained(tmp_path)
    small_tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers file"):
        Tokenizer.from_pretrained(tmp_path)


def test_special_token_ids_come_from_the_config(small_tok, tmp_path):
    # a tokenizer_config.json may name other special tokens (as a string or an AddedToken object): the ids are
    # those tokens' ids in the vocabulary, not V3's defaults (BOS 0, EOS 1)
    small_tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token={"content": USER, "special": True}, eos_token=FIM_END)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (6, 5) and (small_tok.bos_id, small_tok.eos_id) == (0, 1)
    assert tok.encode("x")[0] == 6
    from dsv3.data.dataset import encode_documents

    [doc] = encode_documents(["x = 1"], tok)
    assert doc == [6, *tok.encode("x = 1", bos=False), 5]
    config.update(eos_token="<｜no▁such｜>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token '<｜no▁such｜>' is not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_transformers_reads_our_files_the_same(small_tok, v3_tok, tmp_path):
    """transformers is the oracle: from our saved files it must produce our ids (BOS included) and chat."""
    transformers = pytest.importorskip("transformers")
    for name, tok in (("small", small_tok), ("v3", v3_tok)):
        tok.save_pretrained(tmp_path / name)
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        for text in TEXTS:
            assert hf(text)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text, bos=False)) == text
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(CHAT)


def test_train_bpe_checks_vocab_size():
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_bpe(["abc"], 100)
    # a corpus too small for the merges asked: trained, with a warning saying how many ids it has
    with pytest.warns(UserWarning, match="the corpus yields 2[0-9][0-9] of the 2000 ids asked"):
        tok = train_bpe(["abc abd abe"] * 3, 2000)
    assert len(tok) < 300


@pytest.mark.slow
def test_train_on_stdlib_is_fast(tmp_path):
    """The demo's tokenizer: ~12 MB of code in well under a minute."""
    import time

    from dsv3.data.corpus import iter_documents
    t0 = time.perf_counter()
    tok = train_bpe(iter_documents(), 8192, tmp_path)
    assert time.perf_counter() - t0 < 60 and len(tok) == 8192
    assert np.all(tok.token_bytes()[8:] > 0)
