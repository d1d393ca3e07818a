"""Corpora: documents from files, folders, globs and `.jsonl`; the default is the Python standard library.

A source is a file, a folder (all files below it, recursively, except hidden ones and `__pycache__`), or a
glob (`**` allowed). A `.jsonl` file holds one document per line in its `text` field (it must be UTF-8 JSON: a
bad line is an error naming the file and line); any other file is one document. Other files that are not UTF-8
text (undecodable, or holding NUL bytes) are skipped, so a folder may mix text and binaries. The embedded
corpus, `"stdlib"` or no source at all, is the `.py` source of the running interpreter's standard library:
real code that every machine has (about 12 MB in CPython 3.11). It leaves out `site-packages`/`dist-packages`
(installed packages differ per machine, so the corpus would too) and test directories (`test`, `tests`,
`idle_test`: large, mostly fixtures and odd encodings rather than typical code).

Train/validation split by a hash of each document's text, so it does not depend on file order, and a document
(or any copy of it) stays on its side when the corpus grows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

Sources = str | Path | Sequence[str | Path] | None
STDLIB = "stdlib"
VAL_FRACTION = 0.02  # default share of documents held out for validation
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The `.py` files of this interpreter's standard library, sorted, without installed packages or tests."""
    files = []
    for folder, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # prune: never walk into them
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def resolve_files(sources: Sources = None) -> list[Path]:
    """Expand sources (files, folders, globs; None or "stdlib" for the embedded corpus) to a file list.

    Order is that of the sources, each folder or glob sorted; duplicates are dropped.
    """
    if sources is None:
        return stdlib_files()
    files: list[Path] = []
    for s in [sources] if isinstance(sources, str | Path) else sources:
        p = Path(s).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                x.startswith(".") or x == "__pycache__" for x in f.relative_to(p).parts))
        elif str(s) == STDLIB:
            files += stdlib_files()
        elif glob.has_magic(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"corpus source {str(s)!r}: the glob matches no file")
            files += resolve_files([m for m in matches if m.is_file() or m.is_dir()])
        else:
            raise FileNotFoundError(f"corpus source {str(s)!r}: "
                                    "no such file or folder (nor a glob, nor 'stdlib')")
    files = list(dict.fromkeys(p.resolve() for p in files))
    if not files:
        raise FileNotFoundError(f"corpus sources {sources!r} hold no files")
    return files


def read_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of one file: each `text` field of a `.jsonl`, else the whole file."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:  # decoded line by line, so an error can name its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # (-sig: a byte-order mark is no JSON)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'text'")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # JSON allows a lone "\ud83d"; UTF-8 (and every tokenizer) does not
                    raise ValueError(f"{path}:{n}: the text holds an unpaired surrogate escape") from None
                if text:
                    yield text
        return
    data = path.read_bytes()
    if b"\0" in data:
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text:
        yield text


def iter_documents(sources: Sources = None) -> Iterator[str]:
    """All documents of the sources, in order."""
    for path in resolve_files(sources):
        yield from read_documents(path)


def doc_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the document's UTF-8 text; keys the split and the per-document FIM RNG."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_validation(text: str, val_fraction: float, digest: bytes | None = None) -> bool:
    """Whether a document belongs to the validation split: the first 8 hash bytes, read as a fraction of
    2^64, fall below `val_fraction`."""
    digest = digest or doc_hash(text)
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def split_documents(docs: Iterator[str], split: str, val_fraction: float) -> Iterator[str]:
    """The documents of one split ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: expected 'train' or 'val'")
    return (d for d in docs if is_validation(d, val_fraction) == (split == "val"))


def corpus_fingerprint(files: Sequence[Path]) -> str:
    """Hash of each file's path, size and modification time: it changes when any file is added, removed or
    edited, without reading the files (so a cached corpus is recognised at once)."""
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def limit_bytes(docs: Iterator[str], max_bytes: float | None) -> Iterator[str]:
    """Documents until their UTF-8 size reaches `max_bytes` (the last one may cross it); all if None."""
    seen = 0
    for d in docs:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(d.encode("utf-8"))
        yield d
