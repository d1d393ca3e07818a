"""Document masking: packed documents with doc_ids give exactly what each document gives on its own."""

from __future__ import annotations

import torch

from dsv3.model import DeepSeekV3
from tests.train.conftest import tiny_config


def test_doc_mask_equals_documents_run_separately():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=64, rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0})
    model = DeepSeekV3(cfg)
    model.init_weights(0.2)
    model = model.double().eval()
    lengths = [5, 9, 3]  # three documents packed into one row, a second row of one whole document
    docs = [torch.randint(0, 64, (n,)) for n in lengths]
    row0 = torch.cat(docs)
    row1 = torch.randint(0, 64, (sum(lengths),))
    tokens = torch.stack([row0, row1])
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]),
                           torch.zeros(sum(lengths), dtype=torch.long)])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        unmasked = model(tokens)
        alone = [model(d.unsqueeze(0)) for d in docs]
        whole = model(row1.unsqueeze(0))
    start = 0
    for d, out in zip(docs, alone, strict=True):
        n = len(d)
        # RoPE is relative: a document at offset `start` attends exactly as one at 0 (float64 rounding)
        torch.testing.assert_close(packed.logits[0, start:start + n], out.logits[0], rtol=1e-9, atol=1e-9)
        # MTP at position i sees token i+1: inside the document for i < n-1
        torch.testing.assert_close(packed.mtp_logits[0][0, start:start + n - 1], out.mtp_logits[0][0, : n - 1],
                                   rtol=1e-9, atol=1e-9)
        start += n
    torch.testing.assert_close(packed.logits[1], whole.logits[0], rtol=1e-9, atol=1e-9)
    # without the mask the later documents see the earlier ones
    assert not torch.allclose(unmasked.logits[0, lengths[0]:], packed.logits[0, lengths[0]:], atol=1e-6)
