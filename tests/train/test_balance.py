"""Aux-free bias update: direction and size by hand, accumulation over micro-batches, the DP hook, MaxVio,
and the feedback loop balancing a toy model."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.moe import RouterOutput
from dsv3.train.balance import LoadAccumulator, max_vio, routers, update_bias


def biases(model) -> torch.Tensor:
    return torch.stack([r.e_score_correction_bias.clone() for r in routers(model)])


def load_only(load: list[int]) -> RouterOutput:
    """A RouterOutput where only the load matters (the bias update reads nothing else)."""
    E = len(load)
    return RouterOutput(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.zeros(1, E),
                        torch.tensor(load, dtype=torch.int64))


def test_routers_in_output_order(tiny_model):
    rs = routers(tiny_model)
    m = tiny_model
    assert rs == [m.layers[1].mlp.gate, m.layers[2].mlp.gate, m.mtp[0].block.mlp.gate]
    names = {n for n, _ in tiny_model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)  # a buffer, never a parameter


def test_update_bias_direction_and_size_by_hand(tiny_model):
    gamma = 0.001
    loads = torch.tensor([
        [3, 1, 2, 2, 0, 4, 2, 2],  # mean 2: over, under, tie, tie, under, over, tie, tie
        [2, 2, 2, 2, 2, 2, 2, 2],  # perfectly balanced: nothing moves
        [3, 0, 0, 0, 0, 0, 0, 0],  # mean 3/8: only expert 0 is over
    ])
    expected = torch.tensor([
        [-1, 1, 0, 0, 1, -1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [-1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.float32) * torch.tensor(gamma, dtype=torch.float32)
    out = update_bias(tiny_model, loads, gamma)
    assert torch.equal(out, loads)
    b = biases(tiny_model)
    assert b.dtype == torch.float32
    assert torch.equal(b, expected)
    update_bias(tiny_model, loads, gamma)  # a second step moves by gamma again
    assert torch.allclose(biases(tiny_model), 2 * expected, atol=1e-9, rtol=0)
    # float loads (e.g. all-reduced as floats) give the same signs, ties included
    update_bias(tiny_model, loads.double(), gamma)
    assert torch.allclose(biases(tiny_model), 3 * expected, atol=1e-9, rtol=0)
    for r in routers(tiny_model):
        assert not r.e_score_correction_bias.requires_grad


def test_gamma_zero_and_shape_errors(tiny_model):
    before = biases(tiny_model)
    update_bias(tiny_model, torch.tensor([[5, 0, 0, 0, 0, 0, 0, 0]] * 3), 0.0)
    assert torch.equal(biases(tiny_model), before)
    with pytest.raises(ValueError, match="3 MoE routers"):
        update_bias(tiny_model, torch.ones(2, 8, dtype=torch.long), 0.001)


def test_accumulated_loads_over_micro_batches_decide(tiny_model):
    """The last micro-batch alone says expert 0 is under-loaded; the step's sum says it is over-loaded."""
    acc = LoadAccumulator()
    micro = [
        [[9, 1, 1, 1, 1, 1, 1, 1]] * 3,
        [[1, 3, 1, 1, 1, 1, 1, 7]] * 3,
        [[0, 2, 2, 2, 2, 2, 2, 4]] * 3,
    ]
    for mb in micro:
        acc.add([load_only(row) for row in mb])
    total = acc.take()
    assert torch.equal(total, torch.tensor([[10, 6, 4, 4, 4, 4, 4, 12]] * 3))  # summed by hand; mean 6
    assert acc.take() is None  # take() starts the next step from zero
    update_bias(tiny_model, total, 0.01)
    sign = torch.tensor([-1, 0, 1, 1, 1, 1, 1, -1], dtype=torch.float32)
    assert torch.allclose(biases(tiny_model), (sign * 0.01).expand(3, 8), atol=1e-9, rtol=0)


def test_accumulator_sums_real_forward_loads(tiny_model):
    cfg = tiny_model.cfg
    acc = LoadAccumulator()
    expect = torch.zeros(3, cfg.n_routed_experts, dtype=torch.int64)
    B, S = 2, 6
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            out = tiny_model(torch.randint(0, cfg.vocab_size, (B, S)))
            acc.add(out.router)
            for layer, r in enumerate(out.router):
                for e in r.topk_idx.flatten().tolist():
                    expect[layer, e] += 1
    total = acc.take()
    assert torch.equal(total, expect)
    assert total.sum(-1).tolist() == [3 * B * S * cfg.num_experts_per_tok] * 3


def test_all_reduce_hook_sees_the_global_loads(tiny_model):
    local = torch.tensor([[4, 0, 2, 2, 2, 2, 2, 2]] * 3)
    other_rank = torch.tensor([[0, 4, 2, 2, 2, 2, 2, 2]] * 3)
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return t + other_rank  # what a SUM all-reduce over two ranks would return

    out = update_bias(tiny_model, local, 0.001, all_reduce=fake_all_reduce)
    assert len(calls) == 1 and torch.equal(calls[0], local)
    assert torch.equal(out, local + other_rank)
    # globally every expert holds 4 = the mean: no bias moves, though this rank alone is unbalanced
    assert torch.equal(biases(tiny_model), torch.zeros(3, 8))


def test_max_vio_by_hand():
    loads = torch.tensor([[3, 1, 2, 2], [2, 2, 2, 2], [0, 0, 0, 8], [0, 0, 0, 0]])
    assert torch.allclose(max_vio(loads), torch.tensor([0.5, 0.0, 3.0, 0.0], dtype=torch.float64))
    assert abs(max_vio(loads).mean().item() - 0.875) < 1e-12


def test_bias_update_balances_a_skewed_toy_model(tiny_model):
    """A fixed batch over only 4 token ids with a sharpened router piles onto a few experts (MaxVio ~1.7);
    the weights stay frozen and only the bias reacts, with gamma 10x the paper's."""
    with torch.no_grad():
        for r in routers(tiny_model):
            r.weight.mul_(4.0)
    torch.manual_seed(0)
    tokens = torch.randint(0, 4, (4, 32))
    vios = []
    with torch.no_grad():
        for _ in range(40):
            out = tiny_model(tokens)
            loads = torch.stack([r.load for r in out.router])
            vios.append(max_vio(loads).mean().item())
            update_bias(tiny_model, loads, gamma=0.01)
    start, end = vios[0], sum(vios[-10:]) / 10
    assert start > 1.0, f"the toy should start unbalanced (MaxVio {start:.2f})"
    assert end < 0.4 * start, f"MaxVio {start:.2f} -> {end:.2f}"
    assert biases(tiny_model).abs().max().item() > 0.05  # the bias, not chance, did it


def test_accumulator_refuses_micro_batches_with_another_number_of_layers():
    # [1, E] + [2, E] would broadcast silently: the accumulator must refuse it
    acc = LoadAccumulator()
    acc.add([load_only([1, 2, 3, 4])])
    with pytest.raises(ValueError, match="do not match"):
        acc.add([load_only([1, 2, 3, 4]), load_only([4, 3, 2, 1])])


def test_init_weights_starts_every_bias_at_zero(tiny_model):
    # a model built on the meta device (or re-initialised) holds arbitrary bias values: init_weights zeroes them
    for r in routers(tiny_model):
        r.e_score_correction_bias.fill_(0.5)
    tiny_model.init_weights(0.09)
    for r in routers(tiny_model):
        assert r.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(r.e_score_correction_bias, torch.zeros_like(r.e_score_correction_bias))
