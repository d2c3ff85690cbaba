"""Several CPU processes, on one machine or several, on PyTorch's own engine: ``torch.distributed`` with the gloo
backend, launched by torchrun (``torch.distributed.run``). Nothing here moves tensors between processes by hand:
the Trainer wraps the model in DistributedDataParallel (through accelerate), which all-reduces the LoRA gradients.

    medlora train --nproc N ...        ``launcher.launch``: torchrun's launcher in this process, N workers
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

import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import check_divides
from ..cpu import usable_cpus
from ..errors import MedloraError
from ..files import crash_point, wait_point
from .callbacks import CheckpointGuard
from .launcher import LAUNCHED_ENV, QUIET_EXIT, in_worker, resume_hint

# Collectives wait this long for a slow peer before failing. It is not what ends a job whose process died: a dead
# process's sockets close and gloo fails the survivors' next collective at once, and torchrun's agent stops the
# other local workers within its monitor interval. It only bounds a peer that hangs (or a machine that vanishes
# without closing its connections). The long single-rank phases are not collectives: rank 0 writes the final
# artifacts (adapter, merge) after the last collective, while the other ranks have already finished.
TIMEOUT = timedelta(minutes=30)


# ---------------------------------------------------------------- where this process stands

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


# Options that may differ between processes: where each machine finds its files and how many cores it uses.
# Every other one decides what the job computes, and a difference would go unnoticed (a learning rate, a seed that
# splits the data differently), hang the job until gloo's 30-minute timeout (max_steps, gradient accumulation) or
# end it in a traceback (lora_r).
LOCAL_OPTIONS = {"output_dir", "data", "model", "num_threads", "dataloader_num_workers", "nproc"}


def check_same_settings(settings: dict) -> None:
    """Every process was started with the same options (those outside LOCAL_OPTIONS), or every process stops with
    the same one line naming the options that differ. The machines of a multi-machine job are started one by one,
    by hand: this is where a flag given on one of them and not the other is caught."""
    if not active():
        return
    mine = {k: v for k, v in settings.items() if k not in LOCAL_OPTIONS}
    every = [None] * world_size()
    dist.all_gather_object(every, mine)
    differ = []
    for key in sorted(set().union(*every)):
        values = [s.get(key) for s in every]
        if any(v != values[0] for v in values):
            odd = next(r for r, v in enumerate(values) if v != values[0])
            differ.append(f"{key} (rank 0: {values[0]!r}, rank {odd}: {values[odd]!r})")
    if differ:
        raise MedloraError("the training processes were started with different options: " + "; ".join(differ)
                           + ". Start every machine with the same options")


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
              f"the job stops. {resume_hint(str(run_dir))}", file=sys.stderr, flush=True)
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
        # tests/test_distributed.py: a rank waits here for the signal the test sends it
        wait_point(f"substep:{state.global_step}:rank{rank()}", lambda: self.interrupt.requested)
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
