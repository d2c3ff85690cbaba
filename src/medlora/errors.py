"""The two errors the CLI turns into one line (and an exit code), and medlora's stderr logger."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
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


def ignored(sig: int) -> bool:
    """Whether this process was started with ``sig`` ignored: `nohup` ignores SIGHUP, so that training outlives the
    terminal, and a shell script's background job (`medlora train ... &`) ignores Ctrl-C's SIGINT. medlora keeps
    that choice instead of taking the signal as a request to stop."""
    return signal.getsignal(sig) == signal.SIG_IGN


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


# A write that failed for want of room or permission, as the libraries below report it: Python's OSError with its
# errno; safetensors' "I/O error: No space left on device (os error 28)"; torch.save's C++ stream, which loses the
# errno ("unexpected pos 576 vs 534", from "basic_ios::clear: iostream error").
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_WRITE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system")
_STREAM_TEXTS = ("iostream error", "file write failed")


def _chain(error: BaseException):
    """``error`` and the errors it was raised from or while handling, once each."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def write_failure(error: BaseException) -> str | None:
    """Why ``error`` is a failed write (the disk is full, a quota or file size limit, a read-only disk), in a few
    words; None for anything else. Looks through the chain of causes."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        found = next((t for t in _WRITE_TEXTS if t.lower() in text.lower()), None)
        if found:
            return found
        if any(t in text for t in _STREAM_TEXTS):
            return "a write failed"
    return None


def memory_failure(error: BaseException) -> str | None:
    """What ran out when ``error`` is a failed allocation (Python's MemoryError, or torch's "DefaultCPUAllocator:
    can't allocate memory: you tried to allocate N bytes"), in a few words; None for anything else."""
    for e in _chain(error):
        if isinstance(e, MemoryError):
            return "an allocation failed"
        found = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
        if found:
            return f"an allocation of {int(found.group(1)) / 1e9:.2f} GB failed"
    return None
