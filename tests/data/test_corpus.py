import hashlib
import json
import math
import os
import random
import sysconfig
from pathlib import Path

import pytest

from dsv3.data.corpus import (
    corpus_fingerprint,
    is_validation,
    iter_documents,
    limit_bytes,
    read_documents,
    resolve_files,
    split_documents,
    stdlib_files,
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_sources_files_folders_globs(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    b = write(tmp_path / "sub" / "deep" / "b.py", "beta")
    write(tmp_path / ".hidden" / "h.txt", "hidden")
    write(tmp_path / "sub" / "__pycache__" / "b.cpython.pyc", b"\x00\x01")
    c = write(tmp_path / "docs.jsonl", '{"text": "gamma"}\n')
    assert resolve_files(tmp_path) == [a.resolve(), c.resolve(), b.resolve()]  # recursive, sorted
    assert resolve_files([str(tmp_path / "**" / "*.py"), a, a]) == [b.resolve(), a.resolve()]  # dedup
    assert list(iter_documents([tmp_path])) == ["alpha", "gamma", "beta"]
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_files(str(tmp_path / "*.md"))


def test_documents_of_a_file(tmp_path):
    j = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": "two\\nlines", "id": 3}\n{"text": ""}\n')
    assert list(read_documents(j)) == ["one", "two\nlines"]
    assert list(read_documents(write(tmp_path / "t.txt", "whole\nfile\n"))) == ["whole\nfile\n"]
    assert list(read_documents(write(tmp_path / "bin.dat", b"\x89PNG\x00\x01"))) == []  # binary: skipped
    assert list(read_documents(write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1")))) == []
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        list(read_documents(write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{oops\n')))
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: .*'text'"):
        list(read_documents(write(tmp_path / "nofield.jsonl", '{"content": "x"}\n')))
    bom = write(tmp_path / "bom.jsonl", '\ufeff{"text": "a"}\n{"text": "b"}\n'.encode())  # a BOM is no JSON
    assert list(read_documents(bom)) == ["a", "b"]
    with pytest.raises(ValueError, match=r"lone.jsonl:2: .*surrogate"):  # valid JSON, not encodable text
        list(read_documents(write(tmp_path / "lone.jsonl", '{"text": "a"}\n{"text": "x\\ud83d"}\n')))
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8"):
        list(read_documents(write(tmp_path / "latin.jsonl", '{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))))


def test_stdlib_corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= rel
    assert all(p.suffix == ".py" for p in files) and files == sorted(files)
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    assert not any(skip.intersection(Path(r).parts) for r in rel)
    assert resolve_files(None) == resolve_files("stdlib") == [p.resolve() for p in files]


def test_split_by_hash_is_deterministic_and_stable():
    docs = [f"document number {i}\n" * (i % 7 + 1) for i in range(5000)]
    val = [d for d in docs if is_validation(d, 0.02)]
    # the rule, computed independently: first 8 bytes of a 16-byte BLAKE2b as a fraction of 2^64
    digests = [hashlib.blake2b(d.encode(), digest_size=16).digest() for d in docs]
    expect = [d for d, h in zip(docs, digests, strict=True) if int.from_bytes(h[:8], "big") < 0.02 * 2**64]
    assert val == expect
    # about 2%: a binomial(5000, 0.02) count lies within 5 standard deviations of its mean
    assert abs(len(val) - 100) < 5 * math.sqrt(5000 * 0.02 * 0.98)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_documents(iter(shuffled), "val", 0.02)) == set(val)  # order does not matter
    assert len(list(split_documents(iter(docs), "train", 0.02))) == len(docs) - len(val)
    assert not any(is_validation(d, 0.0) for d in docs) and all(is_validation(d, 1.0) for d in docs)
    with pytest.raises(ValueError, match="split 'test'"):
        split_documents(iter(docs), "test", 0.02)


def test_corpus_fingerprint_tracks_files(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    fp = corpus_fingerprint(resolve_files(tmp_path))
    assert corpus_fingerprint(resolve_files(tmp_path)) == fp
    write(tmp_path / "b.txt", "beta")
    fp2 = corpus_fingerprint(resolve_files(tmp_path))
    assert fp2 != fp
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert corpus_fingerprint(resolve_files(tmp_path)) != fp2
    json.dumps(fp)  # plain string, goes into the cache sidecar


def test_limit_bytes_counts_utf8_bytes_and_stops_once_reached():
    docs = ["abc", "défg", "hi"]  # 3, 5 (é is two bytes) and 2 bytes: 3, 8, 10 in all
    assert list(limit_bytes(iter(docs), None)) == docs
    assert list(limit_bytes(iter(docs), 0)) == []
    assert list(limit_bytes(iter(docs), 2)) == ["abc"]  # the last document may cross the limit
    assert list(limit_bytes(iter(docs), 3)) == ["abc"]  # reached exactly: no more
    assert list(limit_bytes(iter(docs), 4)) == ["abc", "défg"]
    assert list(limit_bytes(iter(docs), 8)) == ["abc", "défg"]  # 8 bytes (7 characters) reach it
    assert list(limit_bytes(iter(docs), 8.5)) == docs
