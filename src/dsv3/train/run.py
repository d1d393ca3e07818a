"""Run settings: a TOML run file plus command-line overrides, resolved and written to RUN/train.toml.

    dsv3 train [RUN.toml] [--SECTION.KEY VALUE ...]

Sections and their keys are the dataclasses below; every key has a default, so an empty file (or none) is a
valid run. An override `--train.lr 3e-3` (or `--train.lr=3e-3`) is read as a TOML value when it parses as
one, else as a plain string, and is then converted to the type of the key's default, so `--data.seq_len 128`
is an int and `--run.dir runs/x` a string. `[model]` takes `preset` or `config` plus any ModelConfig field
(`--model.num_hidden_layers 2`), typed by ModelConfig's own fields. The resolved settings, every key
included, are written to RUN/train.toml, which `dsv3 train --resume RUN` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.checkpoint import write_atomic
from dsv3.config import ConfigError, ModelConfig, preset
from dsv3.data.corpus import VAL_FRACTION
from dsv3.train.objective import BALANCE_MODES


@dataclass
class RunSection:
    dir: str = "runs/default"  # the run directory (shared/DESIGN.md): config, metrics, plots, checkpoints


@dataclass
class ModelSection:
    preset: str = "tiny"  # a built-in config (dsv3.config.PRESETS), unless `config` is set
    config: str = ""  # a config.json or a checkpoint directory (its config only; weights start fresh)
    overrides: dict[str, Any] = field(default_factory=dict)  # any other key: a ModelConfig field


@dataclass
class DataSection:
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # files, folders, globs, .jsonl, "stdlib"
    tokenizer: str = "train"  # "train" (a BPE of vocab_size, saved in RUN/tokenizer), "deepseek-v3" or a dir
    vocab_size: int = 4096  # for tokenizer = "train": ids in total, special tokens included
    tokenizer_max_mb: float = 20.0  # for tokenizer = "train": text to train the BPE on
    seq_len: int = 256
    fim_rate: float = 0.1  # share of training documents in Fill-in-the-Middle (PSM) form (paper §4.1)
    val_fraction: float = VAL_FRACTION  # documents held out for validation, by hash
    doc_mask: bool = False  # attention stays within each packed document (the paper does not mask)
    cache_dir: str = ""  # token cache; default $DSV3_CACHE/tokens (~/.cache/dsv3/tokens)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class TrainSection:
    tokens: int = 2_000_000  # the run's length: schedules are fractions of it
    max_minutes: float = 0.0  # stop (with a checkpoint, resumable) after this much wall time; 0 = no limit
    batch_size: int = 32  # sequences per optimiser step once the batch ramp is done
    batch_ramp: bool = True  # the paper's ramp from batch_size / 5 over the first 3.2% of tokens
    micro_batch_size: int = 8  # sequences per forward/backward; the step accumulates gradients
    lr: float = 2.2e-4  # peak learning rate (paper §4.2)
    warmup_steps: int | None = None  # default: the paper's 0.82% of the run's steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    bf16_moments: bool = False  # AdamW moments stored in bf16 (paper §3.3.4), fp32 master weights
    balance: str = "aux-free"  # aux-free | aux-loss | none (dsv3.train.objective)
    alpha: float | None = None  # sequence-wise balance loss weight; default per mode (1e-4, 1e-3, 0)
    gamma: float = 0.001  # aux-free bias update speed
    mtp_lambda: float = 0.3  # MTP loss weight (0.1 after 10/14.8 of the run)
    init_std: float | None = None  # default 0.006 * sqrt(7168 / hidden_size)
    seed: int = 0
    eval_interval: int = 100  # steps between validation passes (also at the start and the end)
    eval_batches: int = 16  # micro-batches of validation data per pass
    checkpoint_interval: int = 500  # steps between checkpoints (also at the end and on SIGINT/SIGTERM)
    keep_last: int = 3  # checkpoints kept; 0 = all
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    autocast: bool = True  # bf16 autocast on GPU (float32 master weights)
    cpu_bf16: bool = False  # bf16 autocast on the CPU too (for CPUs with native bf16; float32 otherwise)
    compile: bool = False  # torch.compile the model and the loss (on the CPU: needs cpu_bf16)
    # with compile: "reduce-overhead" replays CUDA graphs (GPU; needs batch_size == micro_batch_size:
    # with gradient accumulation it fails, pytorch/pytorch#169545), "max-autotune" tunes the GEMMs too
    compile_mode: str = "default"
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class LogSection:
    progress: bool = True  # live tqdm bar
    tensorboard: bool = True  # events in the run directory
    plots: bool = True  # plots/*.png at the end
    load_interval: int = 10  # steps between expert-load rows (for the heat map)


SECTIONS: dict[str, type] = {
    "run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection, "log": LogSection,
}


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    # ---- building ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "run settings") -> RunConfig:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
        out = cls()
        for name, values in d.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: `{name}` must be a table ([{name}])")
            for key, value in values.items():
                out.set(f"{name}.{key}", value)
        return out

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
        """The settings of TOML file `path` (None: all defaults), then the `--section.key value` overrides."""
        run = cls()
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"run file {path} does not exist")
            try:
                data = tomllib.loads(path.read_text("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"run file {path}: not valid TOML ({e})") from None
            run = cls.from_dict(data, where=f"run file {path}")
        for key, value in parse_overrides(overrides or []):
            run.set(key, value)
        return run

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` to `value` (a TOML value or a string), converted to the key's type."""
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"run setting `{dotted}`: expected SECTION.KEY with SECTION one of {', '.join(SECTIONS)}")
        obj = getattr(self, section)
        if section == "model" and key not in ("preset", "config"):
            hints = _hints(ModelConfig)
            if key not in hints:
                raise ConfigError(f"run setting `model.{key}`: not a ModelConfig field (nor preset/config)")
            obj.overrides[key] = convert(value, hints[key], dotted)
            return
        hints = _hints(type(obj))
        if key not in hints or key == "overrides":
            keys = ", ".join(k for k in hints if k != "overrides")
            raise ConfigError(f"run setting `{dotted}`: unknown key; [{section}] has {keys}")
        setattr(obj, key, convert(value, hints[key], dotted))

    # ---- checks and derived objects ----------------------------------------------------------------
    def validate(self) -> None:
        t, d = self.train, self.data

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                section, key = name.split(".")
                raise ConfigError(f"run setting `{name}`: {msg} (got {getattr(getattr(self, section), key)!r})")

        for name in ("data", "train"):  # nan / inf in any number would train silently to a NaN checkpoint
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                if isinstance(value, float):
                    need(math.isfinite(value), f"{name}.{key}", "must be a finite number")
        need(t.tokens > 0, "train.tokens", "must be > 0")
        need(self.run.dir.strip() != "", "run.dir", "must name a directory")
        need(t.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0: no limit)")
        need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        need(t.batch_size >= t.micro_batch_size and t.batch_size % t.micro_batch_size == 0, "train.batch_size",
             f"must be a positive multiple of micro_batch_size={t.micro_batch_size}")
        need(t.compile_mode in COMPILE_MODES, "train.compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        need(t.compile_mode != "reduce-overhead" or t.batch_size == t.micro_batch_size, "train.compile_mode",
             f"reduce-overhead needs batch_size == micro_batch_size (got {t.batch_size} and {t.micro_batch_size}): "
             "its CUDA graphs fail with gradient accumulation (pytorch/pytorch#169545)")
        need(t.lr >= 0, "train.lr", "must be >= 0")
        need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0: no clipping)")
        need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        need(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
        need(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
        need(t.gamma >= 0, "train.gamma", "must be >= 0")
        need(t.mtp_lambda >= 0, "train.mtp_lambda", "must be >= 0")
        need(t.alpha is None or t.alpha >= 0, "train.alpha", "must be >= 0 (or none: the mode's default)")
        need(t.init_std is None or t.init_std > 0, "train.init_std", "must be > 0 (or none: the default)")
        need(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0 (or none)")
        need(0 <= t.seed < 2**32, "train.seed", "must be in [0, 2^32)")
        need(d.tokenizer_max_mb > 0, "data.tokenizer_max_mb", "must be > 0")
        need(t.balance in BALANCE_MODES, "train.balance", f"must be one of {', '.join(BALANCE_MODES)}")
        need(t.eval_interval >= 1, "train.eval_interval", "must be >= 1")
        need(t.eval_batches >= 1, "train.eval_batches", "must be >= 1")
        need(t.checkpoint_interval >= 1, "train.checkpoint_interval", "must be >= 1")
        need(t.keep_last >= 0, "train.keep_last", "must be >= 0 (0: keep all)")
        need(t.threads >= 0, "train.threads", "must be >= 0")
        need(d.seq_len >= 2, "data.seq_len", "must be >= 2")
        need(0 <= d.fim_rate <= 1, "data.fim_rate", "must be in [0, 1]")
        need(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
        need(bool(d.sources), "data.sources", "must name at least one source")
        need(self.log.load_interval >= 1, "log.load_interval", "must be >= 1")
        self.model_config()  # raises ConfigError naming a bad model field

    def model_config(self) -> ModelConfig:
        m = self.model
        base = ModelConfig.from_json(m.config) if m.config else preset(m.preset)
        return base.replace(**m.overrides) if m.overrides else base

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if name == "model":
                section.update(section.pop("overrides"))
            out[name] = section
        return out

    def to_toml(self) -> str:
        """The settings as TOML. TOML has no null: None is written as "none", which reads back as None."""
        lines = ["# resolved run settings (dsv3 train); `dsv3 train --resume RUN` reads them back"]
        for name, section in self.to_dict().items():
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value('none' if v is None else v)}" for k, v in section.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the settings to `path` atomically: a resumed run rewrites them, and they are its only copy."""
        write_atomic(path, self.to_toml())


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`--section.key value` / `--section.key=value` pairs -> [(dotted key, value)]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --SECTION.KEY VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} needs a value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        out.append((key, _parse_value(raw)))
    return out


class _Override(str):
    """A command-line value: its text, and `value`, the TOML value it reads as (or the text itself), so that a
    key taking a string gets the text (`--run.dir 2024-06-01` is a name, not a TOML date) and the others the
    value (3e-3, [1, 2], {a = 1})."""

    value: Any


def _parse_value(raw: str) -> _Override:
    out = _Override(raw)
    try:
        out.value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        out.value = raw
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert(value: Any, hint: Any, name: str) -> Any:
    """`value` as type `hint` (bool, int, float, str, list[str], dict, X | None), or ConfigError."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return convert(value, a, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]

    if isinstance(value, _Override):  # text for a string (or a bool's 0 / 1 / yes), else its TOML value
        parsed = value.value
        text = hint in (str, bool) or (typing.get_origin(hint) is list and not isinstance(parsed, list))
        value = (parsed if isinstance(parsed, str) else str(value)) if text else parsed

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"run setting `{name}`: expected {expected}, got {value!r}")

    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 2e6 is a TOML float
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    origin = typing.get_origin(hint)
    if origin is list:
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad("a list")
        return value if item is Any else [convert(v, item, name) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad("a table, e.g. {a = 1}")
        return dict(value)
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()
                               if x is not None) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")
