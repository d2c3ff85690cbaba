"""The run folder: the one module that knows its file names and how each is written.

    RUN/
      config.yaml          the resolved TrainConfig (``medlora train --config RUN/config.yaml`` reruns it)
      run_info.json        data checksum, row counts, LoRA targets, versions, the speed plan and why
      base_eval.json       the base model's eval loss, measured before training
      checkpoint-N/        resumable Trainer checkpoints; complete only once medlora_complete.json exists. Each
                           holds a PEFT adapter: chat, eval, serve, export and merge take RUN/checkpoint-N for the
                           run at that step (its outputs are named RUN-checkpoint-N, eval-checkpoint-N/, ...)
      adapter/             the PEFT adapter + tokenizer (written atomically)
      trainer_state.json   the Trainer's log history
      loss_curve.png       training loss per optimizer step
      merged_model/        optional: base weights with the adapter folded in (written atomically)
      metrics.json         written last: its presence means the run finished
      eval/, eval-NAME/    reports written by ``medlora eval``
      export/              ``medlora export``: NAME-QUANT.gguf for llama.cpp and an Ollama Modelfile

Every JSON file and folder is written under a temporary name and renamed into place (files.py), so a reader (or a
resume after a crash) never sees a half-written artifact.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from datetime import datetime
from pathlib import Path

from .errors import MedloraError, log
from .files import atomic_dir, crash_point, read_json, write_json_atomic

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.json"
BASE_EVAL = "base_eval.json"
ADAPTER = "adapter"
MERGED = "merged_model"
TRAINER_STATE = "trainer_state.json"
LOSS_CURVE = "loss_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE = "medlora_complete.json"
LOCK = ".medlora-lock"  # pid of the process training in the folder; a dead process's lock is taken over
EVAL = "eval"
REPORT_MD, REPORT_HTML = "report.md", "report.html"  # in eval/, beside its own metrics.json
EXPORT = "export"
MODELFILE = "Modelfile"  # Ollama's, in export/ beside the .gguf


# ---------------------------------------------------------------- choosing a new run's folder

def unique_output_dir(path: str | Path) -> Path:
    """The path itself if absent or empty, else a timestamped sibling (never overwrite a run)."""
    path = Path(path)
    if path.name in ("", ".", ".."):  # "." or "..": name the folder itself, so a sibling can be named after it
        path = path.resolve()
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    if not path.name:
        raise MedloraError(f"cannot start a run in {path}: it is not empty; give --output_dir a new folder name")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{stamp}-{n}")
    return candidate


def not_a_folder(path: Path) -> MedloraError:
    """The error for a path given where a folder belongs: missing, or a file (a .gguf, a CSV)."""
    return MedloraError(f"{path}: a file, not a folder; give a run folder" if path.exists() else f"{path}: no such folder")


def claim_output_dir(path: str | Path) -> "RunDir":
    """Choose the run folder for a new run and lock it at once, before any slow work: ``path`` itself when it
    is absent or empty, else a timestamped sibling. Two runs started together never share a folder: the
    loser of the lock race moves on to the next candidate."""
    for _ in range(50):
        run = RunDir(unique_output_dir(path))
        created = None if run.path.exists() else run.path
        while created is not None and not created.parent.exists():
            created = created.parent
        run.path.mkdir(parents=True, exist_ok=True)
        if run.try_lock():
            run.created_root = created
            return run
    raise MedloraError(f"could not claim a run folder next to {path}: too many runs are starting there")


HOST = socket.gethostname()


def _lock_holder(lock: Path) -> tuple[int, str]:
    """(pid, host) of a lock file: "PID HOST"; a lock from before hosts were written is this host's. (0, HOST) when
    it cannot be read (gone, or half written)."""
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
        return int(pid or 0), host or HOST
    except (OSError, ValueError):
        return 0, HOST


def _holder_alive(pid: int, host: str) -> bool:
    """Whether the lock's process lives. A process on another machine (a run folder on a shared filesystem) cannot
    be checked from here: it counts as alive, so that a --resume started elsewhere never takes over a running job."""
    return host != HOST or (pid != 0 and _pid_alive(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# ---------------------------------------------------------------- checkpoints

def mark_complete(checkpoint: Path) -> None:
    """Record every file's size once the Trainer has finished writing the checkpoint."""
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != COMPLETE}
    crash_point(f"checkpoint:{checkpoint.name}")
    write_json_atomic(checkpoint / COMPLETE, {"files": sizes})


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint counts only if its marker exists and every listed file still has its recorded size
    (a process killed while writing leaves no marker, or files that no longer match)."""
    try:
        sizes = json.loads((checkpoint / COMPLETE).read_text())["files"]
        return bool(sizes) and all((checkpoint / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()


# ---------------------------------------------------------------- the run folder

class RunDir:
    """A medlora run folder. ``RunDir(path)`` names one; ``RunDir.open`` checks that it is one.

    ``RunDir("RUN/checkpoint-N")`` is the run RUN as it was at that checkpoint: its adapter is the checkpoint's (a
    PEFT adapter with the tokenizer, written by the Trainer), everything else (configuration, data, system prompt)
    is RUN's, and what is written for it carries the checkpoint's name: RUN/export/RUN-checkpoint-N-QUANT.gguf,
    RUN/eval-checkpoint-N/, RUN/merged_model-checkpoint-N/. So a run can be tried while it trains, or an earlier
    step kept when a later one is worse."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.checkpoint_used: Path | None = None  # RUN/checkpoint-N when the run is taken at that checkpoint
        if is_checkpoint_name(path.name) and (path.parent / CONFIG).is_file():
            self.checkpoint_used, path = path, path.parent
        self.path = path
        self.created_root: Path | None = None  # the topmost folder claim_output_dir created, if any

    def __repr__(self) -> str:
        return f"RunDir({str(self)!r})"

    def __str__(self) -> str:
        return str(self.checkpoint_used or self.path)

    @property
    def shell(self) -> str:
        """The folder as a command line takes it (quoted where it has spaces or quotes): for the commands that
        error messages tell the user to run."""
        return shlex.quote(str(self))

    # -- what is in it
    config_file = property(lambda self: self.path / CONFIG)
    info_file = property(lambda self: self.path / RUN_INFO)
    metrics_file = property(lambda self: self.path / METRICS)
    base_eval_file = property(lambda self: self.path / BASE_EVAL)
    adapter_dir = property(lambda self: self.checkpoint_used or self.path / ADAPTER)
    merged_dir = property(lambda self: self.path / (MERGED + self.tag))
    loss_curve = property(lambda self: self.path / LOSS_CURVE)
    export_dir = property(lambda self: self.path / EXPORT)
    tag = property(lambda self: f"-{self.checkpoint_used.name}" if self.checkpoint_used else "")  # in output names

    @property
    def name(self) -> str:
        """What names its exports and its model when served: the run folder's name (-checkpoint-N)."""
        return self.path.resolve().name + self.tag

    def has_adapter(self) -> bool:
        if self.checkpoint_used is not None and not is_complete(self.checkpoint_used):
            return False
        return (self.adapter_dir / "adapter_config.json").is_file()

    def is_finished_run(self) -> bool:
        """An adapter and its configuration: what chat, eval, merge and export need."""
        return self.has_adapter() and self.config_file.is_file()

    @staticmethod
    def is_merged_model(path: Path) -> bool:
        """A merged_model/ folder inside a run (it brings the run's system prompt along), or a checkpoint's
        merged_model-checkpoint-N/."""
        tagged = path.name.startswith(MERGED + "-") and is_checkpoint_name(path.name[len(MERGED) + 1:])
        return (path.name == MERGED or tagged) and (path.parent / CONFIG).is_file()

    @classmethod
    def home(cls, path: Path) -> "RunDir":
        """The run a folder speaks for: a merged model's run (at its checkpoint, for merged_model-checkpoint-N),
        else the folder itself."""
        if not cls.is_merged_model(path):
            return cls(path)
        return cls(path.parent if path.name == MERGED else path.parent / path.name[len(MERGED) + 1:])

    @classmethod
    def open(cls, path: str | Path, finished: bool = True) -> "RunDir":
        """The run folder at ``path``; one clear error for anything else. ``finished=False`` accepts a run
        that has a configuration but no adapter yet (one to resume)."""
        run = cls(path)
        if not Path(path).is_dir():
            raise not_a_folder(Path(path))
        if not finished and run.checkpoint_used is not None:
            raise MedloraError(f"{run} is a checkpoint: give its run folder (medlora train --resume "
                               f"{shlex.quote(str(run.path))}), which goes on from its newest complete checkpoint")
        if not (run.is_finished_run() if finished else run.config_file.is_file()):
            raise run.not_a_run()
        return run

    def checkpoint_gone(self) -> bool:
        """Taken at a checkpoint (RUN/checkpoint-N) that is no longer there, or no longer whole."""
        return self.checkpoint_used is not None and not self.has_adapter()

    def checkpoint_deleted(self) -> MedloraError:
        """The one line for a checkpoint deleted while it was being loaded (a training run's rotation)."""
        newest = self.latest_complete_checkpoint(quiet=True)
        instead = f"; its newest complete checkpoint is {newest}" if newest else ""
        return MedloraError(f"{self}: this checkpoint was deleted while it loaded (a run that is training keeps only "
                            f"its newest checkpoints and deletes older ones as it saves){instead}")

    def not_a_run(self, extra: str = "") -> MedloraError:
        """The one wording of "this folder is not a run" (``extra``: what else it is not), or of a run that has no
        adapter yet, or of a checkpoint that cannot be used."""
        if self.checkpoint_used is not None:
            return MedloraError(f"{self}: an incomplete checkpoint (it was being written, or its writer was stopped "
                                f"while writing it); use another one")
        if self.config_file.is_file() and not self.has_adapter():
            last = self.latest_complete_checkpoint(quiet=True)
            finished = self.checkpoint_used is None and self.metrics_file.is_file()
            if finished:  # it had an adapter: deleted or damaged since
                return MedloraError(f"{self}: its {ADAPTER}/ folder is missing or incomplete (deleted since the run "
                                    "finished?)" + (f"; its newest complete checkpoint can be used: give {last}"
                                                    if last else ""))
            if self.is_locked():
                state = "it is still training" + ("" if last else "; no checkpoint is complete yet")
            elif last:
                state = f"it stopped before its end: medlora train --resume {self.shell} finishes it"
            else:
                state = "it stopped before its first checkpoint: start it again"
            use = f"; its newest complete checkpoint can be used meanwhile: give {last} instead of {self}"
            return MedloraError(f"{self}: this run has no adapter yet ({state}){use if last else ''}")
        # RUN/adapter, RUN/export, RUN/eval/ ...: the user meant the run. ("." and "/" are their own parent, whose
        # config.yaml, being their own, is absent here: the branch above takes a folder that has one.)
        parent = self.path.parent
        if (parent / CONFIG).is_file() and (parent / RUN_INFO).is_file():
            return MedloraError(f"{self.path}: a folder inside the run folder {parent}; give the run folder ({parent})")
        return MedloraError(f"{self.path}: not a medlora run folder (no {ADAPTER}/ with {CONFIG}){extra}")

    # -- configuration and JSON files
    def read_config(self):
        from .config import build_config

        return build_config(yaml_path=str(self.config_file))

    def read_config_raw(self) -> dict:
        from .config import load_yaml

        return load_yaml(self.config_file)

    def write_config(self, cfg) -> None:
        from .config import save_config

        tmp = self.config_file.with_name(CONFIG + ".tmp")
        save_config(cfg, tmp)
        os.replace(tmp, self.config_file)

    def read_info(self) -> dict:
        return read_json(self.info_file)

    def data_path(self, cfg) -> Path:
        """The training CSV: config.yaml's path (as given), else run_info.json's absolute one."""
        info = self.read_info()
        for candidate in (cfg.data, info.get("data")):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        raise MedloraError(f"the run's data file {cfg.data} is not found" if cfg.data else
                           f"{CONFIG} names no data file")

    def write_info(self, info: dict) -> None:
        write_json_atomic(self.info_file, info)

    def read_metrics(self) -> dict:
        return read_json(self.metrics_file)

    def write_metrics(self, metrics: dict) -> None:
        """Last file of a training run: its presence means the run finished."""
        write_json_atomic(self.metrics_file, metrics)

    def read_base_eval(self) -> dict | None:
        return read_json(self.base_eval_file) or None

    def write_base_eval(self, base: dict) -> None:
        write_json_atomic(self.base_eval_file, base)

    def trainer_state_file(self, checkpoint: Path | None = None) -> Path:
        return (checkpoint or self.path) / TRAINER_STATE

    def trainer_state(self, checkpoint: Path | None = None) -> dict:
        return read_json(self.trainer_state_file(checkpoint))

    def system_prompt(self) -> str | None:
        return self.read_config_raw().get("system_prompt") if self.config_file.is_file() else None

    # -- one training process at a time
    def try_lock(self) -> bool:
        """Take the folder's lock (exclusive create); False when a live process holds it. A lock left by a
        process that died (SIGKILL, power loss) is taken over."""
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = _lock_holder(lock)
                if (pid, host) == (os.getpid(), HOST):
                    return True
                if pid and _holder_alive(pid, host):
                    return False
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {HOST}")
            return True
        return False

    def is_locked(self) -> bool:
        """Another live process holds the folder's lock (it is training)."""
        pid, host = _lock_holder(self.path / LOCK)
        return pid != 0 and (pid, host) != (os.getpid(), HOST) and _holder_alive(pid, host)

    def lock_or_fail(self) -> None:
        if not self.try_lock():
            pid, host = _lock_holder(self.path / LOCK)
            if host != HOST:
                raise MedloraError(f"{self.path}: a medlora process on {host} (pid {pid}) is training in this folder; "
                                   f"wait for it or stop it first (if that machine went down, delete "
                                   f"{self.path / LOCK})")
            raise MedloraError(f"{self.path}: another medlora process is training in this folder "
                               f"(pid {pid}); wait for it or stop it first")

    def unlock(self, remove_if_unused: bool = False) -> None:
        """Release the lock; ``remove_if_unused``: also remove the folder if the lock was all it held (a run
        that failed before it wrote anything leaves nothing behind)."""
        lock = self.path / LOCK
        try:
            if _lock_holder(lock) == (os.getpid(), HOST):
                lock.unlink()
            else:
                return
        except OSError:
            return
        if remove_if_unused and self.created_root is not None:
            folder = self.path
            while True:
                try:
                    folder.rmdir()  # only succeeds when empty
                except OSError:
                    return
                if folder == self.created_root:
                    return
                folder = folder.parent

    def discard_unstarted(self) -> bool:
        """A new run that stopped before its first complete checkpoint (and so can never be resumed): remove
        what it wrote, so that the folder does not pass for a run. False (nothing removed) once a checkpoint is
        complete or the run finished."""
        if self.metrics_file.exists() or self.latest_complete_checkpoint(quiet=True) is not None:
            return False
        for name in (CONFIG, RUN_INFO, BASE_EVAL, TRAINER_STATE, LOSS_CURVE):
            (self.path / name).unlink(missing_ok=True)
        for partial in self.path.glob(CHECKPOINT_PREFIX + "*"):  # incomplete ones, none of them usable
            shutil.rmtree(partial, ignore_errors=True)
        return True

    # -- checkpoints
    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}{step}"

    def checkpoints(self) -> list[Path]:
        """checkpoint-N folders, newest first."""
        found = [p for p in self.path.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and is_checkpoint_name(p.name)]
        return sorted(found, key=checkpoint_step, reverse=True)

    def latest_complete_checkpoint(self, quiet: bool = False) -> Path | None:
        for ckpt in self.checkpoints():
            if is_complete(ckpt):
                return ckpt
            if not quiet:
                log(f"skipping incomplete checkpoint {ckpt.name} (the process was stopped while writing it)")
        return None

    def remove_checkpoints_after(self, checkpoint: Path | None) -> None:
        """Newer but incomplete checkpoints (every one, when ``checkpoint`` is None): useless, in the way of the
        new saves, and holding disk space."""
        for stale in self.checkpoints():
            if checkpoint is None or checkpoint_step(stale) > checkpoint_step(checkpoint):
                shutil.rmtree(stale)

    # -- artifacts
    def write_adapter(self, model, tokenizer) -> Path:
        return atomic_dir(self.adapter_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))

    def eval_dir(self, data: str | None = None) -> Path:
        """Where ``medlora eval`` writes: eval/ for the run's own split, eval-NAME/ for another CSV (and
        eval-checkpoint-N/, eval-checkpoint-N-NAME/ for a checkpoint)."""
        return self.path / (EVAL + self.tag + ("" if data is None else f"-{Path(data).stem}"))
