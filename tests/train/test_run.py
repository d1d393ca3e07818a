"""Run settings: TOML + typed command-line overrides, and the written train.toml reading back the same."""

from __future__ import annotations

import pytest

from dsv3.config import ConfigError
from dsv3.train.run import RunConfig, parse_overrides


def test_overrides_are_typed_by_the_defaults(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nlr = 1e-3\ntokens = 5e5\n[model]\npreset = "tiny"\nnum_hidden_layers = 3\n')
    run = RunConfig.load(f, ["--train.lr", "3e-3", "--data.seq_len=128", "--data.sources", "a,b",
                             "--train.warmup_steps", "none", "--train.alpha", "2e-4", "--log.plots", "false",
                             "--model.rope_scaling", "none", "--run.dir", "runs/x", "--train.tokens", "2_000"])
    assert run.train.lr == 3e-3 and isinstance(run.train.lr, float)
    assert run.train.tokens == 2000 and isinstance(run.train.tokens, int)
    assert run.data.seq_len == 128 and run.data.sources == ["a", "b"]
    assert run.train.warmup_steps is None and run.train.alpha == 2e-4 and run.log.plots is False
    assert run.run.dir == "runs/x"
    cfg = run.model_config()
    assert cfg.num_hidden_layers == 3 and cfg.rope_scaling is None and cfg.hidden_size == 256
    # train.toml round trip, None values included
    run.save(tmp_path / "train.toml")
    assert RunConfig.load(tmp_path / "train.toml").to_dict() == run.to_dict()


@pytest.mark.parametrize(("args", "match"), [
    (["--train.bogus", "1"], r"`train.bogus`: unknown key"),
    (["--nosection.x", "1"], r"SECTION one of"),
    (["--train.tokens", "lots"], r"`train.tokens`: expected an integer"),
    (["--train.lr", "fast"], r"`train.lr`: expected a number"),
    (["--model.not_a_field", "1"], r"not a ModelConfig field"),
    (["--train.lr"], r"needs a value"),
    (["stray"], r"unexpected argument"),
])
def test_bad_overrides_name_the_setting(args, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.load(None, args)


def test_validate_names_the_field():
    run = RunConfig.load(None, ["--train.batch_size", "12", "--train.micro_batch_size", "8"])
    with pytest.raises(ConfigError, match="train.batch_size.*multiple of micro_batch_size=8"):
        run.validate()
    run = RunConfig.load(None, ["--model.n_group", "3"])
    with pytest.raises(ConfigError, match="n_routed_experts"):
        run.validate()
    run = RunConfig.load(None, ["--train.compile_mode", "fastest"])
    with pytest.raises(ConfigError, match="train.compile_mode.*one of default, reduce-overhead"):
        run.validate()
    run = RunConfig.load(None, ["--train.compile_mode", "reduce-overhead", "--train.batch_size", "16"])
    with pytest.raises(ConfigError, match="batch_size == micro_batch_size .got 16 and 8.*169545"):
        run.validate()
    RunConfig.load(None, ["--train.compile_mode", "reduce-overhead", "--train.batch_size", "8"]).validate()


@pytest.mark.parametrize(("args", "match"), [
    (["--train.lr", "inf"], r"`train.lr`: must be a finite number"),
    (["--train.gamma", "nan"], r"`train.gamma`: must be a finite number"),
    (["--data.fim_rate", "nan"], r"`data.fim_rate`: must be a finite number"),
    (["--train.mtp_lambda", "-1"], r"`train.mtp_lambda`: must be >= 0"),
    (["--train.gamma", "-1e-3"], r"`train.gamma`: must be >= 0"),
    (["--train.seed", "-1"], r"`train.seed`: must be in \[0, 2\^32\)"),
    (["--train.init_std", "-1"], r"`train.init_std`: must be > 0"),
    (["--train.beta2", "1"], r"`train.beta2`: must be in \[0, 1\)"),
    (["--data.tokenizer_max_mb", "0"], r"`data.tokenizer_max_mb`: must be > 0"),
    # each range at its edge: the first value refused
    (["--train.tokens", "0"], r"`train.tokens`: must be > 0 \(got 0\)"),
    (["--train.max_minutes", "-0.5"], r"`train.max_minutes`: must be >= 0"),
    (["--train.micro_batch_size", "0"], r"`train.micro_batch_size`: must be >= 1"),
    (["--train.lr", "-1e-9"], r"`train.lr`: must be >= 0"),
    (["--train.grad_clip", "-0.1"], r"`train.grad_clip`: must be >= 0"),
    (["--train.weight_decay", "-0.1"], r"`train.weight_decay`: must be >= 0"),
    (["--train.beta1", "1"], r"`train.beta1`: must be in \[0, 1\)"),
    (["--train.beta1", "-0.1"], r"`train.beta1`: must be in \[0, 1\)"),
    (["--train.alpha", "-1e-4"], r"`train.alpha`: must be >= 0"),
    (["--train.warmup_steps", "-1"], r"`train.warmup_steps`: must be >= 0"),
    (["--train.seed", str(2**32)], r"`train.seed`: must be in \[0, 2\^32\)"),
    (["--train.balance", "greedy"], r"`train.balance`: must be one of"),
    (["--train.eval_interval", "0"], r"`train.eval_interval`: must be >= 1"),
    (["--train.eval_batches", "0"], r"`train.eval_batches`: must be >= 1"),
    (["--train.checkpoint_interval", "0"], r"`train.checkpoint_interval`: must be >= 1"),
    (["--train.keep_last", "-1"], r"`train.keep_last`: must be >= 0"),
    (["--train.threads", "-1"], r"`train.threads`: must be >= 0"),
    (["--data.seq_len", "1"], r"`data.seq_len`: must be >= 2 \(got 1\)"),
    (["--data.fim_rate", "1.01"], r"`data.fim_rate`: must be in \[0, 1\]"),
    (["--data.fim_rate", "-0.01"], r"`data.fim_rate`: must be in \[0, 1\]"),
    (["--data.val_fraction", "0"], r"`data.val_fraction`: must be in \(0, 1\)"),
    (["--data.val_fraction", "1"], r"`data.val_fraction`: must be in \(0, 1\)"),
    (["--data.sources", ""], r"`data.sources`: must name at least one source"),
    (["--log.load_interval", "0"], r"`log.load_interval`: must be >= 1"),
])
def test_values_that_would_train_to_nan_or_fail_late_are_refused(args, match):
    # nan / inf trained to a NaN checkpoint with exit code 0; a negative seed failed after the run's files were
    # written, which then refused a corrected run; every range check names its setting at its bound
    with pytest.raises(ConfigError, match=match):
        RunConfig.load(None, args).validate()


def test_values_at_the_edge_of_each_range_are_accepted():
    edges = ["--train.tokens", "1", "--train.max_minutes", "0", "--train.micro_batch_size", "1",
             "--train.batch_size", "1", "--train.lr", "0", "--train.grad_clip", "0", "--train.weight_decay", "0",
             "--train.beta1", "0", "--train.beta2", "0", "--train.alpha", "0", "--train.warmup_steps", "0",
             "--train.seed", str(2**32 - 1), "--train.eval_interval", "1", "--train.eval_batches", "1",
             "--train.checkpoint_interval", "1", "--train.keep_last", "0", "--train.threads", "0",
             "--data.seq_len", "2", "--data.fim_rate", "1", "--data.val_fraction", "0.999",
             "--log.load_interval", "1", "--train.gamma", "0", "--train.mtp_lambda", "0"]
    RunConfig.load(None, edges).validate()
    RunConfig.load(None, ["--data.fim_rate", "0", "--data.val_fraction", "1e-9"]).validate()


def test_parse_overrides_reads_toml_values():
    parsed = parse_overrides(["--a.b", "[1, 2]", "--a.c=true", "--a.d", "x y"])
    assert [(k, v.value) for k, v in parsed] == [("a.b", [1, 2]), ("a.c", True), ("a.d", "x y")]
    assert [str(v) for _, v in parsed] == ["[1, 2]", "true", "x y"]  # and keeps the text


def test_a_string_setting_takes_the_text_as_given():
    # TOML would read these as a date, an integer and a float: a key that takes a string gets the text, a bool
    # its 0 / 1, a list of strings the one name; numbers and quoted strings still read as TOML
    run = RunConfig.load(None, ["--run.dir", "2024-06-01", "--data.tokenizer", "0.1", "--train.batch_ramp", "0",
                                "--log.plots", "1", "--data.sources", "2024-06-01", "--train.lr", "3e-3",
                                "--model.preset", '"tiny"'])
    assert (run.run.dir, run.data.tokenizer, run.train.batch_ramp, run.log.plots) == ("2024-06-01", "0.1", False, True)
    assert (run.data.sources, run.train.lr, run.model.preset) == (["2024-06-01"], 3e-3, "tiny")


def test_defaults_are_the_papers_training_hyperparameters():
    # paper §4.2: AdamW beta1 0.9, beta2 0.95, weight decay 0.1, peak lr 2.2e-4, gradient clipping at 1.0,
    # the aux-free bias speed 0.001 and the MTP weight 0.3; §2.1.2: balancing without auxiliary loss
    t = RunConfig().train
    got = (t.beta1, t.beta2, t.weight_decay, t.lr, t.grad_clip, t.gamma, t.mtp_lambda, t.balance)
    assert got == (0.9, 0.95, 0.1, 2.2e-4, 1.0, 0.001, 0.3, "aux-free")
