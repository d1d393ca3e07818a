"""The training loop: bit-identical resume, signals, atomic checkpoints, keep-last-N, metrics and run files."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

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
    # the evaluation due at step 3, put off by the signal, runs when the run resumes: the same rows
    va, vb = rows(straight.run_dir, "val_loss"), rows(second.run_dir, "val_loss")
    assert [r["step"] for r in va] == [r["step"] for r in vb] == [0, 3, 6, 7]
    assert [r["val_loss"] for r in va] == [r["val_loss"] for r in vb]
    assert b[3]["elapsed_s"] > b[2]["elapsed_s"]  # the clock goes on from the checkpoint's
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


def test_signal_in_the_last_step_leaves_the_final_evaluation_to_the_resume(make_run):
    first = train(make_run(), callback=interrupt_at(6))
    assert first.stopped == "SIGINT" and first.step == 6
    assert [r["step"] for r in rows(first.run_dir, "val_loss")] == [0, 3]  # step 6's put off by the signal
    run = RunConfig.load(first.run_dir / "train.toml")
    second = train(run, resume=True)  # no steps left: only the evaluation
    assert second.step == 6 and second.last_eval is not None
    assert [r["step"] for r in rows(first.run_dir, "val_loss")] == [0, 3, 6]
    third = train(run, resume=True)  # done already: no second row for step 6
    assert third.last_eval is None and [r["step"] for r in rows(first.run_dir, "val_loss")] == [0, 3, 6]


def test_a_signal_during_an_evaluation_stops_after_it(make_run, monkeypatch):
    import dsv3.train.loop as loop

    real = loop.evaluate

    def evaluate_then_signal(*a, **kw):
        res = real(*a, **kw)
        if calls.append(1) or len(calls) == 2:  # the evaluation after step 3
            os.kill(os.getpid(), signal.SIGINT)
        return res

    calls = []
    monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
    res = train(make_run())
    assert res.stopped == "SIGINT" and res.step == 3 and res.checkpoint.resolve().name == "step-3"
    assert load_trainer_state(res.checkpoint)["eval_pending"] is False


def test_resume_takes_this_runs_optimizer_settings(make_run, monkeypatch):
    import dsv3.train.loop as loop

    first = train(make_run(), callback=interrupt_at(2))
    run = RunConfig.load(first.run_dir / "train.toml")
    run.set("train.weight_decay", 0.0)
    run.set("train.beta2", 0.99)
    seen, real = [], loop.train_step

    def step_recording_groups(model, opt, *a, **kw):
        seen.append([(g["weight_decay"], g["betas"]) for g in opt.param_groups])
        return real(model, opt, *a, **kw)

    monkeypatch.setattr(loop, "train_step", step_recording_groups)
    train(run, resume=True)
    assert seen and all(groups == [(0.0, (0.9, 0.99))] * len(groups) for groups in seen)


def test_a_refused_resume_leaves_the_run_files(make_run):
    from dsv3.config import ConfigError

    first = train(make_run(), callback=interrupt_at(2))
    saved = (first.run_dir / "train.toml").read_text(), (first.run_dir / "config.json").read_text()
    run = RunConfig.load(first.run_dir / "train.toml")
    run.set("model.hidden_size", 48)
    with pytest.raises(ConfigError, match="differs"):
        train(run, resume=True)
    assert ((first.run_dir / "train.toml").read_text(), (first.run_dir / "config.json").read_text()) == saved
    assert train(RunConfig.load(first.run_dir / "train.toml"), resume=True).step == 6


@pytest.mark.parametrize("setting, value, match", [
    ("data.fim_rate", 0.3, "training data differs"),  # other tokens, as many sequences
    ("train.seed", 5, "resuming keeps the seed"),
])
def test_resuming_on_other_data_is_refused(make_run, setting, value, match):
    first = train(make_run(), callback=interrupt_at(2))
    saved = (first.run_dir / "train.toml").read_text()
    run = RunConfig.load(first.run_dir / "train.toml")
    run.set(setting, value)
    with pytest.raises(ValueError, match=match):  # (ConfigError is a ValueError)
        train(run, resume=True)
    assert (first.run_dir / "train.toml").read_text() == saved


def test_a_resume_with_another_token_budget_says_the_schedules_change(make_run, capsys):
    first = train(make_run(), callback=interrupt_at(2))
    run = RunConfig.load(first.run_dir / "train.toml")
    run.set("train.tokens", 8 * 32 * 9)
    capsys.readouterr()
    assert train(run, resume=True).step == 9
    assert "train.tokens 1,536 -> 2,304: the learning-rate" in capsys.readouterr().out


def test_too_little_data_for_a_batch_is_refused_before_training(make_run):
    from dsv3.config import ConfigError

    run = make_run(**{"train.batch_size": 1 << 20, "train.micro_batch_size": 8})
    with pytest.raises(ConfigError, match="fewer than train.batch_size 1048576"):
        train(run)
    assert not (Path(run.run.dir) / "metrics.jsonl").exists()  # nothing to --resume: the same command runs again
    with pytest.raises(ConfigError, match="MTP depth 2 needs sequences longer"):
        train(make_run("mtp", **{"data.seq_len": 2, "model.num_nextn_predict_layers": 2}))


def test_resuming_a_run_that_never_saved_starts_it_over(make_run):
    def crash_at_2(step, row):
        if step == 2:
            raise RuntimeError("boom")  # an OOM, say, before the first checkpoint

    run = make_run(**{"train.checkpoint_interval": 100})
    with pytest.raises(RuntimeError, match="boom"):
        train(run, callback=crash_at_2)
    with pytest.raises(ValueError, match="--resume"):
        train(run)
    res = train(run, resume=True)
    assert res.step == 6 and [r["step"] for r in rows(res.run_dir)] == list(range(1, 7))


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
    # to bf16 rounding of a few layers (~2e-4 relative here; 1e-3 still fails a run whose routed experts output
    # nothing under autocast), and differ from float32's (the autocast really applied). The forward itself is
    # bounded per token against float64 in tests/train/test_step.py.
    fp32 = train(make_run("fp32", **{"train.tokens": 8 * 32 * 2})).run_dir
    bf16 = train(make_run("bf16", **{"train.tokens": 8 * 32 * 2, "train.cpu_bf16": True})).run_dir
    a, b = rows(fp32), rows(bf16)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] != rb["loss"]
        assert abs(ra["loss"] - rb["loss"]) < 1e-3 * ra["loss"]
    # and the validation passes too (the first one scores the same initial weights)
    va, vb = rows(fp32, "val_loss")[0]["val_loss"], rows(bf16, "val_loss")[0]["val_loss"]
    assert va != vb and abs(va - vb) < 1e-3 * va


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
        assert abs(ra["loss"] - rb["loss"]) < 1e-3 * ra["loss"]


def test_the_run_settings_reach_every_step(make_run):
    # the loop's wiring, against the schedule functions (tests/train/test_schedule.py holds those to the
    # paper): each row's lr, batch size, MTP weight and gamma are the schedules' values at the tokens seen
    # before it; the optimiser carries the run's weight decay and betas
    from dsv3.train.schedule import ScheduleConfig, batch_size, gamma_at, lr_at, mtp_lambda_at

    settings = {"train.batch_ramp": True, "train.warmup_steps": 3, "train.lr": 1e-2, "train.gamma": 2e-3,
                "train.mtp_lambda": 0.4, "train.weight_decay": 0.05, "train.beta2": 0.97}
    res = train(make_run(**settings))
    sched = ScheduleConfig.scaled(total_tokens=8 * 32 * 6, seq_len=32, batch_max=8, batch_multiple=4, peak_lr=1e-2,
                                  warmup_steps=3, gamma=2e-3, mtp_lambda=0.4, mtp_lambda_late=0.4 / 3)
    tokens = 0
    for i, r in enumerate(rows(res.run_dir)):
        assert r["lr"] == lr_at(i, tokens, sched) and r["batch_size"] == batch_size(tokens, sched), i
        assert r["mtp_lambda"] == mtp_lambda_at(tokens, sched) and r["gamma"] == gamma_at(tokens, sched), i
        tokens += r["batch_size"] * 32
        assert r["tokens"] == tokens
    first, last = rows(res.run_dir)[0], rows(res.run_dir)[-1]
    assert first["lr"] == pytest.approx(1e-2 / 3) and first["batch_size"] == 4  # warm-up 1/3, ramp from 8 / 5
    assert first["mtp_lambda"] == 0.4 and last["mtp_lambda"] == pytest.approx(0.4 / 3)  # the late weight
    assert first["gamma"] == 2e-3
    groups = load_trainer_state(res.checkpoint)["optimizer"]["param_groups"]
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.05] and {g["betas"] for g in groups} == {(0.9, 0.97)}


def test_a_non_finite_loss_stops_the_run_without_saving_it(make_run, monkeypatch):
    import dataclasses

    import dsv3.train.loop as loop

    real, steps = loop.train_step, []

    def diverging(*a, **kw):
        out = real(*a, **kw)
        steps.append(1)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(steps) == 4 else out

    monkeypatch.setattr(loop, "train_step", diverging)
    run = make_run(**{"train.checkpoint_interval": 2})
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 4; the last checkpoint .*step-2"):
        train(run)
    ckpts = {p.name for p in (Path(run.run.dir) / "checkpoints").iterdir()}
    assert "step-2" in ckpts and "step-4" not in ckpts
    last = (Path(run.run.dir) / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))["loss"] is None


def test_a_tokenizer_left_by_a_failed_start_is_reused_only_if_trained_as_asked(make_run):
    # the first start trains RUN/tokenizer, then fails on its data; a second start with another vocab_size must
    # not train with the old tokenizer (it did, while train.toml recorded the new size)
    from dsv3.config import ConfigError

    bad = make_run(**{"data.tokenizer": "train", "data.vocab_size": 300, "model.vocab_size": 200})
    with pytest.raises(ConfigError, match="vocab_size 200 is smaller"):
        train(bad)
    tok_dir = Path(bad.run.dir) / "tokenizer"
    assert len(Tokenizer.from_pretrained(tok_dir)) == 300
    good = make_run(**{"data.tokenizer": "train", "data.vocab_size": 280, "train.tokens": 256})
    train(good)
    assert len(Tokenizer.from_pretrained(tok_dir)) == 280
    assert len(Tokenizer.from_pretrained(Path(good.run.dir) / "checkpoints" / "latest")) == 280


def test_a_tokenizer_save_cut_short_is_not_taken_for_the_old_settings(make_run, monkeypatch, tmp_path):
    # killed after the new tokenizer's files are written but before its marker: the old settings' marker must
    # not vouch for them (it did: a later start asking for 300 ids got the 400-id tokenizer)
    from dsv3.train import loop

    def ask(vocab):
        return make_run(**{"data.tokenizer": "train", "data.vocab_size": vocab})

    assert len(loop.build_tokenizer(ask(300), tmp_path)) == 300

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "write_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            loop.build_tokenizer(ask(400), tmp_path)
    assert len(Tokenizer.from_pretrained(tmp_path / "tokenizer")) == 400  # the cut-short save's files
    assert len(loop.build_tokenizer(ask(300), tmp_path)) == 300


def test_the_run_trains_its_tokenizer_on_at_most_tokenizer_max_mb(make_run, monkeypatch, tmp_path):
    # 28-byte documents; data.tokenizer_max_mb 0.00011 is 110 bytes: the first four training documents (84 bytes
    # after three, 112 after four; validation documents are never trained on)
    from dsv3.data.corpus import is_validation
    from dsv3.train import loop

    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(10)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    seen = []

    def fake_train_bpe(docs, vocab_size, out, **kw):
        seen.extend(docs)
        Path(out).mkdir(parents=True)
        return "a tokenizer"

    monkeypatch.setattr(loop, "train_bpe", fake_train_bpe)
    run = make_run(**{"data.tokenizer": "train", "data.sources": [str(tmp_path / "docs.jsonl")],
                      "data.tokenizer_max_mb": 0.00011, "data.val_fraction": 0.2})
    assert loop.build_tokenizer(run, tmp_path / "run") == "a tokenizer"
    train_docs = [t for t in texts if not is_validation(t, 0.2)]
    assert len(train_docs) >= 5 and all(len(t.encode()) == 28 for t in texts)
    assert seen == train_docs[:4]
