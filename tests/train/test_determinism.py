"""Reproducible runs need a deterministic backward on the CPU with several threads (bit-identical resume)."""

from __future__ import annotations

import torch

from dsv3.config import preset
from dsv3.model import DeepSeekV3
from dsv3.train.objective import compute_loss


def test_backward_is_deterministic_with_two_threads():
    # the `tiny` preset on 2 x 256 tokens: large enough that the backward of `x[idx]` (index_put_ with
    # accumulate), which the MoE dispatch used before, summed each token's 4 gradient rows in a
    # thread-dependent order
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = DeepSeekV3(preset("tiny"))
        model.init_weights(0.03)
        tokens = torch.randint(0, 4096, (2, 257))

        def grads() -> dict[str, torch.Tensor]:
            model.zero_grad()
            compute_loss(model(tokens[:, :-1]), tokens).loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        first = grads()
        for _ in range(3):
            again = grads()
            assert all(torch.equal(first[n], again[n]) for n in first), \
                [n for n in first if not torch.equal(first[n], again[n])]
    finally:
        torch.set_num_threads(threads)
