"""The launcher of ``medlora train --nproc N``: torchrun's agent (``torch.distributed.run``) in this process, N
local workers, each an ordinary ``medlora train`` (training/distributed.py is their side). Kept apart from the
workers' code so that the launcher imports torch alone, not transformers and peft: it starts the workers seconds
sooner, and they do not share the CPU with its imports."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from ..config import process_counts
from ..errors import MedloraError, ignored, log, off_the_dead_terminal
from ..rundir import LOCK, RunDir

# Set by ``launch`` in its workers: the launcher reports a lost peer in one line, so the workers stay quiet, and
# rank 0 writes the run folder's path to this file so that the line can name it.
LAUNCHED_ENV = "MEDLORA_DIST_RUN_NOTE"
QUIET_EXIT = 3  # a worker whose peer died: the launcher says what happened


def in_worker() -> bool:
    """Started by torchrun (or accelerate launch): the launcher's environment is there."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_environment() -> None:
    """torchrun's variables come as a set; some without the others are a leftover (an exported WORLD_SIZE, a shell
    inherited from another job), on which torch and transformers fail with a traceback or wait for peers that
    never come: one line instead."""
    present = [v for v in TORCHRUN_ENV if v in os.environ]
    if present and len(present) < len(TORCHRUN_ENV):
        missing = [v for v in TORCHRUN_ENV if v not in os.environ]
        raise MedloraError(f"the environment sets {', '.join(present)} but not {', '.join(missing)}: torchrun's "
                           f"variables, left over from another job? Unset them (`unset {' '.join(present)}`), or "
                           "start the job with torchrun")


def _quiet_torchrun_logs() -> None:
    """torchrun's agent logs a multi-line report for every failed worker; the launcher says it in one line."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def torchrun_arguments(nproc: int) -> list[str]:
    """torchrun's options for N local workers running ``python -m medlora``; the workers' own arguments are set
    on the parsed namespace, not parsed by torchrun, which would take --nproc for its --nproc-per-node."""
    return [
        "--standalone",                   # a local c10d rendezvous on a free port
        "--nnodes", "1",
        "--nproc-per-node", str(nproc),
        "--max-restarts", "0",            # a dead worker ends the job (then --resume), never a silent restart
        "--monitor-interval", "0.5",      # the agent notices a dead worker within half a second, stops the rest
        "--local-ranks-filter", "0",      # one process's output: every rank would print the same lines
        "--shutdown-timeout", "300",      # Ctrl-C: the workers finish their sample and checkpoint
        # SIGHUP and SIGTERM: launch() handles them; a SIGINT this process ignores (a script's background job) stays so
        "--signals-to-handle", "SIGQUIT" if ignored(signal.SIGINT) else "SIGINT,SIGQUIT",
        "-m", "medlora",
    ]


def threads_each(nproc: int, num_threads: int | None) -> int:
    """Torch threads per local process: --num_threads, else the usable cores split between the processes. More
    threads than cores works, but threads that share a core wait for each other: one line says so."""
    from ..cpu import usable_cpus

    cpus = usable_cpus()
    threads = num_threads or max(1, cpus // nproc)
    if nproc * threads > cpus:
        log(f"warning: {nproc} processes x {threads} thread{'s' * (threads > 1)} on {cpus} usable CPU "
            f"core{'s' * (cpus > 1)}: more threads than cores makes training slower, not faster")
    return threads


def launch(nproc: int, num_threads: int | None, worker_argv: list[str], resume: str | None) -> int:
    """Run ``python -m medlora <worker_argv>`` in ``nproc`` local processes through torchrun's launcher (in this
    process, which becomes torchrun's agent), ``num_threads`` torch threads each (None: ``threads_each``'s share
    of the cores). Returns the exit code; a failure is one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    terms = []  # the SIGTERMs this launcher got

    def hung_up(signum, frame):
        # torchrun's own handler for SIGHUP raises on every one, and the shell's SIGHUP follows the kernel's: the
        # second would cut short the agent's wait for the workers, which are saving a checkpoint. Here the first
        # one does what torchrun's would (the agent passes SIGHUP on to the workers) and the rest are ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        off_the_dead_terminal()
        raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGHUP!r}", sigval=signal.SIGHUP)

    def terminated(signum, frame):
        # SIGTERM (`kill`, `docker stop`, a scheduler's preemption) saves a checkpoint, as it does in one process.
        # The workers cannot take it as SIGTERM: that is how torchrun's agent stops the survivors of a dead peer, who
        # must go at once. So the agent passes it on as SIGUSR1, which a worker takes as "SIGTERM to the launcher"
        # (training/callbacks.py: Interrupt). A second SIGTERM quits without saving: it ends the workers at once.
        terms.append(signum)
        if len(terms) == 1:
            raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGTERM!r}", sigval=signal.SIGUSR1)
        import psutil

        for worker in psutil.Process().children():
            worker.send_signal(signal.SIGTERM)

    threads = threads_each(nproc, num_threads)
    _quiet_torchrun_logs()
    fd, note = tempfile.mkstemp(prefix="medlora-run-", suffix=".txt")
    os.close(fd)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHED_ENV)}
    os.environ.update({"OMP_NUM_THREADS": str(threads), LAUNCHED_ENV: note})
    previous = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGHUP, hung_up),
                                                                      (signal.SIGTERM, terminated)) if not ignored(sig)}
    log(f"training in {nproc} processes with {threads} thread{'s' * (threads > 1)} each (torch.distributed, gloo)")
    try:
        options = parse_args(torchrun_arguments(nproc))
        options.training_script_args = list(worker_argv)
        run(options)
        return 0
    except ChildFailedError as e:
        run_dir = _run_dir(resume, note)
        discarded = _discard_if_unstarted(resume, run_dir)
        return _report_failure(e.failures, nproc, run_dir, _worker_error(note), discarded)
    except SignalException as e:
        # Ctrl-C, a hang-up or a SIGTERM to this launcher. torchrun starts each worker in a session of its own, so a
        # terminal's Ctrl-C or hang-up reaches only this process; torchrun passed the signal on to the workers once
        # and waited for them: every rank finished the same sample and the last completed optimizer step was
        # checkpointed (rank 0 said so above), unless a second SIGTERM ended them at once
        sig = signal.SIGTERM if e.sigval == signal.SIGUSR1 else e.sigval
        lead = "\n" if len(terms) > 1 else ""  # a worker ended at once left its progress bar mid-line
        run_dir = _run_dir(resume, note)
        hint = resume_hint(run_dir, _discard_if_unstarted(resume, run_dir))
        print(f"{lead}medlora: stopped by {sig.name}. {hint}", file=sys.stderr, flush=True)
        return 128 + int(sig)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) in (hung_up, terminated):  # after a hang-up SIGHUP stays ignored
                signal.signal(sig, handler)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Path(note).unlink(missing_ok=True)
        Path(note + ".errors").unlink(missing_ok=True)


def tell_launcher(line: str) -> bool:
    """In a worker of `medlora train --nproc`: append ``line`` with the worker's rank to the launcher's error file
    (one write, so lines from several workers do not interleave) and return True; elsewhere False."""
    note = os.environ.get(LAUNCHED_ENV)
    if not (note and in_worker()):
        return False
    fd = os.open(note + ".errors", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{os.environ.get('RANK', '0')}\t{line.replace(chr(10), ' ')}\n".encode("utf-8", "replace"))
    finally:
        os.close(fd)
    return True


def _worker_error(note: str) -> str | None:
    """The error line a worker told the launcher (tell_launcher): rank 0's, which sees the whole run (the others
    may fail on a side effect of its error), else the first; None if none did."""
    try:
        told = [line.partition("\t") for line in Path(note + ".errors").read_text(encoding="utf-8").splitlines()]
    except OSError:
        return None
    return next((text for rank_, _, text in told if rank_ == "0"), told[0][2] if told else None)


def _run_dir(resume: str | None, note: str) -> str | None:
    """The job's run folder: the one being resumed, or the one rank 0 claimed and wrote to the note (if it got
    that far)."""
    return resume or Path(note).read_text(encoding="utf-8").strip() or None


def _discard_if_unstarted(resume: str | None, run_dir: str | None) -> bool:
    """A new run whose job stopped before its first complete checkpoint can never be resumed: what rank 0 wrote
    (and the lock its dead process left) goes, as in one process (recipe.run), so that no folder passes for a
    run and the next start can use the same --output_dir. True when it was removed."""
    if resume or not run_dir or not Path(run_dir).is_dir():
        return False
    run = RunDir(run_dir)
    if run.is_locked() or not run.discard_unstarted():
        return False
    (run.path / LOCK).unlink(missing_ok=True)
    try:
        run.path.rmdir()  # only when nothing else is in it
    except OSError:
        pass
    return True


def resume_hint(run_dir: str | None, discarded: bool = False) -> str:
    if discarded:
        return f"It stopped before the first checkpoint, so there is nothing to resume ({run_dir} removed): start " \
               "the run again"
    checkpoint = RunDir(run_dir).latest_complete_checkpoint() if run_dir else None
    if checkpoint is None:
        return f"No checkpoint was completed in {run_dir}" if run_dir else "No run folder was created"
    return (f"Resume from the last complete checkpoint ({checkpoint.name}) with: medlora train --resume "
            f"{shlex.quote(str(run_dir))} ({_nproc_choices(run_dir)})")


def _nproc_choices(run_dir: str) -> str:
    """The --nproc values that can continue a run: those that divide its gradient_accumulation_steps."""
    try:
        counts = [str(n) for n in process_counts(RunDir(run_dir).read_config().gradient_accumulation_steps)]
    except Exception:  # noqa: BLE001 - a hint only: an unreadable config is reported when the resume reads it
        return "--nproc: any that divides the run's gradient_accumulation_steps"
    return "--nproc " + (f"{', '.join(counts[:-1])} or {counts[-1]}" if len(counts) > 1 else counts[0])


def _report_failure(failures: dict, nproc: int, run_dir: str | None, worker_error: str | None = None,
                    discarded: bool = False) -> int:
    """One line for the whole job: the process that failed first and why, and how to go on."""
    codes = {f.exitcode for f in failures.values()}
    if codes <= {2, QUIET_EXIT, -signal.SIGTERM}:  # a worker stopped on an error and told this launcher its line
        # on a line of its own: rank 0's progress bar may have left the cursor mid-line
        print("\n" + (worker_error or "medlora: error: a training process stopped on an error (run with --nproc 1 "
                                     "to see it)"), file=sys.stderr, flush=True)
        return 2
    saved = {129, 130, 143}  # a hang-up, Ctrl-C or SIGTERM the workers got: they saved a checkpoint and said so
    if codes & saved and codes <= saved | {QUIET_EXIT, -signal.SIGTERM}:
        return max(codes & saved)
    # the root cause: a process killed from outside (SIGKILL: the OOM killer, kill -9) or one that crashed
    culprits = [(r, f) for r, f in failures.items() if f.exitcode not in saved | {QUIET_EXIT, -signal.SIGTERM, 2}]
    rank_, failure = min(culprits or failures.items(), key=lambda rf: rf[1].timestamp)
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode} (run with --nproc 1 to see its error)")
    hint = resume_hint(run_dir, discarded)
    others = "the other process was" if nproc == 2 else f"the other {nproc - 1} processes were"
    # on a line of its own: rank 0's progress bar may have left the cursor mid-line
    print(f"\nmedlora: error: training process rank {rank_} (pid {failure.pid}) {how}; {others} stopped. {hint}",
          file=sys.stderr, flush=True)
    return 1


def worker_exit(code: int, from_command_line: bool) -> int:
    """``code``; but a worker of a distributed run started from the command line exits here, at once, with it.

    Leaving the normal way frees the trainer's DistributedDataParallel (held by the exception's traceback, or by
    reference cycles until a later garbage collection) after the process group was destroyed, so that freeing it
    drops gloo's last reference: gloo's destructor then waits for its worker thread while holding the GIL, and a
    worker thread still freeing a finished all-gather's tensors waits for the GIL. Both wait forever (seen after
    Ctrl-C with --nproc 2 on one CPU, 2 runs in 3). Everything medlora writes is closed by now (atomic renames and
    the run folder's lock released); stdout and stderr are flushed first."""
    if from_command_line and in_worker() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
