"""Never lose a run: checkpoints, resume after SIGKILL (bit-for-bit equivalent), incomplete checkpoints,
Ctrl-C, validation before work and safe loading.

The runs use the tiny random-weight model: what is tested is the checkpoint plumbing, not what the model
knows. They are long enough (STEPS optimizer steps) that a signal sent once checkpoint-2 is complete always
lands mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Terminal
from medlora.cli import main
from medlora.rundir import RunDir

STEPS = 20
TRAIN = ["--max_steps", str(STEPS), "--gradient_accumulation_steps", "2", "--save_steps", "2", "--max_eval_samples", "2",
         "--learning_rate", "1e-3"]


def start(sample_csv, out: Path, model: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model", str(model),
           "--output_dir", str(out), *TRAIN]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def signal_after_first_checkpoint(sample_csv, out: Path, model: Path, sig: int) -> subprocess.Popen:
    """Start a training subprocess and send it ``sig`` once checkpoint-2 is complete (training goes on)."""
    proc = start(sample_csv, out, model)
    wait_for(out / "checkpoint-2" / "medlora_complete.json", proc)
    proc.send_signal(sig)
    return proc


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_adapter_diff(run_a: Path, run_b: Path) -> float:
    a, b = adapter(run_a), adapter(run_b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(run: Path) -> dict:
    state = json.loads((run / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sample_csv, tiny_model_dir):
    out = tmp_path_factory.mktemp("resume") / "straight"
    proc = start(sample_csv, out, tiny_model_dir)
    assert proc.wait() == 0, proc.communicate()
    return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, sample_csv, tiny_model_dir, tmp_path, capsys):
    """A run SIGKILLed (the OOM killer, a reboot) resumes to the uninterrupted run's end. The resume switches
    gradient checkpointing on, as after running out of memory: an option of how the run is carried out, which a
    resume may change (and which changes nothing but memory), unlike the ones that change what it computes."""
    out = tmp_path / "killed"
    signal_after_first_checkpoint(sample_csv, out, tiny_model_dir, signal.SIGKILL).wait()
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    resumed_from = int(RunDir(out).latest_complete_checkpoint().name.split("-")[1])
    assert 2 <= resumed_from < STEPS

    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--gradient_checkpointing", "on"]) == 0
    assert "resuming with gradient_checkpointing on (was auto)" in capsys.readouterr().err
    assert "gradient_checkpointing: 'on'" in (out / "config.yaml").read_text()  # the next resume keeps it
    assert json.loads((out / "run_info.json").read_text())["gradient_checkpointing"] is True
    assert max_adapter_diff(uninterrupted, out) <= 1e-6
    la, lb = losses(uninterrupted), losses(out)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert max(t.abs().max().item() for k, t in adapter(out).items() if "lora_B" in k) > 1e-4  # it trained
    for step in range(resumed_from + 1, STEPS + 1):  # the losses logged after the resume point are the same
        assert lb[step] == pytest.approx(la[step], rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == f"checkpoint-{resumed_from}" and metrics["train_steps"] == STEPS
    # checkpoints rotate: the newest save_total_limit (2) are kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for name in ("adapter", "metrics.json"):  # make it look like a run that died after its last checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    newest = run / f"checkpoint-{STEPS}" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint checkpoint-{STEPS}" in err and f"resuming from checkpoint-{STEPS - 2}" in err
    assert max_adapter_diff(uninterrupted, run) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_resumable_checkpoint(sig, uninterrupted, sample_csv, tiny_model_dir, tmp_path):
    """Ctrl-C, and SIGTERM (`kill`, `docker stop`, `systemctl stop`, a batch scheduler's preemption), finish the
    current sample, save a checkpoint and exit with 128 + the signal's number; the run resumes to the same end."""
    out = tmp_path / "interrupted"
    proc = signal_after_first_checkpoint(sample_csv, out, tiny_model_dir, sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err
    assert f"{'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}: saving a checkpoint after the current sample" in err
    last = err.strip().splitlines()[-1]
    assert "checkpoint saved" in last and f"medlora train --resume {out}" in last and "Traceback" not in err
    assert not (out / "metrics.json").exists()
    ckpt = RunDir(out).latest_complete_checkpoint()
    assert ckpt is not None and 2 <= int(ckpt.name.split("-")[1]) < STEPS
    assert main(["train", "--resume", str(out)]) == 0
    assert max_adapter_diff(uninterrupted, out) <= 1e-6


@pytest.mark.slow
def test_closed_terminal_saves_a_resumable_checkpoint(uninterrupted, sample_csv, tiny_model_dir, tmp_path):
    """Training on a terminal that hangs up (a closed window, a dropped SSH session): SIGHUP saves a checkpoint
    like Ctrl-C instead of ending the run at once, although every write to the dead terminal fails, and the second
    SIGHUP a shell sends its jobs on top of the kernel's does not cut the save short. Exit code 129. The pty is
    never sized (0 x 0), where tqdm used to print an empty line instead of the progress bar."""
    out = tmp_path / "hung-up"
    term = Terminal(["-m", "medlora", "train", "--data", str(sample_csv), "--model", str(tiny_model_dir),
                     "--output_dir", str(out), *TRAIN], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        term.read_until((out / "checkpoint-2" / "medlora_complete.json").exists, timeout=600)
    finally:
        term.hang_up()  # the kernel sends SIGHUP to the session
    term.proc.send_signal(signal.SIGHUP)  # and the shell's own, to its jobs
    assert term.proc.wait(timeout=600) == 128 + signal.SIGHUP, term.text()[-2000:]
    assert "training:" in term.text() and not (out / "metrics.json").exists()
    ckpt = RunDir(out).latest_complete_checkpoint()
    assert ckpt is not None and 2 <= int(ckpt.name.split("-")[1]) < STEPS
    assert main(["train", "--resume", str(out)]) == 0
    assert max_adapter_diff(uninterrupted, out) <= 1e-6


@pytest.mark.slow
def test_nohup_training_outlives_the_hang_up(uninterrupted, sample_csv, tiny_model_dir, tmp_path):
    """`nohup medlora train ...` is how a run is meant to outlive its terminal: the SIGHUP nohup tells it to ignore
    neither stops it at a checkpoint nor kills it, and the run ends as the uninterrupted one does."""
    out = tmp_path / "nohup"
    proc = subprocess.Popen(["nohup", sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model",
                             str(tiny_model_dir), "--output_dir", str(out), *TRAIN], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for(out / "checkpoint-2" / "medlora_complete.json", proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "SIGHUP" not in err and (out / "metrics.json").is_file(), err[-2000:]
    assert max_adapter_diff(uninterrupted, out) <= 1e-6


@pytest.mark.slow
def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes(uninterrupted, sample_csv, tiny_model_dir,
                                                                    tmp_path):
    """The disk fills up mid-run: the next checkpoint cannot be written. One line instead of a traceback, naming the
    last complete checkpoint and how to go on; the half-written checkpoint is removed (it holds disk space and can
    never be resumed); the progress bar is closed before the line; and once there is room the run resumes to the
    uninterrupted run's end. The full disk is a file size limit set on the running process (RLIMIT_FSIZE through
    prlimit: writes fail with EFBIG, as they fail with ENOSPC on a full disk) once checkpoint-2 is complete."""
    import resource

    out = tmp_path / "full"
    proc = start(sample_csv, out, tiny_model_dir)
    wait_for(out / "checkpoint-2" / "medlora_complete.json", proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (4096, 4096))  # every checkpoint holds larger files
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    last = RunDir(out).latest_complete_checkpoint()
    assert last is not None and 2 <= int(last.name.split("-")[1]) < STEPS
    assert err.splitlines()[-1].startswith(f"medlora: error: cannot write to the run folder {out}: File too large (")
    assert err.splitlines()[-1].endswith(f"Training stopped: the last complete checkpoint is {last.name}; make room, "
                                         f"then resume with: medlora train --resume {out}")
    assert [c for c in RunDir(out).checkpoints() if c != last and not (c / "medlora_complete.json").exists()] == []
    assert not (out / ".medlora-lock").exists() and not (out / "metrics.json").exists()
    assert main(["train", "--resume", str(out)]) == 0
    assert max_adapter_diff(uninterrupted, out) <= 1e-6


def test_resume_rejects_disagreeing_flags_and_non_runs(uninterrupted, tmp_path, capsys):
    assert main(["train", "--resume", str(uninterrupted), "--learning_rate", "3e-3", "--lora_r", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "learning_rate (saved 0.001, given 0.003)" in err and "lora_r" not in err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a medlora run folder" in capsys.readouterr().err


def test_a_checkpoint_is_the_run_at_that_step_for_chat_eval_export_merge_and_serve(uninterrupted, tmp_path,
                                                                                    capsys):
    """`RUN/checkpoint-N` is the run as it was at step N: its adapter is the checkpoint's, the rest (base model,
    system prompt, eval split) the run's, and what is written for it is named after the checkpoint, beside the run's
    own artifacts, which stay as they are. A run with no adapter yet (training, or stopped) names its newest
    complete checkpoint; an incomplete checkpoint and `--resume` of a checkpoint are one line each."""
    import shutil

    from peft import get_peft_model_state_dict

    from medlora.inference.hf import load_backend
    from medlora.serve.server import model_id

    run = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    final, earlier = run / f"checkpoint-{STEPS}", run / f"checkpoint-{STEPS - 2}"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted([final.name, earlier.name])

    def answer(target: Path) -> str:
        capsys.readouterr()
        assert main(["chat", str(target), "-q", "What is anemia?", "--max_new_tokens", "8", "--backend", "hf"]) == 0
        out, err = capsys.readouterr()
        assert f"[{target} (adapter merged into" in err
        return out

    assert answer(final) == answer(run)  # the last checkpoint holds the final adapter
    for checkpoint in (earlier, final):  # the weights that answer are the checkpoint's own
        weights = get_peft_model_state_dict(load_backend(str(checkpoint)).model)
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    assert any(not torch.equal(load_file(earlier / "adapter_model.safetensors")[k], v)
               for k, v in load_file(final / "adapter_model.safetensors").items())
    assert model_id(str(earlier), None, None) == f"run-{earlier.name}"

    modelfile = (run / "export").mkdir() or run / "export" / "Modelfile"
    modelfile.write_text("the run's own")
    assert main(["export", str(earlier), "--quant", "f16"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "export" / f"run-{earlier.name}-f16.gguf")
    assert f"\nFROM ./run-{earlier.name}-f16.gguf\n" in (run / "export" / f"Modelfile-{earlier.name}").read_text()
    assert modelfile.read_text() == "the run's own"
    assert main(["merge", str(earlier)]) == 0
    merged = run / f"merged_model-{earlier.name}"
    assert capsys.readouterr().out.strip() == str(merged) and (merged / "model.safetensors").is_file()
    assert model_id(str(merged), None, None) == f"run-{earlier.name}"
    assert RunDir.home(merged).system_prompt() == RunDir(run).system_prompt()
    assert not (run / "merged_model").exists()

    assert main(["eval", str(earlier), "--samples", "0", "--no_forgetting", "--backend", "hf"]) == 0
    metrics = json.loads((run / f"eval-{earlier.name}" / "metrics.json").read_text())
    assert metrics["loss_source"] == "measured"  # training's numbers are the final adapter's, not this one's
    assert metrics["training"] == {"checkpoint": earlier.name, "train_steps": STEPS - 2}
    assert not (run / "eval").exists()

    (final / "medlora_complete.json").unlink()  # being written, or its writer was stopped
    assert main(["chat", str(final), "-q", "hi"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{final}: an incomplete checkpoint (it was being written, or "
                                                    "its writer was stopped while writing it); use another one")
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()  # a run that stopped before its end
    for command in ("chat", "eval", "export", "merge"):
        assert main([command, str(run)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"medlora: error: {run}: this run has no adapter yet (it stopped before its end: medlora train --resume "
            f"{run} finishes it); its newest complete checkpoint can be used meanwhile: give {earlier} instead of "
            f"{run}")
    assert main(["train", "--resume", str(earlier)]) == 2
    assert capsys.readouterr().err.strip() == (f"medlora: error: {earlier} is a checkpoint: give its run folder "
                                               f"(medlora train --resume {run}), which goes on from its newest "
                                               "complete checkpoint")


def test_resume_without_complete_checkpoint_is_a_clear_error(uninterrupted, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"  # a run that died before its first checkpoint
    shutil.copytree(uninterrupted, run, ignore=shutil.ignore_patterns("checkpoint-*", "adapter", "metrics.json"))
    assert main(["train", "--resume", str(run)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_nothing_and_a_larger_max_steps_extends_it(uninterrupted, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"this run already finished ({STEPS} optimizer steps); nothing was changed" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing deleted or rewritten
    assert main(["train", "--resume", str(run), "--max_steps", str(STEPS)]) == 2  # not larger: still finished
    assert main(["train", "--resume", str(run), "--max_steps", str(STEPS + 2)]) == 0
    err = capsys.readouterr().err
    assert f"extending the finished run from {STEPS} to {STEPS + 2} steps" in err
    # the progress bar counts samples from where the run stands, so that its ETA is for what is left
    assert f"| {2 * STEPS}/{2 * STEPS + 4} [" in err and f"| {2 * STEPS + 4}/{2 * STEPS + 4} [" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == STEPS + 2 and metrics["resumed_from"] == f"checkpoint-{STEPS}"
    assert sorted(losses(run)) == list(range(1, STEPS + 3))
    assert f"max_steps: {STEPS + 2}" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("point, sig", [("base_eval", signal.SIGTERM), ("final_eval", signal.SIGINT)])
def test_a_signal_outside_the_training_loop_is_one_line_and_leaves_a_run_to_resume_or_nothing(
        point, sig, sample_csv, tiny_model_dir, tmp_path, capsys):
    """Ctrl-C, SIGTERM or SIGHUP while the base model is evaluated (minutes for the 1.5B model) or after the
    last step: one line saying what was kept. A new run with no checkpoint leaves no folder that looks like a run
    but cannot resume; after training, the resume command it names (quoted for the shell) finishes the run."""
    out = tmp_path / "a run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDLORA_TEST_CRASH_AT": f"{point}={int(sig)}"}
    proc = subprocess.run([sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model",
                           str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "2",
                           "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
                           "--max_eval_samples", "2"], capture_output=True, text=True, timeout=600, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 128 + sig and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if point == "base_eval":
        assert last == (f"medlora: SIGTERM: stopped before the first checkpoint, so there is nothing to resume ({out} "
                        "removed): start the run again")
        assert not out.exists()
        return
    assert "| 4/4 [" in proc.stderr  # the bar counts samples: 2 steps of one micro-batch of 2
    assert last == f"medlora: Ctrl-C: stopped; resume with: medlora train --resume '{out}'"
    assert not (out / "metrics.json").exists() and not (out / ".medlora-lock").exists()
    assert main(["train", "--resume", str(out)]) == 0 and (out / "metrics.json").is_file()
    err = capsys.readouterr().err
    summary = next(line for line in err.splitlines() if "(base) -> " in line)
    assert "holds the run's last step" in err and summary.endswith("(fine-tuned)")  # no "None tokens/s"


def test_a_checkpoint_damaged_at_the_same_size_is_one_line(uninterrupted, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(uninterrupted, tmp_path / "run", ignore=shutil.ignore_patterns("adapter",
                                                                                           "metrics.json")))
    state = run / f"checkpoint-{STEPS}" / "trainer_state.json"
    state.write_text("[" + state.read_text()[1:])  # a disk error: same size, so the checkpoint looks complete
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"medlora: error: {state.parent}: its trainer_state.json is damaged; "
                                               "move that checkpoint folder away to resume from the one before it")


def test_a_run_on_pickle_weights_is_used_afterwards_without_the_flag_again(tiny_model_dir, sample_csv, tmp_path,
                                                                          capsys):
    """--allow_pickle_weights (or --trust_remote_code) given to train holds for that run's base model in merge,
    export, chat and eval: the user trusted that source once."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "old-style"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), base / "pytorch_model.bin")
    out = tmp_path / "run"
    train = ["train", "--data", str(sample_csv), "--model", str(base), "--output_dir", str(out), "--max_steps", "1",
             "--gradient_accumulation_steps", "1", "--max_eval_samples", "2"]
    assert main(train) == 2 and "--allow_pickle_weights" in capsys.readouterr().err
    assert main([*train, "--allow_pickle_weights"]) == 0
    assert main(["merge", str(out)]) == 0 and (out / "merged_model" / "model.safetensors").is_file()
    assert main(["chat", str(out), "-q", "hi", "--backend", "hf", "--max_new_tokens", "2"]) == 0


def test_unwritable_output_dir_fails_before_training(sample_csv, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["train", "--data", str(sample_csv), "--model", "smollm2-135m",
                 "--output_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medlora: error: cannot create output_dir {blocker / 'run'}: {blocker} is a file, not a folder"
    if os.geteuid() != 0:  # root can write anywhere; a read-only folder only stops ordinary users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["train", "--data", str(sample_csv), "--model", "smollm2-135m", "--output_dir", str(ro / "x")]) == 2
        assert "cannot write to output_dir" in capsys.readouterr().err


def test_pickle_weights_are_refused_unless_allowed(smol_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from medlora.errors import MedloraError
    from medlora.model import load_model

    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style pickle checkpoint
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(MedloraError, match="--allow_pickle_weights"):
        load_model(str(tmp_path))
    assert load_model(str(tmp_path), allow_pickle_weights=True).config.num_hidden_layers == 30


def test_too_little_free_disk_is_reported_before_training(tmp_path):
    from medlora.errors import MedloraError
    from medlora.files import check_output_location

    check_output_location(tmp_path / "run", need_bytes=1)  # plenty of room for one byte
    with pytest.raises(MedloraError, match=r"not enough free disk for .*need about 1000000000\.0 GB"):
        check_output_location(tmp_path / "run", need_bytes=10**18)
    assert not (tmp_path / "run").exists()


def test_max_seq_len_shorter_than_every_prompt_fails_before_the_model_loads(sample_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(sample_csv), "--model", "smollm2-135m", "--output_dir", str(out),
                 "--max_seq_len", "32"]) == 2
    err = capsys.readouterr().err
    assert "no training row fits max_seq_len=32" in err and "LoRA on" not in err  # before the model was built
    assert not out.exists()


def test_int8_run_checkpoints_resumes_and_merges(sample_csv, tiny_model_dir, tiny_run, tmp_path):
    """--precision int8 (int8 frozen base weights): its checkpoints and adapter hold the usual fp32 LoRA weights
    under the usual names, a run resumed from a checkpoint ends with the uninterrupted run's adapter, and
    `medlora merge` folds it into the fp32 base."""
    import shutil

    from transformers import AutoModelForCausalLM

    from medlora.model import load_run_model

    straight = tmp_path / "straight"
    assert main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(straight),
                 "--precision", "int8", "--max_steps", "6", "--gradient_accumulation_steps", "1", "--save_steps", "2",
                 "--max_eval_samples", "2", "--learning_rate", "1e-3"]) == 0
    assert json.loads((straight / "run_info.json").read_text())["precision"] == "int8"
    fp32_keys = adapter(tiny_run).keys()  # an fp32 run of the same model
    for weights in (adapter(straight), load_file(straight / "checkpoint-6" / "adapter_model.safetensors")):
        assert weights.keys() == fp32_keys and all(t.dtype == torch.float32 for t in weights.values())

    crashed = Path(shutil.copytree(straight, tmp_path / "crashed"))  # as if killed after checkpoint-4
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoint-6")
    (crashed / "metrics.json").unlink()
    assert main(["train", "--resume", str(crashed)]) == 0
    assert json.loads((crashed / "metrics.json").read_text())["resumed_from"] == "checkpoint-4"
    assert max_adapter_diff(straight, crashed) <= 1e-6
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-6)

    assert main(["merge", str(crashed)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(crashed / "merged_model")
    unmerged, _, _ = load_run_model(RunDir(crashed))  # adapter on the fp32 base
    ids = torch.tensor([[1, 300, 400, 500, 600, 700]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-4)
        unmerged.disable_adapter_layers()
        assert not torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-4)  # the adapter is in it
