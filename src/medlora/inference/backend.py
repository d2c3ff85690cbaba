"""The one interface in front of every inference backend: ``stream(messages, params)`` yields the answer's
text pieces as they are generated; the stream then carries the token counts and why it stopped.

Chat, eval (and later the server) only talk to this interface, so a faster backend (llama.cpp) slots in
without touching them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Protocol

from ..errors import MedloraError


SEED_LIMIT = 2**32 - 1  # seeds are 0 .. 2**32 - 2 in both backends


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. The specification's presets: greedy for comparisons and evaluation, sampling
    (temperature 0.7, top_p 0.9, repetition_penalty 1.05) for demos; 256 new tokens for both."""

    do_sample: bool = False
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def validate(self) -> "GenerationParams":
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature is None or (math.isfinite(self.temperature) and self.temperature > 0),
             "temperature must be > 0"),
            (self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1), "top_p must be in (0, 1]"),
            (self.repetition_penalty is None or (math.isfinite(self.repetition_penalty)
                                                 and self.repetition_penalty > 0), "repetition_penalty must be > 0"),
            # numpy (transformers' set_seed) takes < 2**32, and llama.cpp reads 2**32 - 1 as "a random seed"
            (self.seed is None or 0 <= self.seed < SEED_LIMIT, f"seed must be between 0 and {SEED_LIMIT - 1}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MedloraError(message)
        return self

    def settings(self) -> dict:
        """The decoding settings that shape the answer (no seed; sampling knobs only when sampling)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "seed"}
        if not self.do_sample:
            for k in ("temperature", "top_p"):
                out.pop(k, None)
        return out


PRESETS = {
    "greedy": GenerationParams(do_sample=False, max_new_tokens=256),
    "sample": GenerationParams(do_sample=True, max_new_tokens=256, temperature=0.7, top_p=0.9,
                               repetition_penalty=1.05),
}


def preset(mode: str = "greedy", **overrides) -> GenerationParams:
    """A preset with the given (non-None) values replaced, range-checked."""
    if mode not in PRESETS:
        raise MedloraError(f"unknown mode {mode!r}; choose greedy or sample")
    return replace(PRESETS[mode], **{k: v for k, v in overrides.items() if v is not None}).validate()


class TextStream:
    """An iterator of text pieces. Once exhausted, ``prompt_tokens``, ``completion_tokens`` and
    ``finish_reason`` ('stop': the model ended its turn; 'length': max_new_tokens ran out) are set.
    Closing it early (``close()``, or leaving a for loop by an exception) stops the generation."""

    def __init__(self, pieces: Callable[["TextStream"], Iterator[str]], prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.guard = None  # the emergency guard's finding (safety.GuardResult) where a guard was in front
        self._it = pieces(self)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def text(self) -> str:
        """Consume the rest of the stream; the whole answer."""
        return "".join(self).strip()


class Backend(Protocol):
    name: str            # "hf", later "llamacpp"
    description: str     # what is loaded, for the user
    system_prompt: str   # the run's training system prompt (or the default)

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream: ...

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt these messages make (chat template, generation prompt included)."""
        ...


DEFAULT_CONTEXT = 2048  # a model whose config names no context length


def context_length(backend) -> int:
    """The most tokens prompt and answer may take together: llama.cpp's n_ctx, or the model's position limit."""
    inner = getattr(backend, "inner", backend)
    if getattr(inner, "n_ctx", None):
        return int(inner.n_ctx)
    config = getattr(getattr(inner, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT
