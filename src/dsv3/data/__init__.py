"""Data: tokenizers, corpora, Fill-in-the-Middle, packing, token caches and batches (SPEC section 4)."""

from dsv3.data.corpus import (
    doc_hash,
    is_validation,
    iter_documents,
    read_documents,
    resolve_files,
    stdlib_files,
)
from dsv3.data.dataset import (
    Batch,
    TokenCache,
    TokenDataset,
    encode_documents,
    pack_documents,
    tokenize_corpus,
)
from dsv3.data.fim import fim_split, psm
from dsv3.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

__all__ = [
    "Batch", "SPECIAL_TOKENS", "TokenCache", "TokenDataset", "Tokenizer", "doc_hash", "encode_documents",
    "fim_split", "is_validation", "iter_documents", "pack_documents", "psm", "read_documents",
    "resolve_files", "stdlib_files", "tokenize_corpus", "train_bpe",
]
