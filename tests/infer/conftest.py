"""Fixtures of the inference tests: a byte-level stand-in tokenizer and single-threaded torch.

The tiny models come from the suite's conftest (`make_cfg`, `make_model`). These models are far too small to
gain from intra-op threads, and on a shared 2-core machine thread hand-offs cost more than the math, so the
inference tests run torch on one thread and restore the setting afterwards.
"""

from __future__ import annotations

import pytest

BOS, EOS = 256, 257


class ByteTokenizer:
    """Ids 0..255 are bytes, 256 BOS, 257 EOS (both decode to nothing): enough tokenizer for the engine."""

    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class CharTokenizer:
    """Id i is the one character chr(0x4E00 + i): every token is visible text, so stop strings can be cut
    from a reference output; `eos_id` is settable per test."""

    def __init__(self, eos_id: int | None = None):
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x4E00 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x4E00 + i) for i in ids)


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """These tests run many small ops: one thread avoids oversubscription on a busy 2-core machine."""
