"""The emergency guard in front of any backend: when the user's latest message shows red flags
(``medlora.safety``), the answer starts with the fixed emergency notice, then the model's words.
chat and eval wrap their backend in this (and so must any new answer path, such as a server)."""

from __future__ import annotations

from ..safety import GuardResult, check
from .backend import Backend, GenerationParams, TextStream

NOTICE_SEPARATOR = "\n\n"


def last_user_message(messages: list[dict]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


class GuardedBackend:
    """A backend whose streams start with the emergency notice when the guard fires. Everything else
    (model, tokenizer, adapter switching, token counting) is the wrapped backend's."""

    def __init__(self, inner: Backend, enabled: bool = True, emergency_number: str | None = None):
        self.inner = inner
        self.enabled = enabled
        self.emergency_number = emergency_number

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def check(self, messages: list[dict]) -> GuardResult:
        if not self.enabled:
            return GuardResult([], None)
        return check(last_user_message(messages), self.emergency_number)

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        guard = self.check(messages)
        inner = self.inner.stream(messages, params)
        inner.guard = guard
        if guard.notice is None:
            return inner

        def pieces(stream: TextStream):
            yield guard.notice + NOTICE_SEPARATOR  # first, before the model has said anything
            try:
                yield from inner
            finally:
                inner.close()
            stream.completion_tokens, stream.finish_reason = inner.completion_tokens, inner.finish_reason

        guarded = TextStream(pieces, inner.prompt_tokens)
        guarded.guard = guard
        return guarded


def without_notice(text: str, guard: GuardResult | None) -> str:
    """The model's own words of an answer (the notice, when there was one, removed)."""
    if guard is None or guard.notice is None:
        return text
    return text.removeprefix(guard.notice).lstrip("\n")
