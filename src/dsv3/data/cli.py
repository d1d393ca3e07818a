"""`dsv3 tokenizer ...`: train a small BPE with DeepSeek-V3's rules, or inspect a tokenizer."""

from __future__ import annotations

import argparse
import time

from dsv3.argtypes import positive_float, positive_int, share
from dsv3.data.corpus import VAL_FRACTION, iter_documents, limit_bytes, split_documents
from dsv3.data.dataset import tokenize_corpus
from dsv3.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe


def add_tokenizer_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `tokenizer train` and `tokenizer info`; each sets `func(args) -> int` on the parsed arguments."""
    p = subparsers.add_parser("tokenizer", help="train or inspect a tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE with V3's pre-tokeniser and special tokens")
    t.add_argument("--data", nargs="+", default=None, metavar="SRC",
                   help="files, folders, globs, .jsonl (field 'text'); default: the Python standard library")
    t.add_argument("--vocab-size", type=positive_int, default=4096, help="ids in total, special tokens included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--max-mb", type=positive_float, default=20.0, help="train on at most this much text (MB)")
    t.add_argument("--min-frequency", type=positive_int, default=2, help="merge only pairs seen this often")
    t.add_argument("--val-fraction", type=share, default=VAL_FRACTION,
                   help="documents held out for validation (by hash) are not trained on")
    t.add_argument("--tokenize", action="store_true", help="then tokenise the corpus into the token cache")
    t.set_defaults(func=_train)

    i = sub.add_parser("info", help="print a tokenizer's size, special ids and the tokens of a text")
    i.add_argument("tokenizer", nargs="?", default="deepseek-v3", help="a directory, or 'deepseek-v3'")
    i.add_argument("--text", default=None, help="text to encode and show")
    i.set_defaults(func=_info)


def _train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    docs = split_documents(iter_documents(args.data), "train", args.val_fraction)  # never train on val
    docs = limit_bytes(docs, args.max_mb * 1e6)
    tok = train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency, show_progress=True)
    print(f"trained a {len(tok)}-id BPE in {time.perf_counter() - t0:.1f}s -> {args.out}")
    if args.tokenize:
        caches = tokenize_corpus(tok, args.data, val_fraction=args.val_fraction)
        for split, c in caches.items():
            print(f"{split}: {c.meta['splits'][split]['n_tokens']:,} tokens in {c.path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    print(f"{args.tokenizer}: {len(tok):,} ids; bos {tok.bos_id} eos {tok.eos_id} pad {tok.pad_id}")
    for s in SPECIAL_TOKENS[3:]:
        print(f"  {s} {tok.tokenizer.token_to_id(s)}")
    if args.text is not None:
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens: {ids}")
        print([tok.tokenizer.id_to_token(i) for i in ids])
    return 0
