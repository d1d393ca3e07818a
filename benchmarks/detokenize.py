"""Host time the engine spends turning a sequence's tokens into text, per decode step (CPU).

    python -m benchmarks.detokenize [--tokens 1000 4000 12000] [--tokenizer DIR]

Each step appends one token to a `Sequence` and calls `update_text` (stop strings included), as the engine does
after every decode step for every running sequence. Reference in the same run: decoding the whole output every
step (what `update_text` did before it decoded incrementally); both texts are checked equal. The tokenizer is
DIR's (e.g. `runs/demo/checkpoints/latest`) or a byte-level BPE of 4,096 ids trained here on the standard
library's sources; the token ids are random non-special ids. A GPU decode step of `bench` at batch 1 is ~0.6 ms,
so host work per step should stay well below that. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import emit_json, print_table
from dsv3.data import Tokenizer, stdlib_files, train_bpe
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.sequence import Sequence


def _tokenizer(path: str | None) -> Tokenizer:
    if path:
        return Tokenizer.from_pretrained(path)
    texts = [f.read_text(errors="replace") for f in stdlib_files()[:200]]
    return train_bpe(texts, vocab_size=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1000, 4000, 12000])
    ap.add_argument("--tokenizer", default=None, help="a directory holding tokenizer.json (default: train one)")
    args = ap.parse_args()
    tok = _tokenizer(args.tokenizer)
    rows = []
    for n in args.tokens:
        rng = random.Random(n)
        ids = [rng.randrange(8, len(tok)) for _ in range(n)]
        seq = Sequence(0, [tok.bos_id], SamplingParams(max_tokens=n + 1, stop=["\x00\x00"]), tok.eos_id)
        start = time.perf_counter()
        for i in ids:
            seq.append([i], max_model_len=n + 2)
            seq.update_text(tok)
        incremental = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(1, n + 1):  # the whole output every step, and the stop strings searched over all of it
            text = tok.decode(ids[:k])
            text.find("\x00\x00")
        whole = time.perf_counter() - start
        assert seq.text == text, "incremental text differs from the whole output decoded"
        rows.append({"tokens": n, "incremental us/step": f"{incremental / n * 1e6:.1f}",
                     "whole-output us/step": f"{whole / n * 1e6:.1f}", "ratio": f"{whole / incremental:.1f}x"})
    print(f"update_text per step, one sequence, {len(tok):,}-id tokenizer")
    print_table(rows, list(rows[0]))
    emit_json({"bench": "detokenize", "vocab": len(tok), "rows": rows})


if __name__ == "__main__":
    main()
