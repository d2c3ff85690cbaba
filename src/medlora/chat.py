"""`medlora chat` in a terminal: one question (``-q``) or an interactive, multi-turn conversation.
Answers stream as they are generated, through whichever inference backend is loaded."""

from __future__ import annotations

import sys
from typing import TextIO

from .data import chat_messages
from .inference.backend import Backend, GenerationParams


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
    return print_stream(backend, chat_messages(system_prompt or backend.system_prompt, question), params,
                        out or sys.stdout)


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
        print("assistant> ", end="", flush=True)
        try:
            reply = print_stream(backend, history, params, sys.stdout)
            history.append({"role": "assistant", "content": reply})
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
            history.pop()
