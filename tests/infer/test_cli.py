"""`dsv3 generate` / `dsv3 chat` on a tiny checkpoint directory with a real (tiny) BPE tokenizer."""

from __future__ import annotations

import argparse
import builtins
import sys
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint import save_model
from dsv3.data.tokenizer import train_bpe
from dsv3.infer.cli import add_generate_commands
from dsv3.infer.engine import Engine
from tests.infer.test_engine import greedy_reference

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import random_model, tiny_config

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(random_model(tiny_config(vocab_size=300)), path)
    train_bpe(CORPUS, vocab_size=300, out_dir=path)
    return path


def run(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="dsv3")
    add_generate_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    args.func(args)


def test_generate_streams_the_greedy_continuation(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from dsv3.checkpoint import load_model
    from dsv3.data.tokenizer import Tokenizer

    run("generate", "--model", str(model_dir), "--prompt", "def add(", "--max-tokens", "12",
        "--temperature", "0", "--device", "cpu")
    out = capsys.readouterr()
    tok = Tokenizer.from_pretrained(model_dir)
    ref = greedy_reference(load_model(model_dir, dtype=torch.float32), tok.encode("def add("), 12)
    if tok.eos_id in ref:
        ref = ref[: ref.index(tok.eos_id)]
    assert out.out == tok.decode(ref) + "\n"
    assert "tok/s" in out.err


def test_generate_passes_compile_and_mtp_to_the_engine(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    seen = {}
    original = Engine.__init__

    def spy(self, model, tokenizer=None, **kw):
        seen.update(kw)
        original(self, model, tokenizer, **{**kw, "compile": False})  # the flag's plumbing, not a CPU compile

    monkeypatch.setattr(Engine, "__init__", spy)
    run("generate", "--model", str(model_dir), "--prompt", "x", "--max-tokens", "2", "--device", "cpu",
        "--compile", "--mtp", "1")
    assert seen == {"mtp": 1, "compile": True}
    capsys.readouterr()


def test_compile_needs_a_bf16_model(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a bfloat16 model"):
        run("generate", "--model", str(model_dir), "--prompt", "x", "--device", "cpu", "--compile")


def test_chat_keeps_the_conversation(model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    prompts: list[list[int]] = []
    replies: list[str] = []
    original = Engine.generate

    def spy(self, prompt, params=None, stream=False):
        prompts.append(list(prompt))
        deltas = list(original(self, prompt, params, stream))  # chat streams: the text it prints
        replies.append("".join(d.text for d in deltas))
        return iter(deltas)

    lines = iter(["hello there", "", "and again"])

    def fake_input(_prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(Engine, "generate", spy)
    monkeypatch.setattr(builtins, "input", fake_input)
    run("chat", "--model", str(model_dir), "--max-tokens", "5", "--seed", "0", "--device", "cpu")
    from dsv3.data.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    assert len(prompts) == 2  # the empty line asked nothing
    first, second = (tok.decode(p) for p in prompts)
    assert "hello there" in first and "and again" not in first
    assert second.startswith(first)  # the second turn carries the first exchange
    # (cut at 5 tokens, the random model's reply may end inside a character: the history drops it)
    kept = replies[0].rstrip("\ufffd")
    assert kept.strip() and kept in second[len(first):]  # the first reply included, not dropped
    # exactly the template over the conversation so far: question, that reply, the new question
    assert prompts[1] == tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": kept},
         {"role": "user", "content": "and again"}], add_generation_prompt=True, tokenize=True)
    assert capsys.readouterr().out.startswith(replies[0])  # the reply kept is the one the user saw


def test_chat_history_drops_a_character_cut_by_max_tokens(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a reply cut at max_tokens inside a UTF-8 character ends in U+FFFD; the next turn's prompt quotes the reply
    # without it (a reply that stopped otherwise is kept as it is)
    import dataclasses

    prompts: list[list[int]] = []
    original = Engine.generate

    def spy(self, prompt, params=None, stream=False):
        prompts.append(list(prompt))
        deltas = list(original(self, prompt, params, stream))
        last = deltas[-1]
        cut = dataclasses.replace(last.result, text=last.result.text + "é\ufffd", finish_reason="length")
        return iter([*deltas[:-1], dataclasses.replace(last, result=cut)])

    lines = iter(["hello there", "and again"])
    monkeypatch.setattr(Engine, "generate", spy)
    monkeypatch.setattr(builtins, "input", lambda _prompt="": next(lines))
    with pytest.raises(StopIteration):
        run("chat", "--model", str(model_dir), "--max-tokens", "3", "--seed", "0", "--device", "cpu")
    from dsv3.data.tokenizer import Tokenizer

    second = Tokenizer.from_pretrained(model_dir).decode(prompts[1])
    assert "é<｜end▁of▁sentence｜>" in second  # (the random model's own invalid bytes decode to U+FFFD before it)


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    from tests.conftest import random_model, tiny_config

    save_model(random_model(tiny_config()), tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run("generate", "--model", str(tmp_path / "m"), "--prompt", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run("generate", "--model", str(tmp_path / "absent"), "--prompt", "x")


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--top-k", "-2", "top_k"), ("--temperature", "nan", "temperature"),
])
def test_bad_sampling_values_are_clear_errors(model_dir: Path, flag: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run("generate", "--model", str(model_dir), "--prompt", "x", flag, value, "--device", "cpu")


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-tokens", "0"], "argument --max-tokens: must be >= 1"), (["--mtp", "-1"], "argument --mtp: must be >= 0"),
    (["--device", "bogus"], "--device: 'bogus' is not a device"),
])
def test_bad_options_are_refused_before_loading(model_dir: Path, argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture) -> None:
    from dsv3.cli import main

    try:
        rc = main(["generate", "--model", str(model_dir), "--prompt", "x", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_prompt_longer_than_context_is_a_clear_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsv3.checkpoint

    def no_weights(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the check comes before the weights load
        raise AssertionError("weights loaded before the prompt was checked")

    monkeypatch.setattr(dsv3.checkpoint, "load_model", no_weights)
    with pytest.raises(ValueError, match="context holds 512"):
        run("generate", "--model", str(model_dir), "--prompt", "zq" * 600, "--device", "cpu")


def test_chat_without_a_template_is_refused_before_the_weights_load(model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    import dsv3.checkpoint

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(dsv3.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match="chat_template"):
        run("chat", "--model", str(d), "--device", "cpu")


def _with_template(model_dir: Path, tmp_path: Path, template: object) -> Path:
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    ("{{ raise_exception('no user turns here') }}", "refused these messages: no user turns here"),
    ([{"name": "tool_use", "template": "{{ messages }}"}], "none named 'default'"),
    (7, r"must be a string \(got int\)"),
])
def test_a_broken_chat_template_is_refused_before_the_weights_load(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: object, match: str) -> None:
    import dsv3.checkpoint

    d = _with_template(model_dir, tmp_path, template)
    monkeypatch.setattr(dsv3.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=match):
        run("chat", "--model", str(d), "--device", "cpu")


def test_chat_reports_a_template_refusing_a_turn_and_goes_on(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # transformers' list of named templates (the 'default' one used); it refuses a system turn, as many do
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    d = _with_template(model_dir, tmp_path, [{"name": "default", "template": template}])
    lines = iter(["hello", "/reset", "again"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(Engine, "generate", lambda *a, **k: pytest.fail("a refused turn generated"))
    with pytest.raises(StopIteration):  # the input ran out: every turn was answered with an error, no traceback
        run("chat", "--model", str(d), "--system", "be brief", "--device", "cpu")
    err = capsys.readouterr().err
    assert err.count("error: the chat template refused these messages: System role not supported") == 2


def test_null_sampling_defaults_in_generation_config_mean_unset(model_dir: Path, tmp_path: Path) -> None:
    # released checkpoints may write "top_p": null; that means "not set", not a TypeError
    import json
    import shutil

    from dsv3.infer.cli import sampling_params

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": None, "top_k": None}))
    args = argparse.Namespace(max_tokens=8, temperature=None, top_p=None, top_k=None, seed=None, stop=[])
    p = sampling_params(args, d)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 1.0, 0)
    # a damaged generation_config.json names itself
    for text, match in (("[1]", "expected a JSON object"), ("{oops", "not a JSON file"),
                        ('{"temperature": [1]}', "`temperature` must be a finite number"),
                        ('{"top_k": 2.7}', "`top_k` must be a whole number")):
        (d / "generation_config.json").write_text(text)
        with pytest.raises(ValueError, match=f"generation_config.json: {match}"):
            sampling_params(args, d)


@pytest.mark.parametrize("tty", [True, False])
def test_chat_prompts_only_on_a_terminal(model_dir: Path, monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    # `printf 'hi\n' | dsv3 chat ... > out`: the replies alone on stdout, no `>>> ` between them
    shown = []

    def fake_input(prompt: str = "") -> str:
        shown.append(prompt)
        raise EOFError

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty)
    run("chat", "--model", str(model_dir), "--max-tokens", "2", "--device", "cpu")
    assert shown == ([">>> "] if tty else [""])
def _one_line_error(capsys: pytest.CaptureFixture, command: str) -> str:
    out = capsys.readouterr()
    err = out.err.strip()
    assert "\n" not in err and err.startswith(f"dsv3 {command}: error: ") and "Traceback" not in err, out.err
    return err


def test_a_damaged_checkpoint_exits_2_with_one_line(model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import shutil

    from dsv3.cli import main

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    shard = d / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a download cut short
    assert main(["generate", "--model", str(d), "--prompt", "x", "--device", "cpu"]) == 2
    err = _one_line_error(capsys, "generate")
    assert f"{shard}: not a readable safetensors file" in err


def test_an_exhausted_kv_cache_exits_2_with_one_line(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    # a pool of one 16-slot block cannot hold BOS + "x" (one token) + 20 new tokens = 22 positions, two blocks:
    # the engine's CacheExhausted says so
    from dsv3.cli import main

    original = Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, model, tokenizer=None, **kw: original(
        self, model, tokenizer, **{**kw, "cache_tokens": 16}))
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-tokens", "20",
                 "--device", "cpu"]) == 2
    err = _one_line_error(capsys, "generate")
    assert err.endswith("request needs KV cache for up to 22 positions (2 blocks of 16), the pool has 16 "
                        "(1 blocks): lower max_tokens or raise cache_tokens")
