"""The two errors the CLI turns into one line (and an exit code), and medlora's stderr logger."""

from __future__ import annotations

import contextlib
import os
import stat
import sys


class MedloraError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""


class Interrupted(MedloraError):
    """Ctrl-C, SIGTERM or SIGHUP during training, after a resumable checkpoint was saved; the CLI exits with
    ``code`` (128 + the signal's number, the shell's convention: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def log(msg: str) -> None:
    """A progress or warning line on stderr (stdout stays for results: paths, answers, JSON)."""
    print(f"medlora: {msg}", file=sys.stderr, flush=True)


def off_the_dead_terminal() -> None:
    """After a hang-up every write to the terminal fails (EIO), and the progress bar's next write would end the run
    before its checkpoint. stdout and stderr that were a terminal now go to /dev/null; a file or a pipe they were
    redirected to (`medlora train ... > train.log 2>&1`) keeps the messages."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                fd = stream.fileno()
                on_terminal = stat.S_ISCHR(os.fstat(fd).st_mode)
            except (OSError, ValueError, AttributeError):  # no file descriptor (captured, closed): nothing to do
                continue
            if on_terminal:
                with contextlib.suppress(OSError):
                    stream.flush()  # what the terminal could not take is dropped below
                os.dup2(null, fd)
    finally:
        os.close(null)
