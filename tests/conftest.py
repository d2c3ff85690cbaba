"""Shared fixtures: the real bundled model (SmolLM2-135M-Instruct) and tokenizer, the bundled sample,
and the real MedQuAD file when it is present."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the suite in one pytest-xdist worker per CPU (`-n $(nproc)`). Each worker is
# pinned to its own CPU before torch loads, and the processes it starts inherit the pin: every thread count
# medlora and llama.cpp choose follows the affinity mask (medlora.cpu.usable_cpus), so two workers never fight
# over a core (llama.cpp's threads spin while they wait: one extra thread on a busy core costs it 50x).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
if WORKER and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cpus[int(WORKER[2:]) % len(_cpus)]})
    os.environ["OMP_NUM_THREADS"] = "1"

# The signal tests play a terminal's Ctrl-C and hang-up. A suite started as a shell script's background job (or under
# nohup) would pass SIGINT (or SIGHUP) on ignored to every process it starts, and medlora keeps an inherited ignore
# (medlora.errors.ignored): give the processes the tests start the dispositions a terminal gives them.
for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL),
                       (signal.SIGTERM, signal.SIG_DFL)):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, _default)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "data" / "sample_medical_qa.csv"
MEDQUAD_CSV = ROOT.parent / "shared" / "data" / "medquad.csv"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from medlora.model import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from medlora.model import load_tokenizer

    return load_tokenizer(str(smol_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_dir) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's real tokenizer and chat template, for
    tests of plumbing (run folders, resume, CLI) where what a pretrained model knows is not being tested."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, sample_csv) -> Path:
    """A finished 2-step run of the tiny model (plumbing tests: guard paths, damaged folders, resume paths)."""
    from medlora.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_steps", "2", "--gradient_accumulation_steps", "1", "--max_eval_samples", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    assert SAMPLE_CSV.is_file(), "the bundled sample CSV is part of the repository"
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def medquad_csv() -> Path:
    if not MEDQUAD_CSV.is_file():
        pytest.skip(f"{MEDQUAD_CSV} not present")
    return MEDQUAD_CSV


class Terminal:
    """A pty that is the controlling terminal of a command started on it, as a login shell's job's is: the command
    leads a session of its own, with the pty as stdin, stdout and stderr. ``read`` does what a terminal window
    does; ``hang_up`` closes the window (the kernel sends SIGHUP to the session leader). The pty is never sized
    (0 x 0), as nobody sized it."""

    ON_TTY = ("import fcntl, os, sys, termios; os.setsid(); fd = int(sys.argv[1]); "
              "fcntl.ioctl(fd, termios.TIOCSCTTY, 0); [os.dup2(fd, i) for i in (0, 1, 2)]; os.close(fd); "
              "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")

    def __init__(self, argv: list[str], env: dict):
        import subprocess
        import sys

        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", self.ON_TTY, str(slave), *argv], pass_fds=(slave,),
                                     env=env)
        os.close(slave)
        self.seen = b""

    def read_until(self, done, timeout: float) -> None:
        """Read what the command writes until ``done()``; fails if the command ends first or ``timeout`` passes."""
        import select
        import time

        deadline = time.time() + timeout
        while not done():
            assert self.proc.poll() is None and time.time() < deadline, self.text()[-3000:]
            if select.select([self.master], [], [], 0.05)[0]:
                self.seen += os.read(self.master, 65536)
        if select.select([self.master], [], [], 0.01)[0]:  # what it wrote so far
            self.seen += os.read(self.master, 65536)

    def read_to_end(self) -> str:
        """Everything the command wrote, once it has ended."""
        import select

        while select.select([self.master], [], [], 1)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process that had the pty open has closed it
                break
            if not chunk:
                break
            self.seen += chunk
        return self.text()

    def hang_up(self) -> None:
        self.close()

    def close(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def text(self) -> str:
        return self.seen.decode(errors="replace")


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_csv, smol_dir):
    """One real run of the bundled model on the bundled sample, shared by the slow tests: 12 steps at lr 1e-3 and
    6 eval rows keep it short (measured: eval loss 2.10 -> 1.97), merged. Under xdist the first worker to need it
    trains it in the directory all workers share, under a file lock (pytest-xdist's documented recipe), and the
    others wait for it instead of training their own."""
    from filelock import FileLock

    from medlora.cli import main

    def train(out: Path) -> None:
        code = main(["train", "--data", str(sample_csv), "--model", "smollm2-135m", "--output_dir", str(out),
                     "--max_steps", "12", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
                     "--test_size", "0.04", "--max_eval_samples", "0", "--merge_model"])
        assert code == 0

    if not WORKER:
        out = tmp_path_factory.mktemp("runs") / "sample"
        train(out)
        return out
    shared = tmp_path_factory.getbasetemp().parent / "shared-runs"  # the workers' common parent
    shared.mkdir(exist_ok=True)
    out, done = shared / "sample", shared / "sample.done"
    with FileLock(str(shared / "sample.lock")):
        if not done.is_file():
            if out.exists():  # a worker that failed half-way: start again
                shutil.rmtree(out)
            train(out)
            done.touch()
    return out


@pytest.fixture(scope="session", autouse=True)
def libraries_frozen_for_the_garbage_collector():
    """The libraries almost every test loads, imported once and moved out of the garbage collector's sight, as
    `medlora train` does from the command line (allocator.freeze_loaded_objects): each full collection (one in
    every training run, by medlora and by accelerate) then skips their ~400,000 objects, 0.3 s a collection."""
    import importlib

    from medlora.allocator import freeze_loaded_objects

    for name in ("torch", "transformers", "peft", "medlora.training.recipe"):
        importlib.import_module(name)
    freeze_loaded_objects()


def pytest_configure(config):
    """Under xdist, the bundled model is converted to its cached HF folder once, here, before the workers start."""
    if getattr(config.option, "numprocesses", None) and not WORKER:
        from medlora.model import smollm2_folder

        smollm2_folder()
