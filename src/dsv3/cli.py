"""`dsv3 <command>`: thin argument parsing over the library; every command is callable from Python."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from dsv3.argtypes import positive_int
from dsv3.checkpoint import CheckpointError
from dsv3.config import PRESETS, ConfigError, ModelConfig, preset
from dsv3.infer.block_manager import CacheExhausted


def _config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.config:
        return ModelConfig.from_json(args.config), str(args.config)
    return preset(args.preset), args.preset


def cmd_info(args: argparse.Namespace) -> None:
    from dsv3.info import format_info

    cfg, name = _config_from_args(args)
    print(format_info(cfg, context=args.context, name=name))


def _version() -> str:
    try:
        return importlib.metadata.version("dsv3")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3: model, training and inference.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts, KV-cache bytes and FLOPs of a config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="671b", choices=sorted(PRESETS), help="a built-in config (default 671b)")
    src.add_argument("--config", help="a config.json file or a checkpoint directory")
    p.add_argument("--context", type=positive_int, default=4096,
                   help="context length for the FLOP count (default 4096)")
    p.set_defaults(func=cmd_info)

    from dsv3.data.cli import add_tokenizer_commands
    from dsv3.infer.cli import add_generate_commands
    from dsv3.train.cli import add_train_commands

    add_tokenizer_commands(sub)
    add_train_commands(sub)
    add_generate_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # `dsv3 train RUN.toml --section.key value ...`: free-form settings
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as SIGPIPE would
        try:  # no second error when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured)
            pass
        return 141
    except (ConfigError, OSError, ValueError, CheckpointError, CacheExhausted, FloatingPointError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
