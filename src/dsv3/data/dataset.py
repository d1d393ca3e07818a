"""Token caches and batches: documents -> token ids on disk (memory-mapped) -> packed, shuffled batches.

Each document becomes `[BOS] body [EOS]` (body: its tokens, or the FIM rearrangement, see dsv3.data.fim) and
the documents are concatenated into one stream per split. Sequence i of a stream is the window
`stream[i*S : i*S + S + 1]` (S = seq_len): inputs `[:-1]`, targets `[1:]`, and consecutive windows share one
token, so every token except the first is a target exactly once. Documents are packed across window edges
without cross-document masking (paper section 4.1); per-token document ids make masking an option.

BOS at the start of every document is our choice (the paper does not say): V3 puts BOS first in every prompt,
so the model should see it in training, and it marks where a document starts when documents are packed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from dsv3.data.corpus import (
    VAL_FRACTION,
    Sources,
    corpus_fingerprint,
    doc_hash,
    is_validation,
    read_documents,
    resolve_files,
)
from dsv3.data.fim import fim_split, psm
from dsv3.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
CACHE_FORMAT = 2  # bump when the on-disk layout or the tokenisation rules change (2: special=False)


def encode_documents(texts: Sequence[str], tok: Tokenizer, *, fim_rate: float = 0.0, seed: int = 0,
                     bos: bool = True) -> list[list[int]]:
    """Each document as `[BOS] body [EOS]`, body in PSM form with probability `fim_rate` (per document,
    deterministic given seed and text). All parts are encoded in one batched call, special-token strings in
    the text as plain text (`Tokenizer.encode_batch(special=False)`): only the layout places BOS, EOS, FIM."""
    plans = [fim_split(t, seed, fim_rate) if fim_rate > 0 else None for t in texts]
    pieces = [p for t, plan in zip(texts, plans, strict=True) for p in (plan or (t,))]
    enc = iter(tok.encode_batch(pieces, bos=False, special=False))
    head = [tok.bos_id] if bos else []
    return [head + (psm(next(enc), next(enc), next(enc), tok) if plan else next(enc)) + [tok.eos_id]
            for plan in plans]


def pack_documents(docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists into one uint32 stream; returns (stream, doc_starts), where doc_starts holds
    each document's first offset and, last, the stream length."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    stream = np.fromiter((t for d in docs for t in d), dtype=np.uint32, count=int(lengths.sum()))
    return stream, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# --- the on-disk cache ---

@dataclass
class TokenCache:
    """One split of a tokenised corpus: `tokens` (uint32, memory-mapped), `doc_starts` (int64, n_docs + 1)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    meta: dict[str, Any]
    path: Path | None = None

    @classmethod
    def open(cls, root: Path, split: str) -> TokenCache:
        meta = json.loads((root / "meta.json").read_text())
        # np.memmap cannot map an empty file (a split may have no documents)
        tokens = (np.memmap(root / f"{split}.tokens.u32", dtype=np.uint32, mode="r")
                  if meta["splits"][split]["n_tokens"] else np.zeros(0, dtype=np.uint32))
        return cls(tokens, np.fromfile(root / f"{split}.docs.i64", dtype=np.int64), meta, root)

    def dataset(self, seq_len: int, batch_size: int, **kwargs: Any) -> TokenDataset:
        """A `TokenDataset` over this split (keyword arguments as for `TokenDataset`)."""
        return TokenDataset(self.tokens, seq_len, batch_size, doc_starts=self.doc_starts, **kwargs)


def default_cache_dir() -> Path:
    """`$DSV3_CACHE/tokens`, by default `~/.cache/dsv3/tokens`."""
    return Path(os.environ.get("DSV3_CACHE", "~/.cache/dsv3")).expanduser() / "tokens"


def tokenize_corpus(tok: Tokenizer, sources: Sources = None, *, cache_dir: str | Path | None = None,
                    fim_rate: float = 0.1, seed: int = 0, val_fraction: float = VAL_FRACTION,
                    bos: bool = True, progress: bool = True) -> dict[str, TokenCache]:
    """Tokenise a corpus into {"train": TokenCache, "val": TokenCache}, or reuse the cache of an earlier run.

    The cache lives in `cache_dir/<key>/`, the key a hash of everything that decides its contents: the
    tokenizer (its tokenizer.json), the corpus files (paths, sizes, mtimes), the FIM rate and seed, the
    validation fraction and the BOS choice. FIM applies to the training split only, so validation loss
    and bits per byte are measured on plain documents. The directory is written under a temporary name and
    renamed when complete, so an interrupted run leaves nothing that looks valid.
    """
    files = resolve_files(sources)
    settings = {"format": CACHE_FORMAT, "tokenizer": tok.fingerprint, "corpus": corpus_fingerprint(files),
                "fim_rate": fim_rate, "fim_seed": seed, "fim_splits": ["train"], "val_fraction": val_fraction,
                "bos": bos, "ids": [tok.bos_id, tok.eos_id, tok.fim_begin, tok.fim_hole, tok.fim_end]}
    key = doc_hash(json.dumps(settings, sort_keys=True)).hex()
    root = Path(cache_dir or default_cache_dir()) / key
    if _valid(root, settings):
        return {s: TokenCache.open(root, s) for s in SPLITS}

    tmp = root.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out: dict[str, Any] = {}
    starts: dict[str, list[int]] = {s: [0] for s in SPLITS}
    stats = {s: {"n_docs": 0, "n_tokens": 0, "n_bytes": 0} for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_chars = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        docs = encode_documents(pending[split], tok, fim_rate=fim_rate if split == "train" else 0.0,
                                seed=seed, bos=bos)
        stream, doc_starts = pack_documents(docs)
        stream.tofile(out[split])
        starts[split] += (doc_starts[1:] + starts[split][-1]).tolist()
        stats[split]["n_docs"] += len(docs)
        stats[split]["n_tokens"] += len(stream)
        pending[split].clear()
        pending_chars[split] = 0

    try:
        total = sum(p.stat().st_size for p in files)
        with contextlib.ExitStack() as stack:
            out.update({s: stack.enter_context(open(tmp / f"{s}.tokens.u32", "wb")) for s in SPLITS})
            bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                           desc=f"tokenising {len(files)} files"))
            for path in files:
                for text in read_documents(path):
                    split = "val" if is_validation(text, val_fraction, doc_hash(text)) else "train"
                    pending[split].append(text)
                    stats[split]["n_bytes"] += len(text.encode("utf-8"))
                    pending_chars[split] += len(text)
                    if len(pending[split]) >= 64 or pending_chars[split] >= 2_000_000:  # parallel chunks
                        flush(split)
                bar.update(path.stat().st_size)
            for s in SPLITS:
                flush(s)
        for s in SPLITS:
            np.asarray(starts[s], dtype=np.int64).tofile(tmp / f"{s}.docs.i64")
        meta = {"settings": settings, "n_files": len(files), "splits": stats}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the cache complete
    except BaseException:  # interrupted or failed: leave no partial directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _valid(root, settings):  # another process finished the same cache meanwhile: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return {s: TokenCache.open(root, s) for s in SPLITS}
    shutil.rmtree(root, ignore_errors=True)  # an incomplete or stale directory under the same key
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished the same cache first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return {s: TokenCache.open(root, s) for s in SPLITS}


def _valid(root: Path, settings: dict[str, Any]) -> bool:
    """The cache at root was built with these settings and its files have the sizes its meta.json records
    (a file cut short, say by a power loss after the rename, is rebuilt rather than trusted)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        return meta["settings"] == settings and all(
            (root / f"{s}.tokens.u32").stat().st_size == 4 * meta["splits"][s]["n_tokens"]
            and (root / f"{s}.docs.i64").stat().st_size == 8 * (meta["splits"][s]["n_docs"] + 1)
            for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --- batches ---

class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, S+1] int64: inputs tokens[:, :-1], targets tokens[:, 1:]
    doc_ids: torch.Tensor | None  # [B, S] int64: document of each input token, numbered from 0 in its row


class TokenDataset:
    """Packed sequences of `seq_len + 1` tokens over a token stream, served in batches.

    Training order: a permutation of all sequences per epoch, drawn from (seed, epoch); batches are taken
    in that order and the tail that does not fill a batch is left for the next epoch's shuffle. The whole
    state is (epoch, position in the epoch's order, seed), so `state_dict()`/`load_state_dict()` resume
    bit-identically, also when the batch size changes between calls (batch-size ramp).
    `iter_in_order()` serves validation: every sequence once, in stream order or a seeded random one, without
    touching the state.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *,
                 doc_starts: np.ndarray | None = None, shuffle: bool = True, seed: int = 0,
                 doc_ids: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len {seq_len} and batch_size {batch_size} must be positive")
        if doc_ids and doc_starts is None:
            raise ValueError("doc_ids=True needs doc_starts (the first offset of each document)")
        self.tokens, self.doc_starts, self.seq_len, self.batch_size = tokens, doc_starts, seq_len, batch_size
        self.shuffle, self.seed, self.doc_ids = shuffle, seed, doc_ids
        self.n_sequences = max(0, (len(tokens) - 1) // seq_len)
        if self.n_sequences == 0:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Full batches per epoch."""
        return self.n_sequences // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """Sequence indices of an epoch, in serving order."""
        if not self.shuffle:
            return np.arange(self.n_sequences)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return self._perm[1]

    def sequences(self, idx: np.ndarray) -> Batch:
        """The batch made of sequences `idx`."""
        pos = np.asarray(idx, dtype=np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        tokens = torch.from_numpy(self.tokens[pos].astype(np.int64))
        doc_ids = None
        if self.doc_ids:
            doc = np.searchsorted(self.doc_starts, pos[:, :-1], side="right") - 1
            doc_ids = torch.from_numpy(doc - doc[:, :1])
        return Batch(tokens, doc_ids)

    def next_batch(self, batch_size: int | None = None) -> Batch:
        """The next training batch (`batch_size` overrides the default for this call)."""
        b = batch_size or self.batch_size
        if b > self.n_sequences:
            raise ValueError(f"batch_size {b} exceeds the {self.n_sequences} sequences in the data")
        if self.position + b > self.n_sequences:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.position:self.position + b]
        self.position += b
        return self.sequences(idx)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def iter_in_order(
        self, batch_size: int | None = None, max_batches: int | None = None, sample_seed: int | None = None
    ) -> Iterator[Batch]:
        """Every sequence once, in stream order (the last batch may be smaller); for validation. With
        `sample_seed`, in a random order drawn from it instead, so that the first `max_batches` batches are a
        sample of the whole corpus rather than of the documents that come first."""
        b = batch_size or self.batch_size
        seqs = (np.arange(self.n_sequences) if sample_seed is None
                else np.random.default_rng(sample_seed).permutation(self.n_sequences))
        for n, i in enumerate(range(0, self.n_sequences, b)):
            if max_batches is not None and n >= max_batches:
                return
            yield self.sequences(seqs[i:i + b])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the token stream's length and of up to 2^20 tokens evenly spread over it (and the document
        starts): another corpus, tokenizer, FIM rate or seed, or validation split, changes it."""
        n = len(self.tokens)
        at = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 1 << 20), dtype=np.int64))
        h = hashlib.blake2b(np.int64(n).tobytes(), digest_size=16)
        h.update(np.ascontiguousarray(self.tokens[at]).tobytes())
        if self.doc_starts is not None:
            m = len(self.doc_starts)
            docs = np.unique(np.linspace(0, max(m - 1, 0), num=min(m, 1 << 20), dtype=np.int64))
            h.update(np.int64(m).tobytes() + np.ascontiguousarray(self.doc_starts[docs], dtype=np.int64).tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_sequences": self.n_sequences, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off, its shuffling seed included; refused (ValueError) when it describes
        other data (its sequences, or its tokens' fingerprint, differ)."""
        for k in ("seq_len", "n_sequences", "fingerprint"):
            if k in state and state[k] != getattr(self, k):
                what = "tokens" if k == "fingerprint" else f"{k} {state[k]}, this dataset {getattr(self, k)}"
                raise ValueError(f"the checkpoint's training data differs ({what}): resuming needs the same corpus, "
                                 "tokenizer, FIM rate and seed, validation fraction and seq_len")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._perm = None
