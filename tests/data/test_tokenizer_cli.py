import argparse

from dsv3.data.cli import add_tokenizer_commands
from dsv3.data.tokenizer import SPECIAL_TOKENS, Tokenizer


def run(argv):
    parser = argparse.ArgumentParser(prog="dsv3")
    add_tokenizer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenizer_train_and_info(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "def f{i}(x):\\n    return x * {i}\\n"}}\n' for i in range(300)))
    out = str(tmp_path / "tok")
    assert run(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", out,
                "--val-fraction", "0"]) == 0
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300 and [tok.tokenizer.id_to_token(i) for i in range(8)] == list(SPECIAL_TOKENS)
    assert run(["tokenizer", "info", str(tmp_path / "tok"), "--text", "def f(x)"]) == 0
    out = capsys.readouterr().out
    assert "300 ids; bos 0 eos 1 pad 2" in out and "<｜fim▁begin｜> 4" in out


def test_tokenizer_train_takes_at_most_max_mb_of_text(tmp_path, monkeypatch, capsys):
    # 300 documents of 28 bytes; --max-mb 0.00011 is 110 bytes (decimal MB: 2^20-byte MiB would make it 115): the
    # first four documents, 84 bytes after three and 112 after four
    import dsv3.data.cli

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "def f{i}(x):\\n    return x * {i}\\n"}}\n' for i in range(10)) * 30)
    seen = []

    def fake_train_bpe(docs, vocab_size, out, **kw):
        seen.extend(docs)
        return [None] * vocab_size

    monkeypatch.setattr(dsv3.data.cli, "train_bpe", fake_train_bpe)
    assert run(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                "--val-fraction", "0", "--max-mb", "0.00011"]) == 0
    assert seen == [f"def f{i}(x):\n    return x * {i}\n" for i in range(4)]
    assert all(len(d.encode()) == 28 for d in seen)
    capsys.readouterr()
