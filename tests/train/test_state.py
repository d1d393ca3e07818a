"""A run's files survive interruptions at every step of a save: the settings and metrics rewrites, the
directory swap, pruning, and filesystems without symlinks (found by a review that reproduced each one)."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch

import dsv3.checkpoint as checkpoint
from dsv3.checkpoint import load_model, write_atomic
from dsv3.train.loop import _truncate_metrics, train
from dsv3.train.run import RunConfig
from dsv3.train.state import (
    checkpoint_dirs,
    latest_checkpoint,
    load_trainer_state,
    remove_partial,
    rng_state,
    set_rng_state,
)


def test_write_atomic_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "train.toml"
    RunConfig().save(path)
    before = path.read_text()

    def full(fd):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        RunConfig.load(None, ["--train.lr", "1e-3"]).save(path)
    assert path.read_text() == before and RunConfig.load(path).to_dict() == RunConfig().to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["train.toml"]  # no temporary left
    monkeypatch.undo()
    write_atomic(path, "x = 1\n")
    assert path.read_text() == "x = 1\n"


def test_a_metrics_row_cut_short_does_not_block_resuming(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + "\n" + rows[3][:17])  # the crash hit mid-row
    _truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_an_unfinished_directory_swap_is_undone(tmp_path):
    # save_model over an existing step-4 renames it to .step-4.old-PID, then the new one into place; a crash
    # between the two renames leaves only the .old copy, which resuming must put back, not delete
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step-4.old-123").mkdir(parents=True)
    (ckpts / ".step-4.old-123" / "trainer_state.pt").write_text("kept")
    (ckpts / "step-2").mkdir()
    (ckpts / ".step-2.old-99").mkdir()  # that swap finished: the old copy is garbage
    (ckpts / ".step-6.tmp-abc").mkdir()  # an unfinished write
    (ckpts / ".step-1.del-7").mkdir()  # an unfinished pruning
    remove_partial(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    assert (ckpts / "step-4" / "trainer_state.pt").read_text() == "kept"


def test_a_half_deleted_checkpoint_is_not_a_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, files in [("step-2", ["trainer_state.pt", "model.safetensors.index.json"]),
                        ("step-4", ["model.safetensors.index.json"])]:  # step-4 lost its trainer state
        (ckpts / name).mkdir(parents=True)
        for f in files:
            (ckpts / name / f).write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-2"]
    assert latest_checkpoint(tmp_path).name == "step-2"


def test_resume_takes_the_newest_complete_checkpoint_over_a_stale_link(tmp_path):
    # a crash between step-4's rename into place and the swap of `latest` leaves the link at step-2
    ckpts = tmp_path / "checkpoints"
    for name in ("step-2", "step-4"):
        (ckpts / name).mkdir(parents=True)
        for f in ("trainer_state.pt", "model.safetensors.index.json"):
            (ckpts / name / f).write_text("{}")
    (ckpts / "latest").symlink_to("step-2")
    assert latest_checkpoint(tmp_path) == ckpts / "step-4"


def test_checkpoints_are_ordered_by_step_number_not_name(tmp_path):
    # "step-10" < "step-9" as strings: the newest must be step 10, and pruning must take step 9 first
    ckpts = tmp_path / "checkpoints"
    for n in (9, 10, 100):
        (ckpts / f"step-{n}").mkdir(parents=True)
        for f in ("trainer_state.pt", "model.safetensors.index.json"):
            (ckpts / f"step-{n}" / f).write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-9", "step-10", "step-100"]
    assert latest_checkpoint(tmp_path).name == "step-100"


def test_rng_state_round_trips():
    import random

    state = rng_state()
    want = (torch.rand(3), random.random())
    torch.rand(5), random.random()
    set_rng_state(state)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_without_symlinks_training_goes_on_and_prunes(make_run, monkeypatch):
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    run = make_run(**{"train.checkpoint_interval": 2, "train.keep_last": 1})
    with pytest.warns(RuntimeWarning, match="could not point"):
        res = train(run)
    ckpts = res.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-6"]  # pruned as usual, no `latest`
    assert latest_checkpoint(res.run_dir) == ckpts / "step-6"
    assert load_trainer_state(latest_checkpoint(res.run_dir))["step"] == 6


def test_checkpoints_are_readable_by_others(tmp_path, tiny_model):
    umask = os.umask(0o022)
    try:
        checkpoint.save_model(tiny_model, tmp_path / "ck")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755
    # every file too: safetensors writes its shards 0600, which other users and jobs could not read
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    load_model(tmp_path / "ck", dtype=torch.float32)


def test_a_damaged_trainer_state_names_the_file(tmp_path):
    (tmp_path / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(checkpoint.CheckpointError, match="trainer_state.pt: not a readable trainer state"):
        load_trainer_state(tmp_path)
    torch.save([1, 2], tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match="trainer state format 'list'"):
        load_trainer_state(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_directories_are_fsynced_before_older_checkpoints_go(make_run, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):  # noqa: ANN001
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    res = train(make_run(**{"train.checkpoint_interval": 3, "train.keep_last": 1}))
    ckpts = str((res.run_dir / "checkpoints").resolve())
    assert ckpts in synced  # the renames into step-N and the `latest` swap
    assert any(p.startswith(ckpts + "/.step-6.tmp-") and p.count("/") == ckpts.count("/") + 1 for p in synced)
    assert any(p.startswith(str(res.run_dir.resolve() / ".train.toml.tmp-")) for p in synced)  # the settings
