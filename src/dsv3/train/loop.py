"""`dsv3 train`: pre-training on one device with the paper's recipe, as a linear recipe (shared/STYLE.md 5).

settings -> run directory -> tokenizer -> token cache -> model and AdamW (fresh, or from the run's latest
checkpoint) -> steps: batch (size from the ramp) -> micro-batches (forward, loss / n_micro, backward) ->
clip -> lr -> AdamW step -> aux-free bias update from the loads of ALL the step's micro-batches -> metrics,
validation, checkpoint -> plots.

Resuming restores everything a step depends on (weights with their routing biases, AdamW moments, the
data order position, RNG states, step and token counts, from which every schedule is a pure function), so on
the CPU the resumed loss sequence is bit-identical to an uninterrupted run (tests/train/test_loop.py).
SIGINT/SIGTERM finish the current step, save a checkpoint and return; a second signal aborts at once,
and the atomic checkpoint write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsv3.argtypes import resolve_device
from dsv3.checkpoint import load_model, write_atomic
from dsv3.config import ConfigError, ModelConfig
from dsv3.data.corpus import iter_documents, limit_bytes, split_documents
from dsv3.data.dataset import TokenDataset, tokenize_corpus
from dsv3.data.tokenizer import Tokenizer, train_bpe
from dsv3.model import DeepSeekV3
from dsv3.train.balance import LoadAccumulator, max_vio, routers, update_bias
from dsv3.train.evaluate import EvalResult, autocast_context, evaluate
from dsv3.train.objective import LossParts, ObjectiveConfig, compute_loss
from dsv3.train.optim import build_optimizer, clip_grad_norm, init_model, load_optimizer_state, set_lr
from dsv3.train.run import RunConfig
from dsv3.train.schedule import ScheduleConfig, batch_size, gamma_at, lr_at, mtp_lambda_at, total_steps
from dsv3.train.state import (
    checkpoint_dirs,
    latest_checkpoint,
    load_trainer_state,
    remove_partial,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    stopped: str | None  # None (ran to the end), "SIGINT", "SIGTERM" or "time limit"
    checkpoint: Path | None
    first_eval: EvalResult | None = None  # the first validation pass of this invocation
    last_eval: EvalResult | None = None
    maxvio: float | None = None  # mean MaxVio of the last 10% of this invocation's steps
    elapsed_s: float = 0.0
    plots: list[Path] = field(default_factory=list)


def train(run: RunConfig, *, resume: bool = False,
          callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train as `run` says, in directory run.run.dir (resume=True continues its latest checkpoint).
    `callback(step, row)` runs after each step's metrics row (tests use it to send signals)."""
    t_begin = time.perf_counter()
    run.validate()
    t, d, log = run.train, run.data, run.log
    run_dir = Path(run.run.dir)

    # ---- the run directory: fresh, or the checkpoint to continue from --------------------------------
    ckpt, state = None, None
    if resume:
        remove_partial(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_trainer_state(ckpt)
        elif (run_dir / METRICS).exists():  # the run stopped before its first checkpoint: start it over
            say(f"{run_dir}: no checkpoint yet (the run stopped before its first save); starting it over", True)
            (run_dir / METRICS).unlink()
            for events in run_dir.glob("events.out.tfevents.*"):
                events.unlink()
            resume = False
        else:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (expected {run_dir}/checkpoints/)")
    elif checkpoint_dirs(run_dir) or (run_dir / METRICS).exists():
        raise ValueError(f"{run_dir} already holds a run: continue it with `dsv3 train --resume {run_dir}`, "
                         "or choose another --run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    # time trained before this invocation (metrics' elapsed_s goes on from it; max_minutes counts per invocation)
    elapsed0 = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0
    device = resolve_device(t.device, "run setting `train.device`")
    if t.compile and device.type == "cpu" and not t.cpu_bf16:
        raise ConfigError("run setting `train.compile` on the CPU needs `train.cpu_bf16 = true`: torch.compile's "
                          "grouped GEMM (the routed experts) takes bf16 only")
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # ---- tokenizer, model config, data ---------------------------------------------------------------
    tok = Tokenizer.from_pretrained(ckpt) if ckpt else build_tokenizer(run, run_dir)
    cfg = run.model_config()
    if cfg.vocab_size < len(tok):
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} ids; "
                          "raise --model.vocab_size or train a smaller tokenizer (--data.vocab_size)")
    if cfg.max_position_embeddings < d.seq_len:
        raise ConfigError(f"data.seq_len {d.seq_len} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    if d.seq_len <= cfg.num_nextn_predict_layers:
        raise ConfigError(f"data.seq_len {d.seq_len}: MTP depth {cfg.num_nextn_predict_layers} needs sequences "
                          "longer than it")
    caches = tokenize_corpus(tok, d.sources, cache_dir=d.cache_dir or None, fim_rate=d.fim_rate, seed=t.seed,
                             val_fraction=d.val_fraction, progress=log.progress)
    mb, S = t.micro_batch_size, d.seq_len
    train_data = _dataset(caches["train"], "training", S, mb, seed=t.seed, doc_ids=d.doc_mask)
    val_data = _dataset(caches["val"], "validation", S, mb, shuffle=False, doc_ids=d.doc_mask)
    if train_data.n_sequences < t.batch_size:  # found now, not when the batch ramp reaches it mid-run
        raise ConfigError(f"training split: {train_data.n_sequences} sequences of {S} tokens, fewer than "
                          f"train.batch_size {t.batch_size}: more data, or a smaller data.seq_len or train.batch_size")
    token_bytes = tok.token_bytes()

    # ---- schedules (pure functions of step and tokens) -----------------------------------------------
    sched = ScheduleConfig.scaled(
        total_tokens=t.tokens, seq_len=S, batch_max=t.batch_size, batch_multiple=mb, peak_lr=t.lr,
        warmup_steps=t.warmup_steps, gamma=t.gamma, mtp_lambda=t.mtp_lambda, mtp_lambda_late=t.mtp_lambda / 3)
    if not t.batch_ramp:
        sched = sched.replace(batch_min=t.batch_size)
    objective = ObjectiveConfig(balance=t.balance, alpha=t.alpha)

    # ---- model and optimiser -------------------------------------------------------------------------
    if ckpt:
        model = load_model(ckpt, device, torch.float32)
        if _arch(model.cfg) != _arch(cfg):
            raise ConfigError(f"{ckpt}: the checkpoint's model config differs from the run's [model] settings")
    else:
        with torch.device(device):
            model = DeepSeekV3(cfg)
        init_model(model, t.init_std)
    model.train()
    opt = build_optimizer(model, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                          bf16_moments=t.bf16_moments, fused=device.type == "cuda" or None)
    step, tokens = 0, 0
    if state is not None:
        # the saved groups bring back the saving run's hyperparameters; this run's settings win (lr is set
        # every step)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        load_optimizer_state(opt, state["optimizer"])
        for group, own in zip(opt.param_groups, settings, strict=True):
            group.update(own)
        if int(state["data"].get("seed", t.seed)) != t.seed:  # it drew the data order (and FIM's cuts)
            raise ConfigError(f"train.seed {t.seed}, but the run was trained with seed {state['data']['seed']}: "
                              "resuming keeps the seed")
        train_data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, tokens = int(state["step"]), int(state["tokens"])
        saved = run_dir / "train.toml"
        before = RunConfig.load(saved).train.tokens if saved.is_file() else t.tokens
        if before != t.tokens:  # the schedules are functions of the total: they change shape from here on
            say(f"train.tokens {before:,} -> {t.tokens:,}: the learning-rate, batch-size and loss-weight schedules "
                f"follow the new total from step {step} on (the lr jumps to where the new schedule has it)", True)
    # written once the checkpoint, model and data state are known to fit these settings: a refused resume
    # leaves the run's files as they were
    run.save(run_dir / "train.toml")
    write_atomic(run_dir / "config.json", cfg.to_json())
    forward = torch.compile(model, mode=t.compile_mode) if t.compile else model
    loss_fn = torch.compile(compute_loss, mode=t.compile_mode) if t.compile else compute_loss  # fused float32 CE

    # ---- logging -----------------------------------------------------------------------------------
    metrics_path = run_dir / METRICS
    put_off_eval = False  # an evaluation due at the checkpoint's step that a signal put off
    if resume:
        evaluated = _truncate_metrics(metrics_path, step)  # rows a crash wrote after the checkpoint
        put_off_eval = bool(state.get("eval_pending")) and not evaluated
    writer = None
    if log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir), purge_step=step + 1 if resume else None)
    metrics = open(metrics_path, "a", encoding="utf-8")

    def emit(row: dict[str, Any], prefix: str) -> None:
        # strict JSON (jq, JSON.parse): a non-finite value, such as the loss that stops a diverged run, is null
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        metrics.write(json.dumps(strict, allow_nan=False) + "\n")
        metrics.flush()
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, int | float):
                    writer.add_scalar(f"{prefix}/{k}", v, row["step"])

    def run_eval() -> EvalResult:
        # a fixed sample across the whole split (not its first documents), the same at every evaluation
        res = evaluate(forward, val_data.iter_in_order(mb, t.eval_batches, sample_seed=t.seed), token_bytes,
                       device=device, autocast=t.autocast, doc_mask=d.doc_mask, cpu_autocast=t.cpu_bf16)
        row = {"step": step, "tokens": tokens, "val_loss": res.loss, "val_bpb": res.bpb,
               "val_mtp": sum(res.mtp) / len(res.mtp) if res.mtp else None, "val_tokens": res.tokens}
        emit(row, "val")
        say(f"step {step}: val loss {res.loss:.4f}, {res.bpb:.4f} bits/byte"
            + (f", MTP {row['val_mtp']:.4f}" if res.mtp else ""), log.progress)
        return res

    def checkpoint(eval_pending: bool) -> Path:
        trainer_state = {
            "step": step, "tokens": tokens, "optimizer": opt.state_dict(), "data": train_data.state_dict(),
            "rng": rng_state(), "schedule": dataclasses.asdict(sched), "balance": t.balance,
            "elapsed_s": elapsed0 + time.perf_counter() - t_begin, "eval_pending": eval_pending,
        }
        return save_checkpoint(run_dir, step, model, tok, trainer_state, t.keep_last)

    # ---- the loop -------------------------------------------------------------------------------------
    result = TrainResult(run_dir, step, tokens, None, ckpt)
    stopper = _Stopper()
    vios: list[float] = []
    bar = tqdm(total=total_steps(sched), initial=step, unit="step", disable=not log.progress,
               dynamic_ncols=True, desc="train")
    try:
        stopper.install()
        if not resume or put_off_eval:
            result.first_eval = result.last_eval = run_eval()
        while tokens < t.tokens:
            t0 = time.perf_counter()
            B = batch_size(tokens, sched)
            lr, lam, gamma = lr_at(step, tokens, sched), mtp_lambda_at(tokens, sched), gamma_at(tokens, sched)
            batch = train_data.next_batch(B)
            out = train_step(model, opt, batch.tokens, batch.doc_ids if d.doc_mask else None, objective,
                             micro_batch_size=mb, lr=lr, mtp_lambda=lam, gamma=gamma, grad_clip=t.grad_clip,
                             device=device, autocast=t.autocast, forward=forward, loss_fn=loss_fn,
                             cpu_autocast=t.cpu_bf16)
            loads, grad_norm = out.loads, out.grad_norm
            step += 1
            tokens += B * S

            dt = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step, "tokens": tokens, "loss": out.loss.item(), "ntp": out.ntp.item(),
                "mtp": out.mtp.item() if model.cfg.num_nextn_predict_layers else None,
                "balance": out.balance.item() if loads is not None else None, "lr": lr, "batch_size": B,
                "grad_norm": None if grad_norm is None else grad_norm.item(), "maxvio": None,
                "gamma": gamma if objective.bias_update else 0.0, "mtp_lambda": lam,
                "tokens_per_s": B * S / dt, "elapsed_s": elapsed0 + time.perf_counter() - t_begin,
            }
            if loads is not None:
                row["maxvio"] = max_vio(loads).mean().item()
                vios.append(row["maxvio"])
                if step % log.load_interval == 0 or step == 1:
                    rel = loads.double() / loads.double().mean(-1, keepdim=True).clamp_min(1e-9)
                    row["load"] = [[round(v, 3) for v in layer] for layer in rel.tolist()]
            emit(row, "train")
            if not math.isfinite(row["loss"]):  # stop before a checkpoint could keep the diverged weights
                raise FloatingPointError(
                    f"the loss is {row['loss']} at step {step}; the last checkpoint "
                    f"({result.checkpoint or 'none yet'}) is kept. Lower train.lr or raise train.warmup_steps")
            bar.update(1)
            bar.set_postfix({"tok/s": f"{row['tokens_per_s']:,.0f}", "loss": f"{row['loss']:.3f}",
                             "ntp": f"{row['ntp']:.3f}",
                             "lr": f"{lr:.2e}", "MaxVio": "-" if row["maxvio"] is None else f"{row['maxvio']:.3f}"},
                            refresh=False)
            if callback is not None:
                callback(step, row)
            if stopper.signal:
                result.stopped = stopper.signal
            elif t.max_minutes and time.perf_counter() - t_begin > 60 * t.max_minutes:
                result.stopped = "time limit"
            done = tokens >= t.tokens
            eval_due = done or step % t.eval_interval == 0 or result.stopped == "time limit"
            evaluated = eval_due and not stopper.signal  # on a signal the checkpoint marks it pending instead
            if evaluated:
                result.last_eval = run_eval()
                result.first_eval = result.first_eval or result.last_eval
            result.stopped = result.stopped or stopper.signal  # a signal may arrive during the evaluation
            if done or step % t.checkpoint_interval == 0 or result.stopped:
                result.checkpoint = checkpoint(eval_pending=eval_due and not evaluated)
            result.stopped = result.stopped or stopper.signal  # ... or during the save: stop now, it is saved
            if result.stopped:
                say(f"stopped ({result.stopped}) after step {step}; checkpoint {result.checkpoint}; "
                    f"continue with `dsv3 train --resume {run_dir}`", True)
                break
    finally:
        stopper.restore()
        bar.close()
        metrics.close()
        if writer is not None:
            writer.close()
    result.step, result.tokens = step, tokens
    tail = vios[-max(1, len(vios) // 10):]
    result.maxvio = sum(tail) / len(tail) if tail else None
    result.elapsed_s = time.perf_counter() - t_begin
    if log.plots:
        from dsv3.train.plots import plot_run

        result.plots = plot_run(run_dir)
    return result


# ---- pieces -------------------------------------------------------------------------------------------

@dataclass
class StepOutput:
    """One optimiser step's losses (device scalars, means over the micro-batches), loads [L, E], grad norm."""

    loss: torch.Tensor
    ntp: torch.Tensor
    mtp: torch.Tensor  # mean over the MTP depths
    balance: torch.Tensor
    loads: torch.Tensor | None
    grad_norm: torch.Tensor | None


def train_step(
    model: DeepSeekV3, opt: torch.optim.Optimizer, tokens: torch.Tensor, doc_ids: torch.Tensor | None,
    objective: ObjectiveConfig, *, micro_batch_size: int, lr: float, mtp_lambda: float, gamma: float,
    grad_clip: float = 1.0, device: torch.device | str = "cpu", autocast: bool = True,
    forward: Callable[..., Any] | None = None, mtp: bool | None = None,
    loss_fn: Callable[..., LossParts] = compute_loss, cpu_autocast: bool = False,
) -> StepOutput:
    """One optimiser step on `tokens` [B, S+1] (B a multiple of micro_batch_size): per micro-batch forward,
    loss / n_micro, backward (so the gradient is the batch mean); clip; AdamW at `lr`; then the aux-free bias
    update (when the objective has it) from the dispatch counts of ALL micro-batches. `forward` is the model
    or its torch.compile'd wrapper, `loss_fn` compute_loss or its compiled form; `mtp=False` skips the MTP
    modules (benchmarks against MTP-less peers). `autocast`: bf16 autocast on CUDA; `cpu_autocast`: on the CPU."""
    device = torch.device(device)
    forward = model if forward is None else forward
    mb = micro_batch_size
    if tokens.shape[0] % mb:
        raise ValueError(f"train_step: {tokens.shape[0]} sequences are not a multiple of micro_batch_size {mb}")
    n_micro = tokens.shape[0] // mb
    acc = LoadAccumulator()
    loss = ntp = mtp_ce = bal = torch.zeros((), device=device)
    for i in range(n_micro):
        x = tokens[i * mb:(i + 1) * mb].to(device, non_blocking=True)
        doc = None if doc_ids is None else doc_ids[i * mb:(i + 1) * mb].to(device, non_blocking=True)
        with autocast_context(device, autocast, cpu_autocast):
            out = forward(x[:, :-1], doc_ids=doc, mtp=mtp)
            parts = loss_fn(out, x, objective, mtp_lambda)
        (parts.loss / n_micro).backward()  # the step's gradient is the mean over its micro-batches
        acc.add(out.router)
        loss = loss + parts.loss.detach() / n_micro
        ntp = ntp + parts.ntp / n_micro
        if parts.mtp:
            mtp_ce = mtp_ce + torch.stack(parts.mtp).mean() / n_micro
        if parts.balance is not None:
            bal = bal + parts.balance / n_micro
        del out, parts
    grad_norm = clip_grad_norm(model, grad_clip, opt) if grad_clip > 0 else None
    set_lr(opt, lr)
    try:
        opt.step()
    finally:
        opt.grad_scale = None  # the clipping factor clip_grad_norm handed the optimiser holds for one step only
    opt.zero_grad(set_to_none=True)
    loads = acc.take()
    if objective.bias_update and loads is not None:
        n = len(routers(model))
        if loads.shape[0] < n:  # mtp=False: the MTP blocks routed nothing; zero loads leave their bias alone
            loads = torch.cat([loads, loads.new_zeros(n - loads.shape[0], loads.shape[1])])
        update_bias(model, loads, gamma)  # after the step, from every micro-batch's dispatch counts
    return StepOutput(loss, ntp, mtp_ce, bal, loads, grad_norm)


def build_tokenizer(run: RunConfig, run_dir: Path) -> Tokenizer:
    """`data.tokenizer`: "train" (a BPE trained on the training split, kept in RUN/tokenizer), "deepseek-v3",
    or a directory holding tokenizer.json."""
    d = run.data
    if d.tokenizer == "deepseek-v3":
        return Tokenizer.deepseek_v3()
    if d.tokenizer != "train":
        return Tokenizer.from_pretrained(d.tokenizer)
    out = run_dir / "tokenizer"
    # a run that stopped before its first checkpoint may have trained one already: reuse it only if it was
    # trained as these settings say (another vocab_size or split would leave it wrong, or trained on
    # documents now held out for validation)
    trained_with = json.dumps({"sources": d.sources, "vocab_size": d.vocab_size, "val_fraction": d.val_fraction,
                               "tokenizer_max_mb": d.tokenizer_max_mb}, sort_keys=True)
    settings = out / "trained_with.json"
    if (out / "tokenizer.json").is_file() and settings.is_file() and settings.read_text() == trained_with:
        return Tokenizer.from_pretrained(out)
    # the marker goes before the files it vouches for are replaced: a run killed mid-save then trains again,
    # rather than finding the old settings' marker beside the new settings' tokenizer
    settings.unlink(missing_ok=True)
    docs = limit_bytes(split_documents(iter_documents(d.sources), "train", d.val_fraction),
                       d.tokenizer_max_mb * 1e6)  # never train on validation documents
    tok = train_bpe(docs, d.vocab_size, out, show_progress=run.log.progress)
    write_atomic(settings, trained_with)
    return tok


def _dataset(cache: Any, split: str, seq_len: int, batch: int, **kw: Any) -> TokenDataset:
    try:
        return cache.dataset(seq_len, batch, **kw)
    except ValueError as e:
        if len(cache.doc_starts) <= 1:  # no document at all: the split is by whole documents
            raise ValueError(
                f"{split} split: no documents. Documents are split by hash between training and validation, and "
                "each plain-text file is one document: give several files (a folder, a glob) or a .jsonl with "
                "one document per line") from None
        raise ValueError(f"{split} split: {e} (more data, a smaller data.seq_len, or another "
                         "data.val_fraction)") from None


def _arch(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide the network (not the dtype it happens to be stored in)."""
    d = cfg.to_dict()
    d.pop("torch_dtype", None)
    return d


def _truncate_metrics(path: Path, step: int) -> bool:
    """Keep the rows of steps <= `step` (atomically): a resumed run rewrites what came after. A row the crash
    cut short (a partial last line: full disk, kill, power loss) is dropped, not a reason to refuse resuming.
    Returns whether an evaluation row of `step` is among them."""
    if not path.is_file():
        return False
    keep, evaluated = [], False
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] <= step:
            keep.append(line)
            evaluated |= row["step"] == step and "val_loss" in row
    write_atomic(path, "".join(line + "\n" for line in keep))
    return evaluated


def say(msg: str, show: bool) -> None:
    if show:
        tqdm.write(msg)


class _Stopper:
    """SIGINT/SIGTERM set a flag that the loop reads after each step (save, then return); a second signal
    raises KeyboardInterrupt at once. Handlers are only installed in the main thread (Python's rule)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._prev: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        tqdm.write(f"{self.signal}: finishing this step, then saving a checkpoint (again to abort now)")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._prev[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)
        self._prev.clear()
