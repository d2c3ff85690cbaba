"""`medlora chat` in a terminal: one question (``-q``) or an interactive, multi-turn conversation.
Answers stream as they are generated, through whichever inference backend is loaded."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TextIO

from .data import chat_messages
from .errors import MedloraError
from .inference.backend import Backend, GenerationParams, context_length


def fit(backend: Backend, messages: list[dict], params: GenerationParams) -> tuple[list[dict], GenerationParams, int]:
    """The conversation (``messages[0]`` the system prompt) as it fits the model's context: the oldest exchanges
    left out while it is too long (the latest question always stays), and max_new_tokens cut to the room left.
    Returns (messages, params, how many earlier messages were left out); raises MedloraError when the system
    prompt and the latest question alone leave no room for an answer."""
    context = context_length(backend)
    dropped = 0
    while True:
        n_prompt = backend.count_tokens(messages)
        if n_prompt < context:
            return messages, replace(params, max_new_tokens=min(params.max_new_tokens, context - n_prompt)), dropped
        later = [i for i in range(2, len(messages)) if messages[i]["role"] == "user"]
        if not later:
            raise MedloraError(f"the question takes {n_prompt} tokens with the system prompt, and this model's "
                               f"context holds {context}: ask a shorter question")
        dropped += later[0] - 1
        messages = messages[:1] + messages[later[0]:]


def print_stream(backend: Backend, messages: list[dict], params: GenerationParams, out: TextIO) -> str:
    """Print the answer to ``out`` piece by piece; return it whole."""
    pieces = []
    stream = backend.stream(messages, params)
    try:
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
    finally:
        stream.close()
        print(file=out, flush=True)
    return "".join(pieces).strip()


def answer(backend: Backend, question: str, params: GenerationParams, system_prompt: str | None = None) -> str:
    """One answer, not printed."""
    return backend.stream(chat_messages(system_prompt or backend.system_prompt, question), params).text()


def ask(backend: Backend, question: str, params: GenerationParams, system_prompt: str | None = None,
        out: TextIO | None = None) -> str:
    """``chat -q``: print one streamed answer (to stdout by default)."""
    messages, params, _ = fit(backend, chat_messages(system_prompt or backend.system_prompt, question), params)
    return print_stream(backend, messages, params, out or sys.stdout)


def repl(backend: Backend, params: GenerationParams, system_prompt: str | None = None) -> None:
    """Interactive multi-turn chat. Ctrl-C stops the current answer; Ctrl-D or /exit quits; /reset clears."""
    history: list[dict] = [{"role": "system", "content": system_prompt or backend.system_prompt}]
    print(f"medlora chat: {backend.description}. /reset clears the history, /exit or Ctrl-D quits, "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            question = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        except UnicodeDecodeError:
            question = "\udcff"  # reported below, as when the decoder kept the bytes as surrogate escapes
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            print("(that line is not UTF-8 text; type it again)", file=sys.stderr)
            continue
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history = history[:1]
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": question})
        try:
            sent, fitted, dropped = fit(backend, history, params)
        except MedloraError as e:
            print(f"({e})", file=sys.stderr)
            history.pop()
            continue
        if dropped:
            print(f"(the conversation outgrew the model's context of {context_length(backend)} tokens: the "
                  f"{dropped} oldest messages are left out of it from now on; /reset starts afresh)", file=sys.stderr)
            history = sent
        print("assistant> ", end="", flush=True)
        try:
            reply = print_stream(backend, sent, fitted, sys.stdout)
            history.append({"role": "assistant", "content": reply})
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
            history.pop()
