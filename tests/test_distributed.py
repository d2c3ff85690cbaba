"""Training in several processes (torch.distributed, gloo, launched by torchrun) gives the run one process gives:
`--nproc 2` against one process, two torchrun "machines" on loopback, and a rank SIGKILLed mid-run whose job ends
at once and resumes in one process (steps trained by `--nproc 2`, then by one process, match the one-process run),
and Ctrl-C or a closed terminal (every rank stops after the same sample; the last completed step is checkpointed)
or SIGTERM to the launcher, each ending the job at a checkpoint to resume from.
All on the tiny random Llama, fp32, dropout 0, one thread per process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import Terminal
from medlora.cli import main

pytestmark = pytest.mark.slow
STEPS = 6


def recipe(sample_csv, model) -> list[str]:
    # gradient accumulation 4: one process accumulates 4 samples per step, two processes 2 each
    return ["--data", str(sample_csv), "--model", str(model), "--max_steps", str(STEPS),
            "--gradient_accumulation_steps", "4", "--save_steps", "2", "--lora_dropout", "0", "--precision", "fp32",
            "--max_eval_samples", "2", "--num_threads", "1", "--gradient_checkpointing", "off"]


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def losses(run: Path) -> dict[int, float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_same_run(run: Path, reference: Path) -> None:
    """Per-step losses within 1e-4 and final adapter weights within 1e-5 of the one-process run."""
    mine, ref = losses(run), losses(reference)
    assert sorted(mine) == list(range(1, STEPS + 1)) and sorted(ref) == sorted(mine)
    assert max(abs(mine[s] - ref[s]) for s in ref) < 1e-4, (mine, ref)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, reference))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # training moved the adapter (so equal adapters are not two untouched initialisations)
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-4


def kill_tree(proc: subprocess.Popen) -> None:
    """Leave no process behind whatever the test saw: a worker the launcher failed to stop would outlive it."""
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_csv, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    assert main(["train", *recipe(sample_csv, tiny_model_dir), "--output_dir", str(out)]) == 0
    return out


def test_accumulation_that_does_not_divide_is_one_line(sample_csv, tmp_path, capsys):
    assert main(["train", "--data", str(sample_csv), "--output_dir", str(tmp_path / "run"), "--nproc", "3",
                 "--gradient_accumulation_steps", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("medlora: error: gradient_accumulation_steps 16 does not divide across 3 processes (each "
                   "accumulates an equal share of every optimizer step's samples); use a multiple of 3, such as "
                   "15 or 18")
    assert not (tmp_path / "run").exists()


def test_each_process_gets_its_share_of_the_cores_and_more_threads_than_cores_is_one_warning(monkeypatch, capsys):
    import medlora.cpu
    from medlora.training.launcher import threads_each

    monkeypatch.setattr(medlora.cpu, "usable_cpus", lambda: 8)
    assert (threads_each(2, None), threads_each(3, None), threads_each(8, None), threads_each(4, 2)) == (4, 2, 1, 2)
    assert capsys.readouterr().err == ""
    warning = "usable CPU cores: more threads than cores makes training slower, not faster"
    assert threads_each(4, 3) == 3
    assert capsys.readouterr().err.strip() == f"medlora: warning: 4 processes x 3 threads on 8 {warning}"
    assert threads_each(16, None) == 1  # at least one thread each, more processes than cores or not
    assert capsys.readouterr().err.strip() == f"medlora: warning: 16 processes x 1 thread on 8 {warning}"


def test_two_processes_train_what_one_process_trains(reference, sample_csv, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "medlora", "train", *recipe(sample_csv, tiny_model_dir),
                           "--output_dir", str(out), "--nproc", "2"],
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    assert "training in 2 processes with 1 thread each" in proc.stderr
    assert_same_run(out, reference)
    info = json.loads((out / "run_info.json").read_text())
    assert info["processes"] == 2 and info["torch_threads"] == 1
    # each rank saved its RNG state into the checkpoint before rank 0 marked it complete
    last = out / f"checkpoint-{STEPS}"
    complete = json.loads((last / "medlora_complete.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(complete)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one run folder, nothing beside it
    assert not (out / ".medlora-lock").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(train_args: list[str], logs: list[tuple[Path, Path]], environment: dict,
                 second_only: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Two torchrun launches, one per "machine", meeting at a c10d rendezvous on 127.0.0.1 (the README's
    multi-machine command), each writing its stdout and stderr to its pair of ``logs``; waits for both (bounded).
    ``second_only``: options given to the second machine alone."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "medlora-test",
              "--local-addr", "127.0.0.1", "-m", "medlora", "train", *train_args]
    machines = [subprocess.Popen(launch + (list(second_only) if i else []), stdout=out.open("w"), stderr=err.open("w"),
                                 env=environment) for i, (out, err) in enumerate(logs)]
    try:
        for m in machines:
            m.wait(timeout=300)
    finally:
        for m in machines:
            kill_tree(m)
    return machines


def test_two_machines_on_loopback_write_one_run(reference, sample_csv, tiny_model_dir, tmp_path):
    """Two separate torchrun launches (one per "machine") meet at a c10d rendezvous on 127.0.0.1. Both are given
    the same --output_dir; it already exists and is not empty, so rank 0 claims a timestamped sibling, and rank 1
    must train into that one too (it learns the name from rank 0)."""
    runs = tmp_path / "runs"
    (runs / "run").mkdir(parents=True)
    (runs / "run" / "notes.txt").write_text("an earlier run's folder")
    logs = [(tmp_path / f"machine{i}.out", tmp_path / f"machine{i}.err") for i in range(2)]
    machines = two_machines(recipe(sample_csv, tiny_model_dir) + ["--output_dir", str(runs / "run")], logs, env())
    results = [(out.read_text(), err.read_text()) for out, err in logs]
    assert [m.returncode for m in machines] == [0, 0], [err[-2000:] for _, err in results]
    folders = sorted(p for p in runs.iterdir() if p.name != "run")
    assert len(folders) == 1 and folders[0].name.startswith("run-"), folders
    assert sorted(p.name for p in (runs / "run").iterdir()) == ["notes.txt"]
    printed = [out.strip() for out, _ in results if out.strip()]
    assert printed == [str(folders[0])]  # rank 0 prints the run folder; the other machine prints nothing
    assert_same_run(folders[0], reference)
    assert json.loads((folders[0] / "run_info.json").read_text())["processes"] == 2


def find_rank(parent: psutil.Process, rank: str, deadline: float) -> psutil.Process:
    while time.monotonic() < deadline:
        for child in parent.children(recursive=True):
            try:
                if child.environ().get("RANK") == rank and "medlora" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} appeared")


def test_killed_rank_ends_the_job_and_one_process_resumes(reference, sample_csv, tiny_model_dir, tmp_path,
                                                          capsys):
    """Rank 1 SIGKILLs itself after optimizer step 3 (checkpoint-2 is complete): the job ends within 60 s with one
    line, and `medlora train --resume` in ONE process finishes the run as if it had never stopped."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "medlora", "train", *recipe(sample_csv, tiny_model_dir),
                             "--output_dir", str(out), "--nproc", "2"], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "stderr.txt").open("w"), env=env(MEDLORA_TEST_CRASH_AT="step:3:rank1"))
    try:
        rank1 = find_rank(psutil.Process(proc.pid), "1", time.monotonic() + 240)
        rank1.wait(timeout=240)  # it kills itself at step 3
        proc.wait(timeout=60)  # the bound the issue sets: no hang on the dead peer
    finally:
        kill_tree(proc)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("medlora: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert (f"training process rank 1 (pid {rank1.pid}) was killed by SIGKILL; the other process was stopped. "
            f"Resume from the last complete checkpoint (checkpoint-2) with: medlora train --resume {out}") in errors[0]
    assert "training in 2 processes with 1 thread each" in err
    assert not (out / "metrics.json").exists() and (out / "checkpoint-2" / "medlora_complete.json").exists()
    # each rank saved its RNG state into the checkpoint before rank 0 marked it complete
    complete = json.loads((out / "checkpoint-2" / "medlora_complete.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(complete)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["run"]  # one run folder, nothing beside it

    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0  # one process continues the two processes' run
    assert "resuming from checkpoint-2" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == STEPS
    # steps 1-2 were trained by `--nproc 2`, steps 3-6 by one process: the per-step losses and the final adapter
    # equal the one-process run's (the two-machine test above compares a whole two-process run)
    assert_same_run(out, reference)
    assert not (out / ".medlora-lock").exists()


def error_lines(text: str) -> list[str]:
    """The `medlora: error:` lines of a log (progress bars redraw with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", text) if line.startswith("medlora: error:")]


def test_a_job_that_dies_before_its_first_checkpoint_leaves_no_run_folder(sample_csv, tiny_model_dir, tmp_path):
    """As in one process: a new run under --nproc that stops before its first complete checkpoint can never be
    resumed, so what rank 0 wrote and the lock its process left are removed, and the line says to start again."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "medlora", "train", *recipe(sample_csv, tiny_model_dir),
                           "--output_dir", str(out), "--nproc", "2"], capture_output=True, text=True, timeout=300,
                          env=env(MEDLORA_TEST_CRASH_AT="step:1:rank1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error_lines(proc.stderr)[-1].endswith(
        f"It stopped before the first checkpoint, so there is nothing to resume ({out} removed): start the run again")
    assert not out.exists()


def test_machines_started_with_different_options_stop_in_one_line_before_training(sample_csv, tiny_model_dir,
                                                                                  tmp_path):
    """A flag given on one machine and not the other would silently train two different adapters (a learning
    rate), split the data differently (a seed), hang until gloo's 30-minute timeout (max_steps) or end in a DDP
    traceback (lora_r): every process stops at once with one line naming the options that differ."""
    out = tmp_path / "run"
    logs = [(tmp_path / f"machine{i}.out", tmp_path / f"machine{i}.err") for i in range(2)]
    machines = two_machines(recipe(sample_csv, tiny_model_dir) + ["--output_dir", str(out)], logs, env(),
                            second_only=("--learning_rate", "0.1", "--lora_r", "16"))
    assert all(m.returncode != 0 for m in machines)
    for _, err in logs:
        lines = error_lines(err.read_text())
        assert lines == ["medlora: error: the training processes were started with different options: learning_rate "
                         "(rank 0: 0.0002, rank 1: 0.1); lora_r (rank 0: 8, rank 1: 16). Start every machine with "
                         "the same options"], err.read_text()[-3000:]
        frames = [line for line in err.read_text().splitlines() if line.strip().startswith("File ")]
        assert not [f for f in frames if "medlora" in f], frames  # plain torchrun prints its own traceback
    assert not out.exists()  # nothing was claimed


def test_a_dead_machine_ends_the_other_machines_process_in_one_line(sample_csv, tiny_model_dir, tmp_path):
    """Two torchrun "machines" on loopback (the multi-machine command of the README); machine 1's process dies
    (SIGKILL after step 3). Machine 0's process finds its peer gone at the next collective and says so in one line
    that names the checkpoint to resume from, instead of a gloo traceback or a 30-minute wait (torchrun then adds its
    own failure report, which medlora cannot silence under a plain torchrun)."""
    out = tmp_path / "run"
    logs = [(tmp_path / f"machine{i}.out", tmp_path / f"machine{i}.err") for i in range(2)]
    machines = two_machines(recipe(sample_csv, tiny_model_dir) + ["--output_dir", str(out)], logs,
                            env(MEDLORA_TEST_CRASH_AT="step:3:rank1"))
    assert all(m.returncode != 0 for m in machines)
    err = logs[0][1].read_text()
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("medlora: error: training process rank 0 lost contact with the other processes (")
    assert lines[0].endswith(f"); the job stops. Resume from the last complete checkpoint (checkpoint-2) with: "
                             f"medlora train --resume {out} (--nproc 1, 2 or 4)")
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]  # torchrun's own traceback
    assert not [f for f in frames if "medlora" in f], frames
    assert (out / "checkpoint-2" / "medlora_complete.json").exists() and not (out / "metrics.json").exists()


def test_a_full_disk_under_nproc_stops_in_one_line_at_a_complete_checkpoint(sample_csv, tiny_model_dir, tmp_path):
    """The disk fills up while two processes train (a file size limit set on both once checkpoint-2 is complete:
    writes then fail as on a full disk): one line naming the last complete checkpoint, no half-written checkpoint
    and no process left. (That a two-process run's checkpoint resumes in one process, and that a run stopped by a
    full disk resumes, are tested above and in test_resume.py.)"""
    import resource

    from medlora.rundir import RunDir, is_complete

    steps, out = 12, tmp_path / "run"
    args = recipe(sample_csv, tiny_model_dir)
    args[args.index("--max_steps") + 1] = str(steps)
    proc = subprocess.Popen([sys.executable, "-m", "medlora", "train", *args, "--output_dir", str(out), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.txt").open("w"), env=env())
    try:
        deadline = time.monotonic() + 240
        workers = [find_rank(psutil.Process(proc.pid), rank, deadline) for rank in ("0", "1")]
        while not (out / "checkpoint-2" / "medlora_complete.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.05)
        for worker in workers:
            resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (4096, 4096))  # every checkpoint has larger files
        proc.wait(timeout=120)
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    finally:
        kill_tree(proc)
    err = (tmp_path / "stderr.txt").read_text()
    last = RunDir(out).latest_complete_checkpoint()
    assert proc.returncode == 2 and "Traceback" not in err and last is not None, err[-3000:]
    assert 2 <= int(last.name.split("-")[1]) < steps
    assert error_lines(err)[-1].startswith(f"medlora: error: cannot write to the run folder {out}: File too large (")
    assert error_lines(err)[-1].endswith(f"Training stopped: the last complete checkpoint is {last.name}; make room, "
                                         f"then resume with: medlora train --resume {out}")
    assert all(is_complete(c) for c in RunDir(out).checkpoints())
    assert not (out / ".medlora-lock").exists() and not (out / "metrics.json").exists()


SIGNALS = {"ctrl_c": signal.SIGINT, "sigterm": signal.SIGTERM, "hang_up": signal.SIGHUP}


@pytest.mark.parametrize("how", SIGNALS)
def test_a_signal_to_the_launcher_ends_the_job_at_a_checkpoint_that_resumes(how, sample_csv, tiny_model_dir,
                                                                             tmp_path):
    """`medlora train --nproc 2` in a terminal. torchrun starts each worker in a session of its own, so the
    terminal's signals reach only the launcher, which passes them on to the workers once and waits for them.
    - Ctrl-C (the terminal signals its foreground process group): every rank stops after the same sample, mid-step
      (8 samples per rank per step: waiting for the step's end could outlast the launcher's patience on a big
      model), and the last completed step is what is checkpointed, with both ranks' RNG states. Exit code 130.
    - The terminal hangs up (a closed window, a dropped SSH session): the same, although every write to the dead
      terminal fails, and the shell's second SIGHUP on top of the kernel's does not cut the launcher's wait short.
      Exit code 129.
    - SIGTERM to the launcher (`kill`, `docker stop`, a scheduler's preemption): the same as Ctrl-C, exit code 143.
      The launcher passes it on as SIGUSR1, since a SIGTERM from torchrun's agent means "a peer died, go at once".
    Either way: no worker left behind, no traceback, a last line naming the checkpoint and the command that resumes
    it, and the run resumes (in one process) to its last step."""
    sig, steps = SIGNALS[how], 4  # the signal is sent once checkpoint-2 is complete: it lands in step 3
    args = recipe(sample_csv, tiny_model_dir)
    args[args.index("--max_steps") + 1] = str(steps)
    args[args.index("--gradient_accumulation_steps") + 1] = "16"
    out = tmp_path / "run"
    # rank 0 waits after step 3's first sample until the signal has reached it: however fast the machine, the
    # signal lands in step 3
    term = Terminal(["-m", "medlora", "train", *args, "--output_dir", str(out), "--nproc", "2"],
                    env=env(MEDLORA_TEST_CRASH_AT="substep:2:rank0=wait"))
    try:
        term.read_until((out / "checkpoint-2" / "medlora_complete.json").exists, timeout=240)
        workers = psutil.Process(term.proc.pid).children(recursive=True)
        if sig == signal.SIGHUP:
            term.hang_up()  # the kernel sends SIGHUP to the session leader: the launcher
            term.proc.send_signal(signal.SIGHUP)  # and the shell sends its own
        else:
            os.killpg(term.proc.pid, sig)  # SIGINT: what Ctrl-C in a terminal does
        assert term.proc.wait(timeout=120) == 128 + sig, term.text()[-3000:]
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        err = term.text() if sig == signal.SIGHUP else term.read_to_end()
    finally:
        kill_tree(term.proc)
        term.close()
    assert "training in 2 processes" in err and "training:" in err and "Traceback" not in err, err[-3000:]
    # nothing trained after checkpoint-2 was kept: step 3 was cut short
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    complete = json.loads((out / "checkpoint-2" / "medlora_complete.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(complete)
    assert not (out / "metrics.json").exists()
    assert not (out / ".medlora-lock").exists()  # rank 0 finished its sample and released the run folder
    if sig != signal.SIGHUP:  # the terminal is still there to read: rank 0 said where it stopped, then the launcher
        assert f"stopped at step 2/{steps}; checkpoint saved in {out}" in err
        assert err.strip().splitlines()[-1] == (f"medlora: stopped by {sig.name}. Resume from the last complete "
                                                f"checkpoint (checkpoint-2) with: medlora train --resume {out} "
                                                "(--nproc 1, 2, 4, 8 or 16)")
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == steps
