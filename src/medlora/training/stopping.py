"""How `medlora train` stops outside the training loop (where callbacks.Interrupt saves a checkpoint first): SIGTERM
and SIGHUP while the model loads or is evaluated, and the one line that says what was kept and how to go on, also
when the disk filled up or the memory ran out."""

from __future__ import annotations

import shutil
import signal
import threading
from contextlib import contextmanager

from ..errors import Interrupted, ignored, memory_failure, off_the_dead_terminal, write_failure
from ..rundir import RunDir
from .callbacks import Interrupt


class Stopped(BaseException):
    """SIGTERM or SIGHUP outside the training loop (loading, the base eval, the final eval, the artifacts)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def signals_stop(enabled: bool):
    """Outside trainer.train (where Interrupt saves a checkpoint first), SIGTERM and SIGHUP stop the run as Ctrl-C
    does, so that run() can say what was kept instead of the process dying silently. Not in a torchrun worker:
    its launcher owns the signals (training/launcher.py)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGHUP:
            off_the_dead_terminal()
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP) if not ignored(sig)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)


def stopped_outside_training(run: RunDir, e: BaseException, discarded: bool) -> Interrupted:
    """Ctrl-C, SIGTERM or SIGHUP while the model loaded or was evaluated: what was kept, and the way on."""
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    name = Interrupt.NAMES.get(signum, "a signal")
    if discarded:
        gone = "removed" if not run.path.exists() else "emptied"
        return Interrupted(f"{name}: stopped before the first checkpoint, so there is nothing to resume ({run} "
                           f"{gone}): start the run again", 128 + int(signum))
    return Interrupted(f"{name}: stopped; resume with: medlora train --resume {run.shell}", 128 + int(signum))


def stopped_here(run: RunDir, error: BaseException) -> str | None:
    """One line for a run that cannot go on here: the run folder cannot be written (a full disk, a quota) or the
    memory ran out. Removes the checkpoint that was being written (it could never be resumed, and it holds disk
    space) and says where the run can go on from. None for any other error."""
    if reason := write_failure(error):
        free = shutil.disk_usage(run.path).free
        problem = f"cannot write to the run folder {run}: {reason} ({free / 1e6:,.0f} MB free there)"
        go_on = f"make room, then resume with: medlora train --resume {run.shell}"
        again = "make room and start the run again"
    elif reason := memory_failure(error):
        problem = f"out of memory ({reason})"
        less = "" if run.read_info().get("gradient_checkpointing", True) else " --gradient_checkpointing on"
        go_on = (f"resume with less memory: medlora train --resume {run.shell}{less}" if less else
                 f"close other programs, then resume with: medlora train --resume {run.shell}; "
                 "or start a new run with a lower --max_seq_len or --precision int8")
        again = "start again with a lower --max_seq_len, --gradient_checkpointing on or --precision int8"
    else:
        return None
    last = run.latest_complete_checkpoint(quiet=True)
    run.remove_checkpoints_after(last)
    where = f"the last complete checkpoint is {last.name}; {go_on}" if last else f"no checkpoint was completed; {again}"
    return f"{problem}. Training stopped: {where}"
