"""Checkpoints of a run: RUN/checkpoints/step-N/ and the `latest` link (shared/DESIGN.md).

A checkpoint directory is a released-style HF checkpoint (config.json, safetensors, index) plus the files a
run needs beside it: the tokenizer (tokenizer.json, tokenizer_config.json), so `load_model(DIR)` and
`Tokenizer.from_pretrained(DIR)` need nothing else, and `trainer_state.pt` (optimizer, data position, RNG
states, step and tokens, the schedule the bias update follows). All of it is written by `save_model`'s one
atomic mechanism (a temporary directory renamed into place), so a crash leaves no half checkpoint, and then
`latest`, a relative symlink, is swapped to it with os.replace (atomic too): `latest` always names a complete
checkpoint. Only then are checkpoints beyond the last `keep_last` deleted.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import save_model
from dsv3.data.tokenizer import Tokenizer
from dsv3.model import DeepSeekV3

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints `step-N`, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """RUN/checkpoints/latest when it names a checkpoint, else the newest step-N (None if there is none)."""
    link = Path(run_dir) / CHECKPOINTS / LATEST
    if (link / TRAINER_STATE).is_file():
        return link
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path, step: int, model: DeepSeekV3, tokenizer: Tokenizer, trainer_state: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write RUN/checkpoints/step-{step} atomically, point `latest` at it, keep the last `keep_last` (0: all)."""
    root = Path(run_dir) / CHECKPOINTS
    path = root / f"step-{step}"
    state = {"format": STATE_FORMAT, **trainer_state}

    def extra(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)

    save_model(model, path, extra_files=extra)
    point_latest(root, path.name)
    if keep_last:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    return path


def point_latest(root: Path, name: str) -> None:
    """Make root/latest a relative symlink to root/name, replacing the old one in one atomic rename."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp, target_is_directory=True)
    os.replace(tmp, root / LATEST)


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAINER_STATE}; not a checkpoint of `dsv3 train`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: trainer state format {state.get('format')!r}, expected {STATE_FORMAT}")
    return state


def remove_partial(run_dir: str | Path) -> None:
    """Delete what an interrupted save leaves behind: save_model's `.step-N.tmp-*` / `.step-N.old-*`
    directories and a stray `.latest.tmp-*` link. Complete checkpoints are never touched."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
