"""Several CPU processes, on one machine or several, on PyTorch's own engine: ``torch.distributed`` with the gloo
backend, launched by torchrun (``torch.distributed.run``). Nothing here moves tensors between processes by hand:
the Trainer wraps the model in DistributedDataParallel (through accelerate), which all-reduces the LoRA gradients.

    medlora train --nproc N ...        this module's ``launch``: torchrun's launcher in this process, N workers
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m medlora train ...
                                       the same workers across machines, started by the user's torchrun

A worker is an ordinary ``medlora train`` that finds torchrun's RANK/WORLD_SIZE in its environment. Who does what:

    every rank   reads the CSV, loads the model, trains on its own shard of every optimizer step's samples (the
                 sampler's order is the same seeded permutation as one process; rank r takes micro-batches r, r+W,
                 ...), evaluates its shard of the eval rows (the Trainer gathers the losses)
    rank 0       claims and locks the run folder and broadcasts its name, writes config.yaml, run_info.json,
                 base_eval.json, checkpoints, the adapter, the loss curve and metrics.json
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import check_divides
from ..cpu import usable_cpus
from ..errors import log, off_the_dead_terminal
from ..rundir import RunDir, crash_point
from .callbacks import CheckpointGuard

# Collectives wait this long for a slow peer before failing. It is not what ends a job whose process died: a dead
# process's sockets close and gloo fails the survivors' next collective at once, and torchrun's agent stops the
# other local workers within its monitor interval. It only bounds a peer that hangs (or a machine that vanishes
# without closing its connections). The long single-rank phases are not collectives: rank 0 writes the final
# artifacts (adapter, merge) after the last collective, while the other ranks have already finished.
TIMEOUT = timedelta(minutes=30)
# Set by ``launch`` in its workers: the launcher reports a lost peer in one line, so the workers stay quiet, and
# rank 0 writes the run folder's path to this file so that the line can name it.
LAUNCHED_ENV = "MEDLORA_DIST_RUN_NOTE"
QUIET_EXIT = 3  # a worker whose peer died: the launcher says what happened


# ---------------------------------------------------------------- where this process stands

def in_worker() -> bool:
    """Started by torchrun (or accelerate launch): the launcher's environment is there."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1)) if in_worker() else 1


def rank() -> int:
    return int(os.environ.get("RANK", 0)) if in_worker() else 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if in_worker() else 1


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def threads_per_process(num_threads: int | None) -> int:
    """The machine's cores split between the processes on it (--num_threads wins): two processes each using every
    core would fight over them and run slower than one."""
    return num_threads or max(1, usable_cpus() // local_world_size())


def setup(num_threads: int | None, gradient_accumulation_steps: int) -> bool:
    """In a torchrun worker: join the gloo process group and take this process's share of the cores. Returns
    whether training is distributed. A no-op in an ordinary process."""
    if world_size() <= 1:
        return False
    check_divides(gradient_accumulation_steps, world_size())
    threads = threads_per_process(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # accelerate would otherwise pick its own split
    torch.set_num_threads(threads)
    if not dist.is_initialized():
        # accelerate (inside TrainingArguments) finds this group and uses it instead of making its own
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


def note_run_dir(path: Path) -> None:
    """Rank 0 under ``medlora train --nproc``: tell the launcher where the run is (for its resume hint)."""
    note = os.environ.get(LAUNCHED_ENV)
    if note and is_main():
        Path(note).write_text(str(path), encoding="utf-8")


def is_peer_lost(error: BaseException) -> bool:
    """An error from a collective whose peer is gone (gloo reports a closed or reset connection)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "gloo", "Broken pipe"))


def peer_lost(error: BaseException, run_dir) -> None:
    """A worker whose peer died: one line (or, under medlora's launcher, which prints the line, nothing), then
    exit at once: the gloo group cannot be shut down cleanly without its peer."""
    if not os.environ.get(LAUNCHED_ENV):
        # gloo's text: "[.../pair.cc:537] Read error [HOST]:PORT: Connection reset by peer. This is typically ..."
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0]).split(". ")[0]
        first = first[:200] or type(error).__name__
        print(f"medlora: error: training process rank {rank()} lost contact with the other processes ({first}); "
              f"the job stops. {_resume_hint(str(run_dir))}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(QUIET_EXIT if os.environ.get(LAUNCHED_ENV) else 2)


# ---------------------------------------------------------------- the Trainer's side

def ddp_arguments(distributed: bool) -> dict:
    """TrainingArguments for DistributedDataParallel on CPUs (empty for one process)."""
    if not distributed:
        return {}
    return dict(
        ddp_backend="gloo",
        # Off: with LoRA every trainable weight (lora_A/lora_B of every targeted layer) takes part in every
        # forward pass, so there is nothing to find, and the search walks the autograd graph on every step. With
        # gradient checkpointing it is worse than wasted: the search runs before the recomputed forward in the
        # backward pass has used the weights, so DDP marks them unused and then sees their gradients arrive
        # ("Expected to mark a variable ready only once").
        ddp_find_unused_parameters=False,
        # The model's buffers (rotary inv_freq) are identical constants on every rank: nothing to broadcast.
        ddp_broadcast_buffers=False,
        # The answer-only loss is divided by the answer tokens of the *global* batch (gathered across ranks), and
        # multiplied by the number of processes to undo DDP's gradient averaging: the same gradient, and the same
        # logged loss, as one process accumulating every sample (AnswerOnlyTrainer.compute_loss).
        average_tokens_across_devices=True,
    )


def after_evaluate_before_train(trainer) -> None:
    """Let ``trainer.train()`` wrap the model in DDP after ``trainer.evaluate()`` has run on it.

    evaluate() on a Trainer that has not trained prepares the model with accelerate in evaluation mode, which
    marks it ``_is_accelerate_prepared``; since accelerate 1.14 (PR #3977, a guard against double wrapping)
    prepare_model() then returns a marked model as it is, so train() would run WITHOUT DistributedDataParallel:
    no gradient all-reduce, every rank training its own adapter, and nothing failing. Dropping the mark restores
    the wrap; tests/test_distributed.py checks the result equals one process's."""
    if active():
        trainer.model.__dict__.pop("_is_accelerate_prepared", None)


class DistributedCheckpointGuard(CheckpointGuard):
    """CheckpointGuard for several processes. Every decision that changes the collective schedule is agreed:
    a Ctrl-C or a hang-up (which may reach the ranks at different moments) stops all of them after the same
    sample, and the last completed optimizer step is checkpointed, as in one process; a checkpoint is marked
    complete by rank 0 only once every rank has written its part (each rank saves its own RNG state into it).

    The agreement is an all-reduce of one integer after every sample, microseconds next to a sample's seconds. It
    must not wait for the end of the optimizer step: on the 1.5B model a step is minutes per process, longer than
    the launcher waits for its workers before it kills them."""

    def on_substep_end(self, args, state, control, **kw):
        self.interrupt.requested = any_rank(self.interrupt.requested)
        super().on_substep_end(args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        crash_point(f"step:{state.global_step}:rank{rank()}")  # fault injection for tests/test_distributed.py
        self.interrupt.requested = any_rank(self.interrupt.requested)
        super().on_step_end(args, state, control, **kw)

    def on_save(self, args, state, control, **kw):
        barrier()
        if is_main():
            super().on_save(args, state, control, **kw)

    def saved(self, ckpt: Path) -> bool:
        return broadcast(super().saved(ckpt))  # rank 0's answer: it alone marks checkpoints complete


# ---------------------------------------------------------------- the launcher: medlora train --nproc N

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
        "--signals-to-handle", "SIGTERM,SIGINT,SIGQUIT",  # and SIGHUP: launch() handles it
        "-m", "medlora",
    ]


def launch(nproc: int, threads: int, worker_argv: list[str], resume: str | None) -> int:
    """Run ``python -m medlora <worker_argv>`` in ``nproc`` local processes through torchrun's launcher (in this
    process, which becomes torchrun's agent). Returns the exit code; a failure is one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    def hung_up(signum, frame):
        # torchrun's own handler for SIGHUP raises on every one, and the shell's SIGHUP follows the kernel's: the
        # second would cut short the agent's wait for the workers, which are saving a checkpoint. Here the first
        # one does what torchrun's would (the agent passes SIGHUP on to the workers) and the rest are ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        off_the_dead_terminal()
        raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGHUP!r}", sigval=signal.SIGHUP)

    _quiet_torchrun_logs()
    fd, note = tempfile.mkstemp(prefix="medlora-run-", suffix=".txt")
    os.close(fd)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHED_ENV)}
    os.environ.update({"OMP_NUM_THREADS": str(threads), LAUNCHED_ENV: note})
    previous_hup = signal.signal(signal.SIGHUP, hung_up)
    log(f"training in {nproc} processes with {threads} thread{'s' * (threads > 1)} each (torch.distributed, gloo)")
    try:
        options = parse_args(torchrun_arguments(nproc))
        options.training_script_args = list(worker_argv)
        run(options)
        return 0
    except ChildFailedError as e:
        return _report_failure(e.failures, nproc, _run_dir(resume, note))
    except SignalException as e:
        # Ctrl-C, a hang-up or a kill of this launcher. torchrun starts each worker in a session of its own, so a
        # terminal's Ctrl-C or hang-up reaches only this process; torchrun passed the signal on to the workers once
        # and waited for them: after SIGINT or SIGHUP every rank finished the same sample and the last completed
        # optimizer step was checkpointed (rank 0 said so above); SIGTERM ended them at once
        # (training/callbacks.py: Interrupt)
        lead = "" if e.sigval == signal.SIGINT else "\n"  # a worker ended by SIGTERM left its progress bar mid-line
        print(f"{lead}medlora: stopped by {e.sigval.name}. {_resume_hint(_run_dir(resume, note))}", file=sys.stderr,
              flush=True)
        return 128 + int(e.sigval)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    finally:
        if signal.getsignal(signal.SIGHUP) is hung_up:  # after a hang-up it stays ignored
            signal.signal(signal.SIGHUP, previous_hup)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Path(note).unlink(missing_ok=True)


def _run_dir(resume: str | None, note: str) -> str | None:
    """The job's run folder: the one being resumed, or the one rank 0 claimed and wrote to the note (if it got
    that far)."""
    return resume or Path(note).read_text(encoding="utf-8").strip() or None


def _resume_hint(run_dir: str | None) -> str:
    checkpoint = RunDir(run_dir).latest_complete_checkpoint() if run_dir else None
    if checkpoint is None:
        return f"No checkpoint was completed in {run_dir}" if run_dir else "No run folder was created"
    return (f"Resume from the last complete checkpoint ({checkpoint.name}) with: medlora train --resume {run_dir} "
            "(any --nproc)")


def _report_failure(failures: dict, nproc: int, run_dir: str | None) -> int:
    """One line for the whole job: the process that failed first and why, and how to go on."""
    codes = {f.exitcode for f in failures.values()}
    if codes <= {2, QUIET_EXIT, -signal.SIGTERM}:  # a worker already said what was wrong in one line
        return 2
    if codes & {129, 130} and codes <= {129, 130, QUIET_EXIT, -signal.SIGTERM}:
        return max(codes & {129, 130})  # Ctrl-C or a hang-up the workers got: they saved a checkpoint and said so
    # the root cause: a process killed from outside (SIGKILL: the OOM killer, kill -9) or one that crashed
    culprits = [(r, f) for r, f in failures.items() if f.exitcode not in (QUIET_EXIT, -signal.SIGTERM, 2, 130)]
    rank_, failure = min(culprits or failures.items(), key=lambda rf: rf[1].timestamp)
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode} (run with --nproc 1 to see its error)")
    hint = _resume_hint(run_dir)
    others = "the other process was" if nproc == 2 else f"the other {nproc - 1} processes were"
    # on a line of its own: rank 0's progress bar may have left the cursor mid-line
    print(f"\nmedlora: error: training process rank {rank_} (pid {failure.pid}) {how}; {others} stopped. {hint}",
          file=sys.stderr, flush=True)
    return 1
