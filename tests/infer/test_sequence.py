"""Per-request text: stop rules on token ids and strings, and what a stream may release when."""

from __future__ import annotations

from dsv3.infer.sampling import SamplingParams
from dsv3.infer.sequence import Sequence
from tests.infer.conftest import EOS, ByteTokenizer


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
