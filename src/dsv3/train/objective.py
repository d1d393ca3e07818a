"""The pre-training objective (paper §2.1.2 eqs. 17-20 and §2.2 eqs. 24-25; SPEC 1.5-1.6).

    L = CE(next token) + (lambda / D) * sum_k CE_k + alpha * L_bal

A batch is `tokens [B, S+1]`: the model sees `inputs = tokens[:, :-1]` and is scored against
`targets = tokens[:, 1:]`, so `targets[:, i]` is the token after input position i. All cross-entropies are
computed on float32 logits (a bf16 log-softmax over 129K classes loses the small probabilities that
carry the gradient).

Balance modes (the paper's ablation, Table 5, compares the first two):
  `aux-free` (default)  bias update b_i += gamma * sign(mean - load_i) after each step (dsv3.train.balance)
                        plus the complementary sequence-wise loss with a tiny alpha = 1e-4;
  `aux-loss`            no bias update, only the sequence-wise loss, with a larger alpha (default 1e-3,
                        the auxiliary-loss baseline of Wang et al. 2024 and the config's `aux_loss_alpha`);
  `none`                neither (the balance term is still measured, for logging, without a gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsv3.model.moe import RouterOutput
from dsv3.model.transformer import DeepSeekV3Output

BALANCE_MODES = ("aux-free", "aux-loss", "none")
_DEFAULT_ALPHA = {"aux-free": 1e-4, "aux-loss": 1e-3, "none": 0.0}


@dataclass(frozen=True)
class ObjectiveConfig:
    """How the loss is assembled. `alpha` None picks the mode's default (1e-4, 1e-3 or 0)."""

    balance: str = "aux-free"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance mode must be one of {', '.join(BALANCE_MODES)} (got {self.balance!r})")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"balance alpha must be >= 0 (got {self.alpha!r})")
        if self.balance == "none" and self.alpha:
            raise ValueError(f"balance mode 'none' takes no alpha (got {self.alpha!r}); use 'aux-loss'")

    @property
    def seq_alpha(self) -> float:
        """Weight of the sequence-wise balance loss (eq. 17)."""
        return _DEFAULT_ALPHA[self.balance] if self.alpha is None else self.alpha

    @property
    def bias_update(self) -> bool:
        """Whether the loop should apply the auxiliary-loss-free bias update after each optimiser step."""
        return self.balance == "aux-free"


@dataclass
class LossParts:
    """The total loss (with its graph) and its parts, detached, for logging.

    ntp: next-token CE. mtp: CE_k per depth k = 1..D (unweighted). balance: sum_i f_i P_i averaged over
    sequences and MoE layers, before alpha (1.0 when every sequence is perfectly balanced; E / K_r at worst).
    """

    loss: torch.Tensor
    ntp: torch.Tensor
    mtp: list[torch.Tensor] = field(default_factory=list)
    balance: torch.Tensor | None = None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over the positions where `mask` is true (all when None).

    logits [..., V] (any float dtype, the math is float32), targets [...] int64, mask [...] bool or 0/1.
    """
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none")
    if mask is None:
        return ce.mean()
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)  # clamp: a fully masked micro-batch contributes 0, not NaN


def mtp_losses(
    mtp_logits: Sequence[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """CE_k for each depth k = 1..D (eq. 24), mean over the positions that have a target.

    Depth k at input position i predicts input token i+k+1, which is `targets[:, i+k]`; positions
    i >= S-k have no target in the batch (the model fed them wrapped-around tokens) and are dropped.
    The paper divides the sum by T rather than by the S-k terms; the mean is our choice because it also
    handles the loss mask, and the two differ by a factor (S-k)/S (0.9998 at S=4096, k=1).
    """
    S = targets.shape[1]
    out = []
    for k, logits in enumerate(mtp_logits, start=1):
        if k >= S:
            raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens (got {S})")
        m = None if mask is None else mask[:, k:]
        out.append(cross_entropy(logits[:, : S - k], targets[:, k:], m))
    return out


def sequence_balance_loss(routers: Sequence[RouterOutput], batch_size: int) -> torch.Tensor:
    """sum_i f_i P_i per sequence (eqs. 17-20 without alpha), averaged over sequences and MoE layers.

    For each sequence of T tokens and N_r routed experts, K_r of them selected per token:
      s'_{i,t} = s_{i,t} / sum_j s_{j,t}             (normalised over ALL experts, eq. 19)
      P_i      = (1/T) sum_t s'_{i,t}                  (eq. 20)
      f_i      = N_r / (K_r T) * sum_t 1[i selected at t]   (eq. 18)
    "Selected" is the dispatched top-K (`topk_idx`, top-K of the biased scores, as Megatron-Core does);
    the paper's eq. 18 writes top-K of s, which coincides when b = 0 (SPEC 1.5). f carries no gradient:
    the loss pushes down the affinities P_i of the experts that are over-used in that sequence.
    Router outputs are flat over the batch ([B*S, ...], sequence-major, as the MoE layer flattens them).
    """
    if not routers:
        return torch.zeros(())
    losses = []
    for r in routers:
        BT, E = r.scores.shape
        K = r.topk_idx.shape[1]
        if BT % batch_size:
            raise ValueError(f"router saw {BT} tokens, not a multiple of batch_size={batch_size}")
        T = BT // batch_size
        s = r.scores.float()
        P = (s / s.sum(-1, keepdim=True)).view(batch_size, T, E).mean(1)  # [B, E]
        idx = r.topk_idx.reshape(batch_size, T * K)
        counts = torch.zeros(batch_size, E, device=s.device, dtype=s.dtype)
        counts.scatter_add_(1, idx, torch.ones(idx.shape, device=s.device, dtype=s.dtype))
        f = counts * (E / (K * T))  # [B, E]
        losses.append((f * P).sum(-1).mean())
    return torch.stack(losses).mean()


def compute_loss(
    out: DeepSeekV3Output,
    tokens: torch.Tensor,
    cfg: ObjectiveConfig | None = None,
    mtp_lambda: float = 0.3,
    mask: torch.Tensor | None = None,
) -> LossParts:
    """L = CE + (lambda / D) sum_k CE_k + alpha * L_bal for `out = model(tokens[:, :-1])`.

    tokens [B, S+1]; mask [B, S] (optional) marks the targets `tokens[:, 1:]` that count (e.g. not padding).
    The balance term covers every routed token, masked or not: each of them was dispatched to experts.
    `mtp_lambda` comes from the schedule (0.3 for the first 10T/14.8T tokens, then 0.1).
    """
    cfg = cfg or ObjectiveConfig()
    targets = tokens[:, 1:]
    B, S = targets.shape
    if out.logits.shape[:2] != (B, S):
        raise ValueError(f"logits cover {tuple(out.logits.shape[:2])} positions; tokens [B, S+1] give {B, S}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask must have the targets' shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    ntp = cross_entropy(out.logits, targets, mask)
    loss = ntp
    mtp = mtp_losses(out.mtp_logits, targets, mask)
    if mtp:
        loss = loss + (mtp_lambda / len(mtp)) * torch.stack(mtp).sum()
    balance = None
    if out.router:
        alpha = cfg.seq_alpha
        if alpha > 0:
            balance = sequence_balance_loss(out.router, B)
            loss = loss + alpha * balance
        else:
            with torch.no_grad():  # measured for logging only
                balance = sequence_balance_loss(out.router, B)
        balance = balance.detach()
    return LossParts(loss=loss, ntp=ntp.detach(), mtp=[c.detach() for c in mtp], balance=balance)
