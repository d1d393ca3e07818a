"""Fill-in-the-Middle at the document level, in Prefix-Suffix-Middle form (paper section 4.1, SPEC section 4).

With probability `fim_rate` (0.1 in V3) a document is cut at two character positions into prefix, middle and
suffix, which are encoded separately and laid out as

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

(the EOS is added by packing, as for every document). The choice and the cut points come from an RNG seeded
by the run's seed and the document's hash, so they are the same on every run and in any document order.
"""

from __future__ import annotations

import random

from dsv3.data.corpus import doc_hash
from dsv3.data.tokenizer import Tokenizer


def fim_rng(text: str, seed: int, digest: bytes | None = None) -> random.Random:
    """The document's own RNG: a function of (seed, document text) only."""
    return random.Random(f"{seed}:{(digest or doc_hash(text)).hex()}")


def fim_split(text: str, seed: int, fim_rate: float,
              digest: bytes | None = None) -> tuple[str, str, str] | None:
    """(prefix, middle, suffix) with prefix + middle + suffix == text if this document gets FIM, else None.

    The two cut points are uniform over the character positions 0..len(text) (as in Bavarian et al. 2022),
    so the middle may be empty or the whole document.
    """
    rng = fim_rng(text, seed, digest)
    if rng.random() >= fim_rate:
        return None
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def psm(prefix: list[int], middle: list[int], suffix: list[int], tok: Tokenizer) -> list[int]:
    """Token ids of the PSM layout (without BOS/EOS) from the separately encoded parts."""
    if None in (tok.fim_begin, tok.fim_hole, tok.fim_end):
        raise ValueError("FIM needs a tokenizer with <｜fim▁begin｜>, <｜fim▁hole｜> and <｜fim▁end｜>")
    return [tok.fim_begin, *prefix, tok.fim_hole, *suffix, tok.fim_end, *middle]
