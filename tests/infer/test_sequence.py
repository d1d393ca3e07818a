"""Per-request text: stop rules on token ids and strings, and what a stream may release when."""

from __future__ import annotations

import random

import pytest

from dsv3.infer.sampling import SamplingParams
from dsv3.infer.sequence import Sequence
from tests.infer.conftest import BOS, EOS, ByteTokenizer


def _feed(seq: Sequence, tokens: list[int]) -> list[str]:
    """Append tokens one step at a time, collecting what a stream would print after each step."""
    out = []
    for t in tokens:
        if seq.finish_reason is None:
            seq.append([t], max_model_len=1000)
            seq.update_text(ByteTokenizer())
        out.append(seq.take_delta()[0])
    return out


def test_incomplete_utf8_is_held_back() -> None:
    seq = Sequence(0, [1], SamplingParams(), EOS)
    e_acute = list("é".encode())  # two bytes, two tokens
    assert _feed(seq, [ord("a"), *e_acute, ord("b")]) == ["a", "", "é", "b"]


def test_possible_stop_string_prefix_is_held_back_then_dropped() -> None:
    seq = Sequence(0, [1], SamplingParams(stop=["xyz"]), EOS)
    assert _feed(seq, [ord(c) for c in "abxyzq"]) == ["a", "b", "", "", "", ""]
    assert (seq.text, seq.finish_reason) == ("ab", "stop")


def test_held_back_prefix_is_released_when_it_does_not_complete() -> None:
    seq = Sequence(0, [1], SamplingParams(stop=["xyz"]), EOS)
    assert _feed(seq, [ord(c) for c in "axyq"]) == ["a", "", "", "xyq"]


def test_tokens_after_a_stop_id_are_dropped() -> None:
    seq = Sequence(0, [1], SamplingParams(max_tokens=10), EOS)
    seq.append([ord("h"), ord("i"), EOS, ord("x")], max_model_len=1000)  # accepted drafts past EOS
    seq.update_text(ByteTokenizer())
    assert seq.output == [ord("h"), ord("i"), EOS]
    assert (seq.text, seq.finish_reason) == ("hi", "stop")


def test_max_tokens_and_context_end() -> None:
    seq = Sequence(0, [1, 2], SamplingParams(max_tokens=3), EOS)
    seq.append([5, 6, 7, 8], max_model_len=1000)
    assert (seq.output, seq.finish_reason) == ([5, 6, 7], "length")
    seq = Sequence(0, [1, 2], SamplingParams(max_tokens=30), EOS)
    seq.append([5, 6, 7, 8], max_model_len=4)
    assert (seq.output, seq.finish_reason) == ([5, 6], "length")


class _Counting(ByteTokenizer):
    """ByteTokenizer that counts the ids it decodes and, like a SentencePiece decoder, drops the text's leading
    space when asked (so a window decoded from a word start differs from the same ids inside a longer text)."""

    def __init__(self, strip_leading_space: bool = False):
        self.decoded = 0
        self.strip = strip_leading_space

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        text = super().decode(ids)
        return text[1:] if self.strip and text.startswith(" ") else text


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_incremental_text_is_the_whole_output_decoded(seed: int, strip: bool) -> None:
    # random text of 1-4-byte characters (é, 中, 😀) cut into tokens of random byte lengths, 1-3 tokens a step
    # (accepted drafts), against decoding every output token at once after each step
    rng = random.Random(seed)
    chars = "ab é中😀\n" + "xyz"
    data = "".join(rng.choice(chars) for _ in range(300)).encode()
    data = bytes(b if rng.random() > 0.02 else rng.choice([0xE4, 0xB8, 0xFF]) for b in data)  # some invalid bytes
    tok = _Counting(strip)
    seq = Sequence(0, [BOS], SamplingParams(max_tokens=10_000), EOS)
    ids = list(data)
    i = 0
    while i < len(ids):
        k = rng.randint(1, 3)
        seq.append(ids[i:i + k], max_model_len=100_000)
        i += k
        seq.update_text(tok)
        assert seq.text == tok.decode(seq.output), (seed, i)
    assert seq.text == data.decode(errors="replace").removeprefix(" " if strip else "")


@pytest.mark.parametrize("data", [("多" * 700).encode()[:2000],  # 3-byte characters, one byte a token
                                  b"\xe4" * 1990 + "多x".encode()])  # bytes that never complete, then a character
def test_text_work_per_step_does_not_grow_with_the_output(data: bytes) -> None:
    # decoding all the output every step read n^2 / 2 ids over n steps (2M here); incrementally a few per step
    tok = _Counting()
    seq = Sequence(0, [BOS], SamplingParams(max_tokens=10_000, stop=["never"]), EOS)
    for t in data:
        seq.append([t], max_model_len=100_000)
        seq.update_text(tok)
    assert seq.text == data.decode(errors="replace")
    assert tok.decoded < 10 * len(data), tok.decoded


def test_stop_string_straddling_steps_and_characters_is_found() -> None:
    tok = ByteTokenizer()
    seq = Sequence(0, [BOS], SamplingParams(stop=["é中"]), EOS)
    for chunk in (b"ab\xc3", b"\xa9\xe4", b"\xb8", b"\xadzz"):
        seq.append(list(chunk), max_model_len=1000)
        seq.update_text(tok)
    assert (seq.text, seq.finish_reason) == ("ab", "stop")
    assert bytes(seq.output).endswith("中".encode())  # cut after the token that completed the stop string
