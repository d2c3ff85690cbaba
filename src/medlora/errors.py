"""The two errors the CLI turns into one line (and an exit code), and medlora's stderr logger."""

from __future__ import annotations

import sys


class MedloraError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""


class Interrupted(MedloraError):
    """Ctrl-C or SIGTERM during training, after a resumable checkpoint was saved; the CLI exits with ``code``
    (128 + the signal's number, the shell's convention: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def log(msg: str) -> None:
    """A progress or warning line on stderr (stdout stays for results: paths, answers, JSON)."""
    print(f"medlora: {msg}", file=sys.stderr, flush=True)
