"""The emergency guard in front of any backend: when the conversation shows red flags (``medlora.safety``),
the answer starts with the fixed emergency notice, then the model's words. chat, eval and serve wrap their
backend in this (and so must any new answer path).

What is read: the latest user message together with the two before it, so that a follow-up ("should I give him
an aspirin?" after "my dad has crushing chest pain") keeps the notice, and thoughts of suicide or self-harm in
any earlier user message keep the crisis line for the rest of the conversation. Notices that earlier answers
carried are taken out of the conversation before the model sees it: the model would otherwise learn to write
look-alike notices of its own."""

from __future__ import annotations

import re

from ..safety import GuardResult, build_notice, detect
from ..safety.notice import NOTICE_FOOTER, NOTICE_HEADER
from .backend import Backend, GenerationParams, TextStream

NOTICE_SEPARATOR = "\n\n"
RECENT_USER_MESSAGES = 3  # the latest and the two before it are read together
_NOTICE = re.compile(re.escape(NOTICE_HEADER) + r".*?" + re.escape(NOTICE_FOOTER) + r"(?:\r?\n){0,2}", re.DOTALL)


def conversation_flags(messages: list[dict]) -> list[str]:
    """The red-flag categories of a conversation: those of its last RECENT_USER_MESSAGES user messages read as
    one text, and self_harm if any user message in it showed it."""
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    found = detect("\n".join(users[-RECENT_USER_MESSAGES:]))
    if "self_harm" not in found and any("self_harm" in detect(text) for text in users[:-RECENT_USER_MESSAGES]):
        found.insert(0, "self_harm")
    return found


def without_notices(messages: list[dict]) -> list[dict]:
    """The conversation with every emergency notice taken out of earlier answers (the chat REPL, the page and API
    clients send back what they were shown): the notice is the guard's, and a model that sees it in its own past
    turns imitates it."""
    return [{**m, "content": _NOTICE.sub("", m["content"])}
            if m.get("role") == "assistant" and isinstance(m.get("content"), str) and NOTICE_HEADER in m["content"]
            else m for m in messages]


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
        categories = conversation_flags(messages)
        return GuardResult(categories, build_notice(categories, self.emergency_number))

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        guard = self.check(messages)
        inner = self.inner.stream(without_notices(messages), params)
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
