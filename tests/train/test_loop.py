"""The training loop: bit-identical resume, signals, atomic checkpoints, keep-last-N, metrics and run files."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dsv3.checkpoint import load_model
from dsv3.data.tokenizer import Tokenizer
from dsv3.train.loop import train
from dsv3.train.run import RunConfig
from dsv3.train.state import load_trainer_state


def rows(run_dir, key="loss"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def weights(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def interrupt_at(k: int, sig: int = signal.SIGINT):
    def callback(step, row):
        if step == k:
            os.kill(os.getpid(), sig)  # delivered at once: the handler runs before os.kill returns

    return callback


def test_resume_is_bit_identical(make_run):
    # a batch ramp (4 -> 8 sequences), 2 micro-batches per full step, the aux-free bias update and MTP all
    # carry state across the interruption
    straight = train(make_run("straight", **{"train.batch_ramp": True}))
    assert straight.stopped is None and straight.step == 7  # 4 + 6 x 8 sequences

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background/CI shell
    first = train(make_run("resumed", **{"train.batch_ramp": True}), callback=interrupt_at(3))
    assert first.stopped == "SIGINT" and first.step == 3
    assert first.checkpoint.resolve().name == "step-3"
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handlers are removed again

    run = RunConfig.load(first.run_dir / "train.toml")  # as `dsv3 train --resume RUN` does
    second = train(run, resume=True)
    assert second.stopped is None and second.step == 7

    a, b = rows(straight.run_dir), rows(second.run_dir)
    assert [r["step"] for r in b] == list(range(1, 8))  # no duplicated or missing rows
    for key in ("loss", "ntp", "mtp", "balance", "maxvio", "lr", "batch_size", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert [r["batch_size"] for r in a][:2] == [4, 8]
    wa = weights(straight.run_dir / "checkpoints" / "latest")
    wb = weights(second.run_dir / "checkpoints" / "latest")
    assert wa.keys() == wb.keys()
    for k in wa:  # weights, and the routing biases the aux-free update moved
        assert torch.equal(wa[k], wb[k]), k
    assert any(k.endswith("e_score_correction_bias") and wa[k].abs().sum() > 0 for k in wa)


def test_sigterm_saves_and_stops(make_run):
    res = train(make_run(), callback=interrupt_at(2, signal.SIGTERM))
    assert res.stopped == "SIGTERM" and res.step == 2
    state = load_trainer_state(res.run_dir / "checkpoints" / "latest")
    assert state["step"] == 2 and state["tokens"] == res.tokens


def test_sigint_from_outside_in_a_subprocess(make_run, tmp_path):
    """A real `dsv3 train` process, interrupted with SIGINT after its first step, exits 130 with a checkpoint."""
    import subprocess
    import sys
    import time

    run = make_run("cli", **{"train.tokens": 8 * 32 * 500})
    path = tmp_path / "run.toml"
    run.save(path)
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "train", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "cli"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and rows(run_dir)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    step = load_trainer_state(run_dir / "checkpoints" / "latest")["step"]
    assert 1 <= step < 500 and rows(run_dir)[-1]["step"] == step


def test_crash_during_save_keeps_previous_checkpoint(make_run, monkeypatch):
    run = make_run(**{"train.checkpoint_interval": 2})
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):  # the second checkpoint dies after its weights are on disk
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(run)
    monkeypatch.undo()
    ckpts = run.run.dir + "/checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step-2"]  # no partial directory left behind
    latest = os.path.join(ckpts, "latest")
    assert os.path.realpath(latest).endswith("step-2")
    load_model(latest, dtype=torch.float32)
    Tokenizer.from_pretrained(latest)
    assert load_trainer_state(latest)["step"] == 2
    res = train(run, resume=True)  # and the run goes on from there
    assert res.step == 6 and [r["step"] for r in rows(res.run_dir)] == list(range(1, 7))


def test_keep_last_n(make_run):
    res = train(make_run(**{"train.checkpoint_interval": 1, "train.keep_last": 2}))
    ckpts = res.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-5", "step-6"]
    assert os.readlink(ckpts / "latest") == "step-6"


def test_run_directory_and_metrics(make_run):
    run = make_run(**{"log.tensorboard": True, "log.plots": True, "data.doc_mask": True})
    res = train(run)
    d = res.run_dir
    train_rows, val_rows = rows(d), rows(d, "val_loss")
    for r in train_rows:
        assert {"step", "tokens", "loss", "ntp", "mtp", "balance", "lr", "maxvio", "tokens_per_s"} <= r.keys()
        assert r["maxvio"] >= 0 and r["loss"] > 0
    assert train_rows[0]["load"] and len(train_rows[0]["load"]) == 2  # 1 MoE layer + the MTP block
    assert [r["step"] for r in val_rows] == [0, 3, 6]
    for r in val_rows:
        assert {"val_loss", "val_bpb", "val_mtp"} <= r.keys() and r["val_bpb"] > 0
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
    assert list(d.glob("events.out.tfevents.*"))
    assert {p.name for p in res.plots} == {"loss.png", "expert_load.png"}
    # the resolved settings read back to the same run; config.json is the model's
    assert RunConfig.load(d / "train.toml").to_dict() == run.to_dict()
    assert json.loads((d / "config.json").read_text())["hidden_size"] == 32
    latest = d / "checkpoints" / "latest"
    assert load_model(latest, dtype=torch.float32).cfg.vocab_size == 320
    assert len(Tokenizer.from_pretrained(latest)) == 300


def test_refuses_to_overwrite_a_run(make_run):
    run = make_run(**{"train.tokens": 256})
    train(run)
    with pytest.raises(ValueError, match="--resume"):
        train(run)


def test_vocab_smaller_than_tokenizer_is_a_clear_error(make_run):
    from dsv3.config import ConfigError

    with pytest.raises(ConfigError, match="vocab_size 200 is smaller than the tokenizer's 300"):
        train(make_run(**{"model.vocab_size": 200}))


def test_cpu_bf16_runs_the_step_under_bf16_autocast(make_run):
    # train.cpu_bf16: the same run with bf16 matmuls (float32 master weights and loss): the first losses agree
    # to bf16 rounding of a few layers, and differ from float32's (the autocast really applied)
    fp32 = train(make_run("fp32", **{"train.tokens": 8 * 32 * 2})).run_dir
    bf16 = train(make_run("bf16", **{"train.tokens": 8 * 32 * 2, "train.cpu_bf16": True})).run_dir
    a, b = rows(fp32), rows(bf16)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] != rb["loss"]
        assert abs(ra["loss"] - rb["loss"]) < 2e-2 * ra["loss"]
    # and the validation passes too (the first one scores the same initial weights)
    va, vb = rows(fp32, "val_loss")[0]["val_loss"], rows(bf16, "val_loss")[0]["val_loss"]
    assert va != vb and abs(va - vb) < 2e-2 * va


def test_compile_on_the_cpu_needs_cpu_bf16(make_run):
    from dsv3.config import ConfigError

    with pytest.raises(ConfigError, match="train.cpu_bf16"):
        train(make_run(**{"train.compile": True}))


@pytest.mark.slow
def test_compiled_cpu_bf16_run_matches_eager(make_run):
    # train.compile with train.cpu_bf16 on the CPU (inductor fuses the element-wise work around bf16 GEMMs):
    # the same losses as the eager bf16 run, to the rounding of differently fused bf16 arithmetic
    settings = {"train.tokens": 8 * 32 * 2, "train.cpu_bf16": True}
    a = rows(train(make_run("eager", **settings)).run_dir)
    b = rows(train(make_run("compiled", **settings, **{"train.compile": True})).run_dir)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 2e-2 * ra["loss"]
