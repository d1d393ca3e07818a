"""The loss: CE against float64 torch, MTP target alignment, the sequence-wise balance loss by hand, modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.model.moe import RouterOutput
from dsv3.model.transformer import DeepSeekV3Output
from dsv3.train.objective import (
    ObjectiveConfig,
    compute_loss,
    cross_entropy,
    mtp_losses,
    sequence_balance_loss,
)

SCALE = 30.0  # logit margin: CE of a correct one-hot prediction is log(1 + (V-1) e^-30) ~ 1e-11


def one_hot_logits(pattern: torch.Tensor, V: int) -> torch.Tensor:
    """[B, S] token ids -> [B, S, V] logits with all the mass on those ids."""
    return F.one_hot(pattern, V).float() * SCALE


def distinct_tokens(B: int, n: int, V: int) -> torch.Tensor:
    """tokens[b, j] = (7 j + 3 b) mod V with V prime > 7n: no two tokens of a row are equal."""
    j = torch.arange(n)
    return torch.stack([(7 * j + 3 * b) % V for b in range(B)])


# ---- cross-entropy -------------------------------------------------------------------------------

def test_cross_entropy_matches_float64_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 4
    targets = torch.randint(0, 11, (3, 7), generator=g)
    ref = F.cross_entropy(logits.double().view(-1, 11), targets.view(-1))
    assert cross_entropy(logits, targets).dtype == torch.float32
    assert abs(cross_entropy(logits, targets).item() - ref.item()) < 1e-5
    # bf16 logits: the loss is the float32 CE of the bf16 values, not a bf16 computation
    lb = logits.bfloat16()
    ref_b = F.cross_entropy(lb.double().view(-1, 11), targets.view(-1))
    assert abs(cross_entropy(lb, targets).item() - ref_b.item()) < 1e-5
    # a mask keeps only the chosen positions, mean over them
    mask = torch.rand(3, 7, generator=g) > 0.4
    ref_m = F.cross_entropy(logits.double()[mask], targets[mask])
    assert abs(cross_entropy(logits, targets, mask).item() - ref_m.item()) < 1e-5
    assert abs(cross_entropy(logits, targets, mask.float()).item() - ref_m.item()) < 1e-5
    # a fully masked batch gives 0, not NaN
    assert cross_entropy(logits, targets, torch.zeros_like(mask)).item() == 0.0


# ---- MTP alignment ---------------------------------------------------------------------------------

def mtp_pattern(tokens: torch.Tensor, k: int, shift: int = 0) -> torch.Tensor:
    """What depth k at input position i should predict, token i+k+1 of the batch (shift moves it), written
    with loops; positions without a target get token 0, which is never right (distinct_tokens starts at 0
    only at j = 0)."""
    B, n = tokens.shape
    S = n - 1
    out = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        for i in range(S):
            j = i + k + 1 + shift
            out[b, i] = tokens[b, j] if i + k + 1 <= S and 0 <= j <= S else 0
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_targets_line_up(k):
    V, B, S = 97, 2, 10
    tokens = distinct_tokens(B, S + 1, V)
    targets = tokens[:, 1:]
    losses = mtp_losses([one_hot_logits(mtp_pattern(tokens, d), V) for d in range(1, k + 1)], targets)
    assert len(losses) == k
    assert all(c.item() < 1e-6 for c in losses)
    # off by one either way (e.g. reading mtp_logits as predicting token i+k): every position is wrong
    for shift in (-1, 1):
        wrong = one_hot_logits(mtp_pattern(tokens, k, shift), V)
        right = [one_hot_logits(mtp_pattern(tokens, d), V) for d in range(1, k)]
        ce = mtp_losses(right + [wrong], targets)[-1]
        assert ce.item() > SCALE - 1


def test_mtp_positions_without_target_are_ignored_and_mask_lines_up():
    V, B, S, k = 97, 2, 8, 1
    tokens = distinct_tokens(B, S + 1, V)
    targets = tokens[:, 1:]
    pattern = mtp_pattern(tokens, k)
    # the last k positions have no target: whatever they predict, CE stays 0
    pattern[:, S - k:] = 5
    assert mtp_losses([one_hot_logits(pattern, V)], targets)[0].item() < 1e-6
    # break depth-1 predictions at positions i = 2 and 4; they target targets[:, 3] and [:, 5]
    pattern[:, 2] = 0
    pattern[:, 4] = 0
    logits = one_hot_logits(pattern, V)
    assert abs(mtp_losses([logits], targets)[0].item() - 2 * SCALE / (S - k)) < 1e-3
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 3] = False
    mask[:, 5] = False
    assert mtp_losses([logits], targets, mask)[0].item() < 1e-6
    mask_wrong = torch.ones(B, S, dtype=torch.bool)
    mask_wrong[:, 2] = False
    mask_wrong[:, 4] = False
    assert mtp_losses([logits], targets, mask_wrong)[0].item() > 1.0


def test_compute_loss_sums_the_parts_with_lambda_over_depth():
    V, B, S = 97, 2, 10
    tokens = distinct_tokens(B, S + 1, V)
    ntp_logits = one_hot_logits(tokens[:, 1:], V)
    d1 = one_hot_logits(mtp_pattern(tokens, 1), V)
    d2_wrong = one_hot_logits(mtp_pattern(tokens, 2, shift=-1), V)  # depth 2 predicts i+2: off by one
    out = DeepSeekV3Output(logits=ntp_logits, hidden=torch.zeros(B, S, 4), mtp_logits=[d1, d2_wrong])
    parts = compute_loss(out, tokens, ObjectiveConfig(), mtp_lambda=0.3)
    assert parts.ntp.item() < 1e-6 and parts.mtp[0].item() < 1e-6
    assert abs(parts.mtp[1].item() - SCALE) < 1e-3
    assert abs(parts.loss.item() - 0.3 / 2 * SCALE) < 1e-3  # lambda / D * sum_k CE_k with D = 2
    assert parts.balance is None


# ---- sequence-wise balance loss ----------------------------------------------------------------------

def hand_balance(routers: list[tuple[torch.Tensor, torch.Tensor]], B: int) -> torch.Tensor:
    """SPEC 1.5 written out with loops in float64: per sequence sum_i f_i P_i, mean over sequences, layers."""
    total = torch.zeros((), dtype=torch.float64)
    for scores, idx in routers:
        BT, E = scores.shape
        K = idx.shape[1]
        T = BT // B
        layer = torch.zeros((), dtype=torch.float64)
        for b in range(B):
            seq = 0.0
            for i in range(E):
                P_i = 0.0
                count = 0
                for t in range(b * T, (b + 1) * T):
                    P_i = P_i + scores[t, i] / sum(scores[t, j] for j in range(E))
                    count += sum(int(idx[t, kk]) == i for kk in range(K))
                P_i = P_i / T
                f_i = E / (K * T) * count
                seq = seq + f_i * P_i
            layer = layer + seq
        total = total + layer / B
    return total / len(routers)


def router(scores: torch.Tensor, idx: torch.Tensor) -> RouterOutput:
    E = scores.shape[1]
    load = torch.bincount(idx.flatten(), minlength=E)
    return RouterOutput(topk_idx=idx, weights=torch.ones(idx.shape), scores=scores, load=load)


def test_balance_loss_hand_numbers():
    # one sequence of 2 tokens, 4 experts, top-2. Uniform dispatch: f = 1 for all, L = sum_i P_i = 1.
    s = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    even = router(s, torch.tensor([[0, 1], [2, 3]]))
    assert abs(sequence_balance_loss([even], 1).item() - 1.0) < 1e-6
    # collapsed onto experts 0, 1: f_0 = f_1 = 4 / (2 * 2) * 2 = 2; P_0 = P_1 = 0.9 / 2.0 = 0.45 -> 1.8
    collapsed = router(s, torch.tensor([[0, 1], [0, 1]]))
    assert abs(sequence_balance_loss([collapsed], 1).item() - 1.8) < 1e-6
    # mean over layers: (1 + 1.8) / 2
    assert abs(sequence_balance_loss([even, collapsed], 1).item() - 1.4) < 1e-6


def test_balance_loss_matches_float64_hand_loops_with_gradient():
    g = torch.Generator().manual_seed(1)
    B, T, E, K = 3, 5, 6, 2
    layers = []
    for _ in range(2):
        s64 = (torch.rand(B * T, E, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
        # dispatched experts need not be the top-K of s (the bias moved them): pick them at random
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)])
        layers.append((s64, idx))
    ref = hand_balance(layers, B)
    ref.backward()
    s32 = [s.detach().float().requires_grad_() for s, _ in layers]
    ours = sequence_balance_loss([router(s, idx) for s, (_, idx) in zip(s32, layers, strict=True)], B)
    ours.backward()
    assert abs(ours.item() - ref.item()) < 1e-6
    for s, (s64, _) in zip(s32, layers, strict=True):
        assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6, rtol=0)


def test_compute_loss_backpropagates_alpha_times_the_balance_gradient():
    # the total loss carries alpha * L_bal with its graph: d loss / d s = alpha * d L_bal / d s (float64 loops)
    g = torch.Generator().manual_seed(2)
    V, B, S, E, K, alpha = 11, 2, 4, 6, 2, 0.25
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    s64 = (torch.rand(B * S, E, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)])
    ref = hand_balance([(s64, idx)], B)
    ref.backward()
    s32 = s64.detach().float().requires_grad_()
    out = DeepSeekV3Output(logits=torch.randn(B, S, V, generator=g), hidden=torch.zeros(B, S, 4),
                           router=[router(s32, idx)])
    for mode in ("aux-loss", "aux-free"):
        s32.grad = None
        parts = compute_loss(out, tokens, ObjectiveConfig(mode, alpha=alpha))
        parts.loss.backward()
        assert torch.allclose(s32.grad.double(), alpha * s64.grad, atol=1e-7, rtol=0)
    s32.grad = None
    assert not compute_loss(out, tokens, ObjectiveConfig("none")).loss.requires_grad  # measured, no graph


def test_mtp_depth_must_leave_a_target_and_the_mask_must_match_the_targets():
    V, B, S = 13, 2, 3
    tokens = torch.randint(0, V, (B, S + 1))
    logits = torch.randn(B, S, V)
    assert len(mtp_losses([logits] * 2, tokens[:, 1:])) == 2  # depth 2 < S: one target per row
    with pytest.raises(ValueError, match="MTP depth 3"):
        mtp_losses([logits] * 3, tokens[:, 1:])  # depth 3 == S: no position has a target
    out = DeepSeekV3Output(logits=logits, hidden=torch.zeros(B, S, 4))
    with pytest.raises(ValueError, match="mask"):
        compute_loss(out, tokens, mask=torch.ones(B, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        compute_loss(out, tokens, mask=torch.ones(1, S, dtype=torch.bool))


# ---- modes and the real model ------------------------------------------------------------------------

def test_balance_modes():
    assert ObjectiveConfig().balance == "aux-free" and ObjectiveConfig().seq_alpha == 1e-4
    assert ObjectiveConfig().bias_update
    assert ObjectiveConfig("aux-loss").seq_alpha == 1e-3 and not ObjectiveConfig("aux-loss").bias_update
    assert ObjectiveConfig("aux-loss", alpha=0.01).seq_alpha == 0.01
    assert ObjectiveConfig("none").seq_alpha == 0.0 and not ObjectiveConfig("none").bias_update
    with pytest.raises(ValueError, match="balance mode"):
        ObjectiveConfig("aux_free")
    with pytest.raises(ValueError, match="alpha"):
        ObjectiveConfig("aux-loss", alpha=-1.0)
    with pytest.raises(ValueError, match="none"):
        ObjectiveConfig("none", alpha=0.1)


def test_compute_loss_on_the_tiny_model(tiny_model):
    torch.manual_seed(3)
    B, S = 2, 12
    tokens = torch.randint(0, tiny_model.cfg.vocab_size, (B, S + 1))
    out = tiny_model(tokens[:, :-1])
    assert len(out.router) == 3  # 2 MoE layers + the MTP block
    ntp = F.cross_entropy(out.logits.double().reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1))
    mtp = F.cross_entropy(out.mtp_logits[0][:, : S - 1].double().reshape(-1, out.logits.shape[-1]),
                          tokens[:, 2:].reshape(-1))
    bal = sequence_balance_loss(out.router, B)
    parts = compute_loss(out, tokens, ObjectiveConfig("aux-loss", alpha=0.5), mtp_lambda=0.3)
    assert abs(parts.ntp.item() - ntp.item()) < 1e-5
    assert abs(parts.mtp[0].item() - mtp.item()) < 1e-5
    assert abs(parts.balance.item() - bal.item()) < 1e-6
    assert 1.0 <= bal.item() <= tiny_model.cfg.n_routed_experts / tiny_model.cfg.num_experts_per_tok
    assert abs(parts.loss.item() - (ntp.item() + 0.3 * mtp.item() + 0.5 * bal.item())) < 1e-5
    none = compute_loss(out, tokens, ObjectiveConfig("none"), mtp_lambda=0.1)
    assert abs(none.loss.item() - (ntp.item() + 0.1 * mtp.item())) < 1e-5
    assert abs(none.balance.item() - bal.item()) < 1e-6  # still measured
    # the gradient of the alpha term reaches the router weights through the affinities P
    tiny_model.zero_grad()
    sequence_balance_loss(tiny_model(tokens[:, :-1]).router, B).backward()
    gate = tiny_model.layers[1].mlp.gate.weight.grad
    assert gate is not None and gate.abs().sum().item() > 0
    assert not math.isnan(parts.loss.item())
