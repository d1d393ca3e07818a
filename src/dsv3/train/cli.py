"""`dsv3 train`, `dsv3 eval` and `dsv3 sample`: thin argument parsing over dsv3.train."""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

import torch

from dsv3.argtypes import fraction, nonneg_int, positive_float, positive_int, resolve_device
from dsv3.config import ConfigError, is_json_number


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `train`, `eval` and `sample`; each sets `func(args) -> int` on the parsed arguments."""
    t = subparsers.add_parser(
        "train", help="pre-train a model (a TOML run file plus --SECTION.KEY VALUE overrides)",
        usage="dsv3 train [RUN.toml] [--resume RUN] [--SECTION.KEY VALUE ...]",
        description="Sections and keys: see docs/training.md (e.g. --train.tokens 2e6 --data.seq_len 256 "
                    "--model.preset tiny --run.dir runs/x). The resolved settings go to RUN/train.toml.")
    t.add_argument("--resume", metavar="RUN", help="continue the run in directory RUN from its latest checkpoint")
    t.set_defaults(func=cmd_train, overrides=[])

    e = subparsers.add_parser("eval", help="validation loss and bits per byte of a checkpoint on a corpus")
    e.add_argument("--model", required=True, metavar="DIR", help="a checkpoint directory (with its tokenizer)")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files, folders, globs, .jsonl (field 'text'), or 'stdlib'")
    e.add_argument("--split", choices=("all", "val", "train"), default="all",
                   help="all documents, or one side of the by-hash split training uses (default all)")
    e.add_argument("--val-fraction", type=fraction, default=None,
                   help="for --split: the fraction held out for validation (default: data.val_fraction of the run "
                        "the checkpoint belongs to, RUN/train.toml; else 0.02, training's default)")
    e.add_argument("--seq-len", type=positive_int, default=256, help="tokens per evaluated sequence (default 256)")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--max-batches", type=positive_int, default=None, help="evaluate at most this many batches")
    e.add_argument("--sample", type=nonneg_int, default=None, metavar="SEED",
                   help="take the sequences in a random order drawn from SEED: with --max-batches, a sample of "
                        "the whole corpus instead of its first documents")
    e.add_argument("--doc-mask", action="store_true", help="attention within each document only")
    _device_args(e)
    e.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("sample", help="a few greedy/temperature continuations of a prompt (full recompute)")
    s.add_argument("--model", required=True, metavar="DIR", help="a checkpoint directory (with its tokenizer)")
    s.add_argument("--prompt", required=True, help="the text to continue (BOS is added)")
    s.add_argument("-n", "--num-samples", type=positive_int, default=3, help="the first is greedy, the rest sampled")
    s.add_argument("--max-new-tokens", type=positive_int, default=64)
    s.add_argument("--temperature", type=positive_float, default=0.8, help="for the sampled continuations")
    s.add_argument("--top-k", type=nonneg_int, default=50, help="sample among the k most likely tokens (0: all)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    _device_args(s)
    s.set_defaults(func=cmd_sample)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="default: float32 on the CPU, bfloat16 on GPU")


def cmd_train(args: argparse.Namespace) -> int:
    from dsv3.train.loop import train
    from dsv3.train.run import RunConfig

    positional = [a for a in args.overrides[:1] if not a.startswith("--")]
    overrides = args.overrides[len(positional):]
    if args.resume:
        if positional:
            raise ConfigError("--resume RUN reads RUN/train.toml; give no run file with it")
        if any(a == "--run.dir" or a.startswith("--run.dir=") for a in overrides):
            raise ConfigError("--resume RUN continues the run in RUN: give no --run.dir with it")
        settings = Path(args.resume) / "train.toml"
        if not settings.is_file():
            raise FileNotFoundError(f"{args.resume}: no train.toml; not a run directory of `dsv3 train`")
        run = RunConfig.load(settings, overrides)
        run.run.dir = str(args.resume)  # the directory may have moved since
    else:
        run = RunConfig.load(positional[0] if positional else None, overrides)
    res = train(run, resume=bool(args.resume))
    first, last = res.first_eval, res.last_eval
    print(f"\n{'stopped (' + res.stopped + ')' if res.stopped else 'done'}: step {res.step}, "
          f"{res.tokens:,} tokens, {res.elapsed_s / 60:.1f} min")
    if first and last:
        drop = 1 - last.loss / first.loss
        print(f"val loss {first.loss:.4f} -> {last.loss:.4f} ({drop:.0%} lower), "
              f"{last.bpb:.4f} bits/byte")
    if res.maxvio is not None:
        print(f"MaxVio (mean of the last 10% of steps): {res.maxvio:.3f}")
    if res.checkpoint:
        print(f"checkpoint: {res.run_dir / 'checkpoints' / 'latest'} -> {res.checkpoint.resolve().name}")
    for p in res.plots:
        print(f"plot: {p}")
    return {None: 0, "time limit": 0, "SIGINT": 130, "SIGTERM": 143}[res.stopped]


def _load(args: argparse.Namespace):  # noqa: ANN202 - (model, tokenizer, device)
    from dsv3.checkpoint import load_model
    from dsv3.data.tokenizer import Tokenizer

    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such checkpoint directory")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = Tokenizer.from_pretrained(path)  # first: a missing tokenizer fails before the weights load
    return load_model(path, device, dtype), tok, device


def _val_fraction(args: argparse.Namespace) -> float:
    """--val-fraction, else the data.val_fraction of the run whose checkpoint --model is (RUN/checkpoints/NAME
    with RUN/train.toml), else training's default: the split a run validated on is the one eval scores."""
    from dsv3.data.corpus import VAL_FRACTION

    if args.val_fraction is not None:
        return args.val_fraction
    model = Path(os.path.abspath(args.model))  # as given (RUN/checkpoints/latest), then with links resolved
    for ckpt in dict.fromkeys((model, model.resolve())):
        run_file = ckpt.parent.parent / "train.toml"
        if ckpt.parent.name == "checkpoints" and run_file.is_file():
            try:
                fraction = tomllib.loads(run_file.read_text("utf-8")).get("data", {}).get("val_fraction", None)
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError) as e:
                raise ConfigError(f"{run_file}: cannot read data.val_fraction ({e}); pass --val-fraction") from None
            fraction = VAL_FRACTION if fraction is None else fraction  # the run kept training's default
            if not is_json_number(fraction) or not 0 < fraction < 1:
                raise ConfigError(f"{run_file}: data.val_fraction {fraction!r} is not in (0, 1); pass --val-fraction")
            print(f"--split {args.split}: val_fraction {fraction} from {run_file}", file=sys.stderr)
            return fraction
    print(f"--split {args.split}: val_fraction {VAL_FRACTION} (training's default; --model is not in a run "
          "directory)", file=sys.stderr)
    return VAL_FRACTION


def cmd_eval(args: argparse.Namespace) -> int:
    from dsv3.data.corpus import iter_documents, split_documents
    from dsv3.data.dataset import TokenDataset, encode_documents, pack_documents
    from dsv3.train.evaluate import evaluate

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (got {args.seq_len})")
    model, tok, device = _load(args)
    if args.seq_len > model.cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context {model.cfg.max_position_embeddings}")
    docs = iter_documents(args.data)
    if args.split != "all":
        docs = split_documents(docs, args.split, _val_fraction(args))
    stream, starts = pack_documents(encode_documents(list(docs), tok))  # plain documents: no FIM
    try:
        data = TokenDataset(stream, args.seq_len, args.batch_size, doc_starts=starts, shuffle=False,
                            doc_ids=args.doc_mask)
    except ValueError as e:
        raise ValueError(f"--data {' '.join(args.data)} (split {args.split}): {e}") from None
    t0 = time.perf_counter()
    res = evaluate(model, data.iter_in_order(args.batch_size, args.max_batches, args.sample), tok.token_bytes(),
                   device=device, doc_mask=args.doc_mask)
    mtp = f", MTP loss {sum(res.mtp) / len(res.mtp):.4f}" if res.mtp else ""
    print(f"{args.model}: loss {res.loss:.4f} nats/token, {res.bpb:.4f} bits/byte{mtp} "
          f"over {res.tokens:,} tokens ({res.bytes:,} bytes) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dsv3.infer.engine import check_prompt_length
    from dsv3.train.evaluate import sample

    model, tok, device = _load(args)
    check_prompt_length(len(tok.encode(args.prompt)), model.cfg.max_position_embeddings)  # as `generate` does
    for i in range(args.num_samples):
        temp = 0.0 if i == 0 else args.temperature
        text = sample(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=temp,
                      top_k=args.top_k, seed=args.seed + i, device=device)
        label = "greedy" if temp == 0 else f"temperature {temp}, top-k {args.top_k}, seed {args.seed + i}"
        print(f"--- sample {i + 1} ({label}) ---\n{args.prompt}{text}\n")
    return 0
