"""One request's state in the engine: its tokens, how many are cached, sampling RNG, stop checks and text.

The engine works on token ids. Text comes from a tokenizer that only has to satisfy `TokenizerLike` (the
project's `dsv3.data.Tokenizer` does; tests use a byte-level stand-in). Text is decoded incrementally: each
step decodes only the tokens since the last whole character and a few before them (decoding all output tokens
every step made long generations quadratic). It is released to a stream only up to a safe point: never an
incomplete UTF-8 character (the decoder's U+FFFD) and never a tail that could still grow into a stop string.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

import torch

from dsv3.infer.sampling import SamplingParams


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer."""

    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache: needs a prefill (new, or preempted and to be recomputed)
    RUNNING = "running"  # cached and decoding
    FINISHED = "finished"


class Sequence:
    """Prompt + generated tokens. Invariant while running: positions 0 .. num_cached-1 are in the cache, and
    num_cached == len(tokens) - 1 (the newest token is fed by the next step)."""

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, eos_id: int | None):
        self.seq_id = seq_id
        self.params = params
        self.tokens = list(prompt)
        self.num_prompt = len(prompt)
        self.num_cached = 0
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator: torch.Generator = params.generator()
        self.stop_ids = set(params.stop_token_ids)
        if eos_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_id)
        self.draft: Any = None  # the drafter's per-sequence state (dsv3/infer/speculative.py)
        # speculation statistics: verification steps, drafted and accepted tokens
        self.steps = 0
        self.drafted = 0
        self.accepted = 0
        # text: `text` is everything decodable so far (cut at a stop string); `_sent_*` what a stream has seen
        self.text = ""
        self._text_tokens = 0  # output tokens that count towards the text (a final stop token does not)
        self._decoded = 0  # output tokens whose text the last update_text checked for stop strings
        # incremental decoding: output[:_read] decodes to _stable (ends on a whole character); the next step
        # decodes output[_prefix:] and keeps what follows the text of output[_prefix:_read], the few tokens
        # before _read giving a decoder context (one that drops a word's leading space at the start, say)
        self._stable = ""
        self._prefix = self._read = 0
        self._sent_text = 0
        self._sent_tokens = 0

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, new: list[int], max_model_len: int) -> None:
        """Add newly sampled tokens in order, stopping at the first stop id, at max_tokens or at the end of
        the context (tokens after that point, e.g. accepted drafts past an EOS, are dropped)."""
        for tok in new:
            self.tokens.append(tok)
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                break
            self._text_tokens = len(self.tokens) - self.num_prompt
            if self.room(max_model_len) <= 0:
                self.finish_reason = "length"
                break

    def room(self, max_model_len: int) -> int:
        """Tokens it may still append before max_tokens or the end of the context."""
        return min(self.params.max_tokens - (len(self.tokens) - self.num_prompt), max_model_len - len(self.tokens))

    def update_text(self, tokenizer: TokenizerLike | None) -> None:
        """Decode the output and apply stop strings; sets finish_reason 'stop' when one appears. When the step
        added several tokens (accepted drafts) and a stop string shows, the output is cut after the first
        token that completes it, where one-token-a-step decoding would have stopped."""
        if tokenizer is None:
            return
        n = self._text_tokens
        p0 = self.num_prompt + self._prefix  # (slicing `tokens` itself: `output` would copy all of it)
        known = tokenizer.decode(self.tokens[p0:self.num_prompt + self._read])
        window = tokenizer.decode(self.tokens[p0:self.num_prompt + n])
        text = self._stable + window[len(known):]
        searched = len(self._stable)  # a stop string inside _stable was found in an earlier step
        if n > self._read and not window.endswith("\ufffd"):  # whole characters up to n: their text is final
            self._stable, self._prefix, self._read = text, self._read, n
        elif n - 3 > self._read:  # bytes that may never complete (a model's invalid UTF-8): commit 3 tokens back,
            # where the split is final once the window still starts with its text (a character spans <= 4 bytes)
            head = tokenizer.decode(self.tokens[p0:self.num_prompt + n - 3])
            if window.startswith(head):
                self._stable, self._prefix, self._read = self._stable + head[len(known):], self._read, n - 3
        longest = max((len(s) for s in self.params.stop), default=1)
        cut = self._stop_at(text, max(0, searched - longest + 1))
        if cut is not None:
            for m in range(self._decoded + 1, n):  # the shortest output that already shows a stop string
                shorter = tokenizer.decode(self.output[:m])
                if (at := self._stop_at(shorter)) is not None:
                    n, text, cut = m, shorter, at
                    break
            del self.tokens[self.num_prompt + n:]
            self._text_tokens = n
            text = text[:cut]
            self.finish_reason = "stop"
        self._decoded = n
        self.text = text

    def _stop_at(self, text: str, start: int = 0) -> int | None:
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def take_delta(self) -> tuple[str, list[int]]:
        """Text and tokens not yet streamed, held back where more tokens could still change them."""
        tokens = self.output[self._sent_tokens:]
        self._sent_tokens += len(tokens)
        end = len(self.text)
        if self.finish_reason is None:
            while end > self._sent_text and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            hold = 0  # the longest tail that is the start of a stop string
            for stop in self.params.stop:
                hold = max([hold] + [n for n in range(1, len(stop)) if self.text.endswith(stop[:n], 0, end)])
            end = max(end - hold, self._sent_text)
        delta = self.text[self._sent_text:end]
        self._sent_text = end
        return delta, tokens
