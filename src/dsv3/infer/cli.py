"""`dsv3 generate` and `dsv3 chat`: stream completions of a checkpoint directory to the terminal.

`add_generate_commands(subparsers)` registers both on the top-level parser (dsv3/cli.py). Everything a user
can get wrong (a missing directory or tokenizer, bad sampling values, a prompt longer than the context) is
checked before the weights load, and raises FileNotFoundError or ValueError with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dsv3.argtypes import nonneg_int, positive_int, resolve_device
from dsv3.config import is_json_number, read_json_object
from dsv3.infer.engine import Engine, GenerationResult, check_prompt_length
from dsv3.infer.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def add_generate_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` and `chat` to the `dsv3` sub-command parsers."""
    g = subparsers.add_parser("generate", help="stream a completion of a prompt")
    _model_args(g)
    g.add_argument("--prompt", required=True, help="the text to continue (BOS is added)")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="interactive chat through the model's chat template")
    _model_args(c)
    c.add_argument("--system", help="a system message opening the conversation")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout with tokenizer.json)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--mtp", type=nonneg_int, default=0, metavar="K",
                   help="draft K tokens per step with the MTP modules (speculative decoding; 0 = off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (bfloat16 models, the CUDA default; on an H200 about 2x "
                        "faster batch-1 decode than CUDA graphs alone, after a compilation per batch-size bucket)")
    p.add_argument("--fp8-weights", choices=["dequantize", "keep"], default="dequantize",
                   help="an FP8 checkpoint's linear weights: dequantise to --dtype on load (default), or keep "
                        "them E4M3 with their block scales (about half the memory)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=256, help="most new tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, model_dir: Path) -> SamplingParams:
    """Sampling values from the command line, defaulting to the model's generation_config.json."""
    defaults: dict[str, Any] = {}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        defaults = read_json_object(gen)
        for key in ("temperature", "top_p", "top_k"):
            v = defaults.get(key)
            if v is not None and not is_json_number(v):
                raise ValueError(f"{gen}: `{key}` must be a finite number or null (got {v!r})")
            if key == "top_k" and v is not None and not float(v).is_integer():
                raise ValueError(f"{gen}: `top_k` must be a whole number or null (got {v!r})")
        if defaults.get("do_sample") is False:
            defaults["temperature"] = 0.0

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        if value is None:
            value = defaults.get(name)
        return fallback if value is None else value  # ("top_p": null in a generation_config means unset)

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 0) or 0), seed=args.seed, stop=list(args.stop),
    )


def load(args: argparse.Namespace) -> tuple[Engine, Any, SamplingParams]:
    """Check the directory and the sampling values, then load tokenizer and weights into an Engine."""
    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: a model directory must carry its tokenizer "
                                f"files (tokenizer.json and tokenizer_config.json)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory")
    params = sampling_params(args, path)
    from dsv3.checkpoint import load_model
    from dsv3.config import ModelConfig
    from dsv3.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(path)
    if getattr(args, "prompt", None) is not None:  # generate: the Engine's context is the model's positions
        max_len = ModelConfig.from_json(path).max_position_embeddings
        check_prompt_length(len(tokenizer.encode(args.prompt)), max_len)
    elif not tokenizer.config.get("chat_template"):  # chat
        raise ValueError(f"{path}/tokenizer_config.json has no chat_template: `dsv3 chat` needs one (use "
                         f"`dsv3 generate` for plain completion)")
    else:  # a template that does not compile or render is refused now, before the weights load
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    device = resolve_device(args.device)
    default = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on CPUs
    dtype = DTYPES[args.dtype] if args.dtype else default
    model = load_model(path, device=device, dtype=dtype, fp8=args.fp8_weights)
    return Engine(model, tokenizer, mtp=args.mtp, compile=args.compile), tokenizer, params


def _stream(engine: Engine, prompt: str | list[int], params: SamplingParams) -> GenerationResult:
    """Print the reply as it is generated; return the finished result."""
    result = None
    for delta in engine.generate(prompt, params, stream=True):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        if delta.result is not None:
            result = delta.result
    assert result is not None  # the stream always ends with the request's result
    return result


def _stats(result: GenerationResult, seconds: float, mtp: int) -> str:
    n = len(result.token_ids)
    line = f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tok/s"
    line += f", finish: {result.finish_reason}"
    if mtp:
        line += f", MTP acceptance {result.acceptance_rate:.0%}, {result.tokens_per_step:.2f} tokens/step"
    return line + "]"


def cmd_generate(args: argparse.Namespace) -> None:
    engine, _, params = load(args)
    start = time.perf_counter()
    result = _stream(engine, args.prompt, params)
    print()
    print(_stats(result, time.perf_counter() - start, args.mtp), file=sys.stderr)


def _kept_reply(result: GenerationResult) -> str:
    """The reply as the conversation keeps it: a reply cut at max_tokens may end inside a UTF-8 character, whose
    bytes decode to U+FFFD; the history drops that partial character rather than quote U+FFFD back to the model
    as if it had written it."""
    return result.text.rstrip("\ufffd") if result.finish_reason == "length" else result.text


def cmd_chat(args: argparse.Namespace) -> None:
    engine, tokenizer, params = load(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    print("chat: /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    prompt = ">>> " if sys.stdin.isatty() else ""  # piped input: stdout holds the replies alone
    while True:
        try:
            line = input(prompt)
        except EOFError:
            if prompt:
                print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave the terminal on a fresh line
            print(file=sys.stderr)
            raise
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        start = time.perf_counter()
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            result = _stream(engine, ids, params)
        except ValueError as e:  # the template refused the messages, or the conversation outgrew the context
            messages.pop()
            print(f"error: {e} (/reset starts the conversation over)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        print()
        print(_stats(result, time.perf_counter() - start, args.mtp), file=sys.stderr)
        messages.append({"role": "assistant", "content": _kept_reply(result)})
