"""`dsv3 train | eval | sample` through the command line: outputs and one-line errors."""

from __future__ import annotations

import pytest
import torch

from dsv3.cli import main


def test_train_eval_sample(make_run, loop_corpus, tmp_path, capsys):
    run = make_run("cli")
    path = tmp_path / "run.toml"
    run.save(path)
    assert main(["train", str(path), "--train.tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "done: step 2" in out and "val loss" in out
    latest = str(tmp_path / "cli" / "checkpoints" / "latest")

    assert main(["eval", "--model", latest, "--data", loop_corpus, "--split", "val", "--val-fraction", "0.2",
                 "--seq-len", "32", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "nats/token" in out and "bits/byte" in out and "over 512 tokens" in out
    first = out

    def loss(text: str) -> float:
        return float(text.split("loss ")[1].split(" ")[0])

    # without --val-fraction, the split of the run the checkpoint belongs to (data.val_fraction 0.2 in its
    # train.toml, not training's default 0.02) is scored
    assert main(["eval", "--model", latest, "--data", loop_corpus, "--split", "val", "--seq-len", "32",
                 "--max-batches", "2"]) == 0
    own = capsys.readouterr()
    assert loss(own.out) == loss(first) and "val_fraction 0.2 from" in own.err and "train.toml" in own.err
    # checkpoints kept on another disk through a symlinked RUN/checkpoints: still the run's split
    run_dir = tmp_path / "cli"
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "checkpoints").rename(tmp_path / "elsewhere" / "ckpts")
    (run_dir / "checkpoints").symlink_to(tmp_path / "elsewhere" / "ckpts")
    assert main(["eval", "--model", latest, "--data", loop_corpus, "--split", "val", "--seq-len", "32",
                 "--max-batches", "2"]) == 0
    assert loss(capsys.readouterr().out) == loss(first)
    # a run file eval cannot read is an error that says what to pass instead
    toml = (run_dir / "train.toml").read_text()
    (run_dir / "train.toml").write_bytes(b"\xff\xfe")
    assert main(["eval", "--model", latest, "--data", loop_corpus, "--split", "val", "--seq-len", "32"]) == 2
    assert "pass --val-fraction" in capsys.readouterr().err
    (run_dir / "train.toml").write_text(toml)
    (run_dir / "checkpoints").unlink()
    (tmp_path / "elsewhere" / "ckpts").rename(run_dir / "checkpoints")

    # --sample: the same number of sequences drawn across the split, so another set and another loss; all of
    # them (no --max-batches) in any order give the same loss as in stream order
    eval_args = ["eval", "--model", latest, "--data", loop_corpus, "--split", "val", "--val-fraction", "0.2",
                 "--seq-len", "32"]
    assert main([*eval_args, "--max-batches", "2", "--sample", "3"]) == 0
    sampled = capsys.readouterr().out
    assert "over 512 tokens" in sampled and loss(sampled) != loss(first)
    assert main(eval_args) == 0 and main([*eval_args, "--sample", "3"]) == 0
    whole, whole_sampled = capsys.readouterr().out.strip().split("\n")
    assert loss(whole) == pytest.approx(loss(whole_sampled), rel=1e-6)

    assert main(["sample", "--model", latest, "--prompt", "def f(x):", "-n", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "sample 1 (greedy)" in out and "sample 2 (temperature 0.8" in out and "def f(x):" in out

    # a prompt the context cannot hold is refused, as `dsv3 generate` refuses it (it was cut silently)
    assert main(["sample", "--model", latest, "--prompt", "x" * 5000]) == 2
    assert "but the context holds" in capsys.readouterr().err

    # the finished run continues when given more tokens
    assert main(["train", "--resume", str(tmp_path / "cli"), "--train.tokens", "768"]) == 0
    assert "done: step 3" in capsys.readouterr().out


def test_a_nan_loss_exits_2_with_one_line(make_run, tmp_path, capsys, monkeypatch):
    import dataclasses

    import dsv3.train.loop as loop

    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **kw: dataclasses.replace(
        real(*a, **kw), loss=torch.tensor(float("nan"))))
    path = tmp_path / "run.toml"
    make_run("nan").save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dsv3 train: error: the loss is nan at step 1; "), err
    assert "the last checkpoint (none yet) is kept" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--model", "/no/such/dir", "--data", "stdlib"], "--model /no/such/dir: no such checkpoint directory"),
    (["sample", "--model", "/no/such/dir", "--prompt", "x"], "no such checkpoint directory"),
    (["train", "--train.bogus", "1"], "`train.bogus`: unknown key"),
    (["train", "/no/such.toml"], "run file /no/such.toml does not exist"),
    (["train", "--resume", "/no/such/run"], "/no/such/run: no train.toml"),
    (["train", "--train.device", "tpu"], "`train.device`"),
    (["train", "--train.device", "mps"], "`train.device`: 'mps' is not supported"),
    (["train", "--run.dir", ""], "`run.dir`: must name a directory"),
    (["train", "--resume", "RUN", "--run.dir", "elsewhere"], "give no --run.dir with it"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray default run directory lands in tmp
    if "RUN" in argv:  # a run directory that exists
        (tmp_path / "RUN").mkdir()
        (tmp_path / "RUN" / "train.toml").write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith(f"dsv3 {argv[0]}: error:")


def test_unknown_flag_of_another_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
