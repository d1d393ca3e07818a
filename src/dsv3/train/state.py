"""Checkpoints of a run: RUN/checkpoints/step-N/ and the `latest` link (shared/DESIGN.md).

A checkpoint directory is a released-style HF checkpoint (config.json, safetensors, index) plus the files a
run needs beside it: the tokenizer (tokenizer.json, tokenizer_config.json), so `load_model(DIR)` and
`Tokenizer.from_pretrained(DIR)` need nothing else, and `trainer_state.pt` (optimizer, data position, RNG
states, step and tokens, the schedule the bias update follows). All of it is written by `save_model`'s one
atomic mechanism (a temporary directory renamed into place), so a crash leaves no half checkpoint, and then
`latest`, a relative symlink, is swapped to it with os.replace (atomic too): `latest` always names a complete
checkpoint. Only then are checkpoints beyond the last `keep_last` deleted, each renamed out of the `step-N`
namespace first so that an interrupted deletion never leaves a half checkpoint under a checkpoint's name.
Directory entries are fsynced before anything older is deleted. Where symlinks are not allowed, `latest` is
not made (with a warning) and resuming takes the newest complete `step-N`.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import CheckpointError, fsync_dir, restore_replaced, save_model
from dsv3.data.tokenizer import Tokenizer
from dsv3.model import DeepSeekV3

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def _complete(p: Path) -> bool:
    return (p / TRAINER_STATE).is_file() and (p / "model.safetensors.index.json").is_file()


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints `step-N`, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and _complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step-N (None if there is none). Not `latest` itself: a crash between a checkpoint's
    rename into place and the link's swap leaves the link one checkpoint behind, and a `latest` that is a real
    directory (a copy) may be stale."""
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
    fsync_dir(root)  # the new checkpoint and the link are durable before any older checkpoint goes
    if keep_last:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            if old.name != path.name:
                doomed = old.with_name(f".{old.name}.del-{os.getpid()}")
                os.replace(old, doomed)  # out of the step-N namespace in one rename, then deleted at leisure
                shutil.rmtree(doomed, ignore_errors=True)
    return path


def point_latest(root: Path, name: str) -> None:
    """Make root/latest a relative symlink to root/name, replacing the old one in one atomic rename. Where that
    fails (no symlinks on this filesystem, or `latest` replaced by a real directory) training goes on with a
    warning: resuming then finds the newest complete step-N by name."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, root / LATEST)
    except OSError as e:
        if tmp.is_symlink():
            tmp.unlink()
        warnings.warn(f"could not point {root / LATEST} at {name} ({e}); the newest checkpoint is {root / name}",
                      RuntimeWarning, stacklevel=3)


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAINER_STATE}; not a checkpoint of `dsv3 train`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # truncated, not a torch zip
        raise CheckpointError(f"{path}: not a readable trainer state ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: trainer state format {found!r}, expected {STATE_FORMAT}")
    return state


def remove_partial(run_dir: str | Path) -> None:
    """Clean up after an interrupted save: a checkpoint swapped out by save_model's replace (`.step-N.old-*`)
    goes back to `step-N` when the swap did not finish, then temporaries (`.step-N.tmp-*`, leftover `.old-*`,
    pruned `.step-N.del-*`, a stray `.latest.tmp-*` link) are deleted. Complete checkpoints are never touched."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    restore_replaced(root)
    for p in root.iterdir():
        if p.name.startswith(".") and any(s in p.name for s in (".tmp-", ".old-", ".del-")):
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
