"""Trainer callbacks: a progress bar that counts samples, checkpoint completeness markers, and Ctrl-C (or
SIGTERM, or SIGHUP) as "save a checkpoint and stop"."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..errors import ignored, log, off_the_dead_terminal
from ..progress import bar
from ..rundir import RunDir, is_complete, mark_complete


class Interrupt:
    """First Ctrl-C (or SIGTERM: a `kill`, `docker stop`, `systemctl stop`, a batch scheduler's preemption; or
    SIGHUP: the terminal closed, an SSH session dropped): finish the current sample, save a checkpoint, stop. A
    second Ctrl-C or SIGTERM: stop at once. A second SIGHUP is ignored (the shell sends its jobs one on top of the
    kernel's, and nobody is left at the terminal to mean it).

    ``terminate=False`` leaves SIGTERM alone and takes SIGUSR1 for it. A torchrun worker does: its launcher sends
    SIGTERM to the survivors when a process dies, and they must go at once, not after more samples that could only
    fail at the next all-reduce. `medlora train --nproc`'s launcher passes a Ctrl-C or a hang-up on to its workers as
    it came, and a SIGTERM as SIGUSR1 (training/launcher.py); they save a checkpoint (training/distributed.py)."""

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP (the terminal closed)",
             signal.SIGUSR1: "SIGTERM"}

    def __init__(self, terminate: bool = True):
        self.requested = False
        self.signum: int | None = None  # the signal that asked, once one did
        self._signals = (signal.SIGINT, signal.SIGHUP) + ((signal.SIGTERM,) if terminate else (signal.SIGUSR1,))
        self._previous: dict = {}
        self.hung_up = False

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention (SIGUSR1 stands for the launcher's SIGTERM); 130 on a
        rank that stopped because another one was asked to."""
        signum = signal.SIGTERM if self.signum == signal.SIGUSR1 else (self.signum or signal.SIGINT)
        return 128 + int(signum)

    def _handler(self, signum, frame):
        if signum == signal.SIGHUP:
            self.hung_up = True
            off_the_dead_terminal()
        if self.requested:  # a hang-up after the first signal (the shell and the kernel both send one): the save
            return  # goes on, and no second SIGHUP ends it
        self.requested, self.signum = True, signum
        self._restore(keep=signal.SIGHUP)  # the next Ctrl-C or SIGTERM takes the usual way out
        again = "press Ctrl-C again" if signum == signal.SIGINT else "SIGTERM or Ctrl-C again"
        log(f"{self.NAMES[signum]}: saving a checkpoint after the current sample ({again} to quit without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self._signals if not ignored(sig)}
        return self

    def __exit__(self, *exc):
        if self._previous and threading.current_thread() is threading.main_thread():
            self._restore()
            if self.hung_up:  # the checkpoint is written after this block: no later hang-up may cut it short
                signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _restore(self, keep: int | None = None):
        for sig, previous in self._previous.items():
            if sig != keep:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def rng_snapshot() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def rng_restore(snapshot: dict | None) -> None:
    if snapshot:
        random.setstate(snapshot["python"])
        np.random.set_state(snapshot["numpy"])
        torch.random.set_rng_state(snapshot["cpu"])


class CheckpointGuard(TrainerCallback):
    """Marks checkpoints complete, saves one at the end, and turns Ctrl-C into save-and-stop."""

    def __init__(self, interrupt: Interrupt):
        self.interrupt = interrupt
        self.rng = None  # RNG states at the last optimizer step (what a checkpoint of that step must hold)

    def on_step_end(self, args, state, control, **kw):
        self.rng = rng_snapshot()
        if state.global_step >= state.max_steps:
            control.should_save = True
        if self.interrupt.requested:
            control.should_save = control.should_training_stop = True

    def on_substep_end(self, args, state, control, **kw):
        if self.interrupt.requested:  # mid-accumulation: stop now; the recipe saves the last completed step
            control.should_training_stop = True

    def on_save(self, args, state, control, **kw):
        mark_complete(RunDir(args.output_dir).checkpoint(state.global_step))

    def save_interrupted(self, trainer) -> Path:
        """Checkpoint the last completed optimizer step after a Ctrl-C mid-accumulation. The weights,
        optimizer and scheduler have not moved since that step; the RNG has, so it is rewound first."""
        ckpt = RunDir(trainer.args.output_dir).checkpoint(trainer.state.global_step)
        if not self.saved(ckpt):
            rng_restore(self.rng)
            trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own checkpoint writer
            self.on_save(trainer.args, trainer.state, trainer.control)
        return ckpt

    def saved(self, ckpt: Path) -> bool:
        return is_complete(ckpt)


class FiniteLoss(TrainerCallback):
    """Stops training at the first optimizer step whose loss, or whose updated LoRA weights, are not finite
    (NaN or infinity), before that step is checkpointed: the newest checkpoint stays a good one."""

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value = None

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        loss = (logs or {}).get("loss")
        weights_ok = model is None or all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
        if (loss is not None and not math.isfinite(loss)) or not weights_ok:
            self.bad_step, self.bad_value = state.global_step, loss if loss is not None else "weights"
            control.should_save = False
            control.should_training_stop = True
        return control


class SampleProgress(TrainerCallback):
    """Trainer's progress bar counts optimizer steps, which are 16 samples (minutes) apart on a CPU.
    This one counts samples, with ETA, tokens/s and the latest loss, and shows evaluation progress."""

    def __init__(self):
        self.bar = self.eval_bar = None

    def on_train_begin(self, args, state, control, **kw):
        # samples of every process (each runs its share of an optimizer step's micro-batches); a resumed run starts
        # the bar at the samples already trained, so that its ETA counts only what is left
        self.per_tick = args.per_device_train_batch_size * max(args.world_size, 1)
        per_step = args.gradient_accumulation_steps * self.per_tick
        self.bar = bar(total=state.max_steps * per_step, initial=state.global_step * per_step, unit="sample",
                       desc="training")
        self.start, self.tokens0 = time.time(), state.num_input_tokens_seen

    def _tick(self, state):
        self.bar.update(self.per_tick)
        elapsed = max(time.time() - self.start, 1e-9)
        tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        post = {"step": f"{state.global_step}/{state.max_steps}", "tok/s": f"{tps:.1f}"}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def on_substep_end(self, args, state, control, **kw):
        self._tick(state)

    def on_step_end(self, args, state, control, **kw):
        self._tick(state)

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def close(self) -> None:
        """Also when training ends in an error, which the Trainer tells no callback of: the error's line then
        starts on a line of its own and stays the last one, instead of the open bar being drawn again at exit."""
        for b in (self.eval_bar, self.bar):
            if b is not None:
                b.close()
        self.bar = self.eval_bar = None

    # evaluation: one forward pass per eval row, minutes on a CPU, so it gets a bar too
    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        if self.eval_bar is None:
            self.eval_bar = bar(total=len(eval_dataloader), unit="row", desc="evaluating", leave=False)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kw):
        if self.eval_bar is not None:
            self.eval_bar.close()
        self.eval_bar = None
