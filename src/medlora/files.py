"""Writing files so that nothing half-written is ever read: text, JSON and folders are written under a temporary
name and renamed into place; a write that fails for want of room (a full disk, a quota) is one line naming the file
and leaves no temporary behind. Also the checks that an output can be written where it is to go (before slow work
starts), the crash tests' fault points, checksums and tolerant JSON reading. It knows no run-folder file names
(rundir.py does)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import MedloraError, write_failure


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finite_json(value):
    """NaN and infinity as null: JSON has no such numbers, and a run folder's files must stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# Fault injection for the crash tests (tests/test_crash.py): with MEDLORA_TEST_CRASH_AT=<point>, the process
# SIGKILLs itself at that point of writing an artifact, exactly as a power cut or the OOM killer would; with
# <point>=<signal number>, it sends itself that signal instead (a Ctrl-C or SIGTERM at a known moment).
CRASH_ENV = "MEDLORA_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    at = os.environ.get(CRASH_ENV)
    if at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif at and at.startswith(name + "=") and (signum := at[len(name) + 1:]).isdigit():
        os.kill(os.getpid(), int(signum))


def wait_point(name: str, until: Callable[[], bool], seconds: float = 120.0) -> None:
    """With MEDLORA_TEST_CRASH_AT=<name>=wait, wait here until ``until()`` is true (the signal a test sends has
    arrived) or ``seconds`` have passed: the signal then lands at a known point however fast the machine is."""
    if os.environ.get(CRASH_ENV) == name + "=wait":
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            time.sleep(0.05)


def raise_write_error(path: Path, error: BaseException):
    """Re-raise ``error``; as one line naming ``path`` when it is a failed write (a full disk, a quota)."""
    reason = write_failure(error)  # None for Ctrl-C and every other error
    if reason is None:
        raise error
    free = shutil.disk_usage(existing_ancestor(path)).free
    raise MedloraError(f"cannot write {path}: {reason} ({free / 1e6:,.0f} MB free there)") from None


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(finite_json(data), indent=2, ensure_ascii=False, allow_nan=False),
                      crash=f"json:{path.name}")


def write_text_atomic(path: Path, text: str, crash: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException as e:  # a full disk: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise_write_error(path, e)
    if crash:
        crash_point(crash)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON object from the run folder, or {} when the file is absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_dir(final: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp_dir), then rename into place, so readers never see a half-written folder."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException as e:  # a full disk (or Ctrl-C): the half-written folder goes, and gives its room back
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_error(final, e)
    crash_point(f"dir:{final.name}")
    if final.exists():  # replacing: the previous version stays whole until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---------------------------------------------------------------- before slow work: can the output go there?

def check_output_location(path: Path, need_bytes: int = 0, label: str = "output_dir") -> None:
    """Fail before training if the run folder cannot be written or the disk is too full."""
    probe = existing_ancestor(path)
    if not probe.is_dir():
        raise MedloraError(f"cannot create {label} {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".medlora-write-test")
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise MedloraError(f"cannot write to {label} {path} ({e.strerror})") from None
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise MedloraError(f"not enough free disk for {path}: need about {need_bytes / 1e9:.1f} GB for checkpoints "
                           f"and artifacts, {free / 1e9:.1f} GB free")


def check_output_file(path: Path, label: str) -> None:
    """Fail before slow work (loading a model) if the file ``path`` cannot be written where it is to go."""
    if path.is_dir():
        raise MedloraError(f"{label} {path} is a folder; give a file name")
    check_output_location(path.parent, label=f"{label} folder")
