"""MTP speculative decoding (paper §2.2, "Inference"): draft k tokens with the MTP modules, verify them in one
forward of the main model, and accept with the rule that leaves the output distribution unchanged.

Acceptance (Leviathan et al. 2023; Chen et al. 2023): with target probabilities p and draft probabilities q,
draft x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the next token is
drawn from norm(max(0, p_j - q_j)); when all k are accepted a bonus token is drawn from p_{k+1}. Every emitted
token is then distributed exactly as plain sampling from p. Greedy rows have one-hot p and q, so the same rule
accepts exactly the drafts that equal the target argmax and emits the argmax otherwise: greedy speculation
reproduces greedy decoding token for token.

Drafting state. The sequence has N committed tokens; the main model and every MTP module have positions
0 .. N-2 cached (the newest token is fed by the next verification). MTP module depth k keeps its latents at
slot s = i + k - 1 for the pair (h^{k-1}_i, t_{i+k}) of main position i: a constant shift per module (RoPE is
relative, SPEC 1.6) that makes every depth's valid slots 0 .. N-2, the same as the main model's, so one
length and one block table serve all layers. Depth 1 at slot N-2 sees (h^0_{N-2}, t_{N-1}) and predicts t_N:
that is draft 1, computed when the previous step was accepted. Draft j <= D runs depth j over the slots
N-1 .. N+j-3 (the pairs whose tokens are drafts), which is the trained MTP chain given drafts 1..j-1. Past
the last module, depth D is reused one slot at a time with its own normed output as the next hidden. After
verification the accepted positions are written again with true hiddens and tokens ("catch-up"), in a
fixed-size window of k+1 slots whose tail beyond the accepted count is overwritten later.
Approximation, draft quality only: depths >= 2 have no pair for their first k-1 slots; the prefill fills
them from the nearest pair.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from dsv3.infer.model_runner import ModelRunner
from dsv3.infer.sampling import probabilities, sample, uniforms
from dsv3.infer.sequence import Sequence


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule, batched over rows.

    p [B, k+1, V]: target probabilities at the k+1 verified positions; q [B, k, V]: draft probabilities;
    drafts [B, k]: the drafted tokens (sampled from q); u [B, k+1] uniforms in [0, 1).
    Returns (accepted [B]: how many leading drafts are kept, next_token [B]: the correction or bonus token).
    """
    B, k = drafts.shape
    idx = drafts.unsqueeze(-1)
    p_d = p[:, :k].gather(-1, idx).squeeze(-1)
    q_d = q.gather(-1, idx).squeeze(-1)
    ok = u[:, :k] * q_d < p_d  # P(u < p/q) = min(1, p/q); q_d > 0 because the draft was sampled from q
    accepted = ok.long().cumprod(-1).sum(-1)  # drafts before the first rejection
    at = accepted.view(B, 1, 1).expand(-1, 1, p.shape[-1])
    p_at = p.gather(1, at).squeeze(1)
    q_at = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], 1).gather(1, at).squeeze(1)  # bonus: q = 0
    residual = (p_at - q_at).clamp(min=0)
    # a rejection implies p(x) < q(x) somewhere, hence p > q elsewhere: the residual has mass. Guard rounding.
    dist = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
    return accepted, sample(dist, u[:, k])


class Drafter(Protocol):
    """Proposes `k` draft tokens per running sequence and learns from what was accepted."""

    k: int

    def after_prefill(
        self, runner: ModelRunner, seqs: list[Sequence], hidden: torch.Tensor, tokens: torch.Tensor,
        lengths: torch.Tensor, next_tokens: torch.Tensor,
    ) -> None:
        """hidden [B, L, d] and tokens [B, L] of the prefill (rows padded), lengths [B], new tokens [B]."""

    def propose(self, runner: ModelRunner, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens [B, k] and the probabilities they were sampled from [B, k, V] (None allowed when every
        row is greedy: acceptance then compares the drafts with the argmax). The step is prepared:
        `runner.step` holds its device tensors (start positions, block tables)."""

    def after_verify(
        self, runner: ModelRunner, seqs: list[Sequence], hidden: torch.Tensor, drafts: torch.Tensor,
        accepted: torch.Tensor, next_tokens: torch.Tensor,
    ) -> None:
        """hidden [B, k+1, d] of the verification forward; accepted [B] and next_tokens [B] from
        accept_drafts. Called before the sequences' lengths move on (num_cached is the verified step's)."""


class MTPDrafter:
    """Drafts with the model's MTP modules; each sequence's `draft` state is the normed output of every depth
    at its last valid slot N-2, [D, d] (depth 1's predicts draft 1; deeper ones feed the next depth)."""

    def __init__(self, model: torch.nn.Module, k: int):
        if k < 1:
            raise ValueError(f"speculative drafts per step must be >= 1 (got {k})")
        if len(model.mtp) == 0:
            raise ValueError("MTP speculation needs MTP modules and this model has none "
                             "(num_nextn_predict_layers=0)")
        self.k = k
        self.depths = len(model.mtp)

    def _catch_up(
        self, runner: ModelRunner, seqs: list[Sequence], h0: torch.Tensor, next_tok: torch.Tensor,
        start: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor | None, fresh: bool,
    ) -> None:
        """Run every depth over slots start.. with true inputs; keep each depth's output at start+last."""
        rows = torch.arange(len(seqs), device=h0.device)
        old = None if fresh else torch.stack([s.draft for s in seqs])  # [B, D, d] outputs at slot start-1
        h_in, outs = h0, []
        for depth in range(self.depths):
            out = runner.mtp(depth, seqs, h_in, next_tok, start, lengths, fresh)
            outs.append(out[rows, last])
            # depth+1 at slot s takes this depth's output at slot s-1 (a prefill's slot -1: the nearest, 0)
            carry = out[:, :1] if fresh else old[:, depth].unsqueeze(1)
            h_in = torch.cat([carry, out[:, :-1]], dim=1)
        state = torch.stack(outs, dim=1)  # [B, D, d]
        for b, seq in enumerate(seqs):
            seq.draft = state[b]

    def after_prefill(
        self, runner: ModelRunner, seqs: list[Sequence], hidden: torch.Tensor, tokens: torch.Tensor,
        lengths: torch.Tensor, next_tokens: torch.Tensor,
    ) -> None:
        # slot s pairs h_s with t_{s+1}: the prompt shifted left, the sampled token at each row's last slot
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).scatter(1, (lengths - 1).unsqueeze(1),
                                                                       next_tokens.unsqueeze(1))
        start = torch.zeros_like(lengths)
        self._catch_up(runner, seqs, hidden, nxt, start, lengths - 1, lengths, fresh=True)

    def after_verify(
        self, runner: ModelRunner, seqs: list[Sequence], hidden: torch.Tensor, drafts: torch.Tensor,
        accepted: torch.Tensor, next_tokens: torch.Tensor,
    ) -> None:
        # slots N-1 .. N-1+k pair h with the tokens that follow: accepted drafts, then the sampled token
        nxt = torch.cat([drafts, drafts[:, -1:]], dim=1)
        nxt = nxt.scatter(1, accepted.unsqueeze(1), next_tokens.unsqueeze(1))
        start = runner.step.rows_start  # slot N-1 of each row: its num_cached, already on the device
        self._catch_up(runner, seqs, hidden, nxt, start, accepted, None, fresh=False)

    def propose(self, runner: ModelRunner, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = runner.model
        params = [s.params for s in seqs]
        greedy = all(p.greedy for p in params)  # then the drafts are argmaxes and nobody needs q
        state = torch.stack([s.draft for s in seqs])  # [B, D, d]
        u = None if greedy else uniforms([s.generator for s in seqs], self.k, state.device)
        start = runner.step.rows_start  # slot N-1 of each row: its num_cached, already on the device
        drafts: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []

        def draw(logits: torch.Tensor) -> None:
            if greedy:
                drafts.append(logits.argmax(-1))  # = sampling the one-hot `probabilities` give greedy rows
            else:
                probs.append(probabilities(logits, params))
                drafts.append(sample(probs[-1], u[:, len(drafts)]))

        draw(model.lm_head(state[:, 0]))
        window = state[:, :1]  # depth j-1's outputs at slots N-2 .. N+j-4, the hiddens depth j takes
        for j in range(2, self.k + 1):
            tok = torch.stack(drafts, dim=1)
            if j <= self.depths:  # depth j over the drafted pairs: slots N-1 .. N+j-3
                out = runner.mtp(j - 1, seqs, window, tok, start)
                window = torch.cat([state[:, j - 1 : j], out], dim=1)
            else:  # reuse the last depth one slot further, fed its own output
                out = runner.mtp(self.depths - 1, seqs, window[:, -1:], tok[:, -1:], start + j - 2)
                window = out
            draw(model.lm_head(out[:, -1]))
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None


class FixedDrafter:
    """Drafts every token from one fixed distribution, whatever the context (tests of the acceptance rule)."""

    def __init__(self, q: torch.Tensor, k: int):
        self.q = q
        self.k = k

    def after_prefill(self, *args: object) -> None:
        pass

    def after_verify(self, *args: object) -> None:
        pass

    def propose(self, runner: ModelRunner, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        u = uniforms([s.generator for s in seqs], self.k, runner.device)
        q = self.q.to(runner.device).expand(len(seqs), self.k, -1)
        return sample(q, u), q
