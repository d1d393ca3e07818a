"""Checked values for the command line: argparse types that reject what a command cannot use (with the
option's name, before any model loads), and device names as every command and run file spells them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from dsv3.config import ConfigError


def _number(kind: type, text: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _checked(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: `text` read as `kind`, finite, and refused unless ok(value) ("must be {rule}")."""

    def parse(text: str) -> float:
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule} (got {value})")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
fraction = _checked(float, lambda v: 0 < v < 1, "in (0, 1)")  # a validation split
share = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")  # documents held out; 0: none


def resolve_device(name: str | None, what: str = "--device") -> torch.device:
    """`auto` (or None): cuda when this torch has a GPU, else cpu; otherwise cpu, cuda or cuda:N, refused with
    `what` (the option or run setting) when it is no device or names a GPU this machine lacks."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ConfigError(f"{what}: {name!r} is not supported (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: {name!r} but this torch has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what}: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
