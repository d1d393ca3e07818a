"""Validation loss, bits per byte, and a plain sampling loop for checking a checkpoint by eye.

Bits per byte makes models with different tokenizers comparable: the total next-token loss in nats over
the evaluated targets, divided by ln 2 times the UTF-8 bytes those target tokens stand for,

    bpb = sum_t -ln p(x_t | x_<t) / (ln 2 * sum_t bytes(x_t)),

where special tokens (BOS, EOS, FIM markers) stand for 0 bytes but their loss still counts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dsv3.data.dataset import Batch
from dsv3.data.tokenizer import Tokenizer
from dsv3.infer.sampling import SamplingParams, probabilities, uniforms
from dsv3.infer.sampling import sample as draw
from dsv3.model import DeepSeekV3


@dataclass
class EvalResult:
    loss: float  # mean next-token CE (nats) over the targets
    bpb: float  # bits per UTF-8 byte of the targets
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes of the targets
    mtp: list[float] = field(default_factory=list)  # mean CE_k per MTP depth over the positions with a target


def autocast_context(
    device: torch.device, enabled: bool = True, cpu: bool = False
) -> contextlib.AbstractContextManager:
    """bf16 autocast (float32 master weights, bf16 matmuls): on CUDA when `enabled`, on the CPU only when `cpu`
    is asked for too. Float32 is the CPU default: CPUs without native bf16 multiply it slower, and the demo and
    the resume test are specified in float32; CPUs with avx512_bf16 or AMX multiply bf16 faster than float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: DeepSeekV3, batches: Iterable[Batch], token_bytes: np.ndarray | torch.Tensor, *,
    device: torch.device | str = "cpu", autocast: bool = True, doc_mask: bool = False, cpu_autocast: bool = False,
) -> EvalResult:
    """Next-token loss, bits per byte and MTP losses of `model` over `batches` (Batch.tokens [B, S+1])."""
    device = torch.device(device)
    nbytes_of = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    nats, count, nbytes = 0.0, 0, 0
    mtp_nats: list[float] = []
    mtp_count: list[int] = []
    try:
        for batch in batches:
            tokens = batch.tokens.to(device)
            doc_ids = batch.doc_ids.to(device) if doc_mask and batch.doc_ids is not None else None
            targets = tokens[:, 1:]
            S = targets.shape[1]
            with autocast_context(device, autocast, cpu_autocast):
                out = model(tokens[:, :-1], doc_ids=doc_ids)
            # float64 sums: a validation set of millions of tokens adds up exactly enough
            nats += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
            nbytes += int(nbytes_of[targets].sum().item())
            for k, logits in enumerate(out.mtp_logits, start=1):
                if k >= S:
                    continue
                ce = F.cross_entropy(logits[:, : S - k].flatten(0, 1).float(), targets[:, k:].flatten(),
                                     reduction="sum").item()
                if len(mtp_nats) < k:
                    mtp_nats.append(0.0)
                    mtp_count.append(0)
                mtp_nats[k - 1] += ce
                mtp_count[k - 1] += targets[:, k:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation got no batches: the validation data is empty")
    return EvalResult(
        loss=nats / count, bpb=nats / (math.log(2) * nbytes) if nbytes else float("nan"), tokens=count,
        bytes=nbytes, mtp=[n / c for n, c in zip(mtp_nats, mtp_count, strict=True)],
    )


@torch.no_grad()
def sample(
    model: DeepSeekV3, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    top_k: int = 0, seed: int = 0, device: torch.device | str = "cpu",
) -> str:
    """Continue `prompt` (BOS first) by recomputing the whole sequence for every new token: greedy when
    temperature is 0, else sampled from softmax(logits / temperature), restricted to the top_k when > 0.
    Stops at EOS or after max_new_tokens; returns the new text only. The fast path is dsv3.infer."""
    if temperature < 0 or top_k < 0 or max_new_tokens < 0:
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0, max_new_tokens >= 0 "
                         f"(got {temperature}, {top_k}, {max_new_tokens})")
    device = torch.device(device)
    # the engine's sampling (dsv3.infer.sampling): its temperature / top-k rule and inverse-CDF draws
    params = SamplingParams(max_tokens=max(1, max_new_tokens), temperature=temperature, top_k=top_k, seed=seed)
    gen = params.generator()
    ids = tokenizer.encode(prompt)
    context = model.cfg.max_position_embeddings
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            x = torch.tensor([(ids + new)[-context:]], device=device)
            logits = model(x, mtp=False).logits[0, -1].float().cpu()
            logits[len(tokenizer):] = float("-inf")  # padding rows of the embedding are no token
            nxt = int(draw(probabilities(logits[None], [params]), uniforms([gen], 1, "cpu")[:, 0])[0])
            if nxt == tokenizer.eos_id:
                break
            new.append(nxt)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)
