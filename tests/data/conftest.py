"""Fixtures for the data tests: the real DeepSeek-V3 tokenizer and a small BPE trained with its rules."""

import pytest

from dsv3.data.corpus import iter_documents, limit_bytes
from dsv3.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="session")
def v3_tok() -> Tokenizer:
    return Tokenizer.deepseek_v3()


@pytest.fixture(scope="session")
def small_tok_dir(tmp_path_factory):
    """A 512-id BPE trained on ~300 KB of the standard library, saved to a directory."""
    out = tmp_path_factory.mktemp("bpe512")
    train_bpe(limit_bytes(iter_documents(), 300_000), 512, out)
    return out


@pytest.fixture(scope="session")
def small_tok(small_tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(small_tok_dir)
