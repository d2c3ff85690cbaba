"""Run folders written by the previous release (0.1.0, before the package was reshaped) still evaluate, chat,
merge and resume. The folder is made here by that release's own code, taken from git history."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from medlora.cli import main

RELEASE = "d976b29"  # the last commit of medlora 0.1.0's layout (train.py, generate.py, evaluate.py)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, tiny_model_dir, sample_csv) -> Path:
    """A finished 4-step run of the tiny model, written by release 0.1.0's `medlora train`."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE, "src"], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {RELEASE} is not in this checkout's history (a shallow clone?)")
    old_src = tmp_path_factory.mktemp("release")
    tarfile.open(fileobj=BytesIO(archive)).extractall(old_src, filter="data")
    assert (old_src / "src" / "medlora" / "train.py").is_file()  # really the old layout
    out = tmp_path_factory.mktemp("old") / "run"
    cmd = [sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model", str(tiny_model_dir),
           "--output_dir", str(out), "--max_steps", "4", "--gradient_accumulation_steps", "1", "--save_steps", "2",
           "--max_eval_samples", "2", "--learning_rate", "1e-3"]
    env = {**os.environ, "PYTHONPATH": str(old_src / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=old_src, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "checkpoint-2" / "medlora_complete.json").is_file()
    return out


def test_old_run_chats(old_run, capsys):
    assert main(["chat", str(old_run), "-q", "What is anemia?", "--max_new_tokens", "4"]) == 0
    captured = capsys.readouterr()
    # random weights: any 4 tokens; the default backend exported the old run and answered through llama.cpp
    assert len(captured.out) > 1 and f"{old_run} (llama.cpp q8_0" in captured.err


def test_old_run_evaluates(old_run, tmp_path):
    run = Path(shutil.copytree(old_run, tmp_path / "run"))
    assert main(["eval", str(run), "--samples", "1", "--max_new_tokens", "4"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["loss_rows"] == trained["eval_rows"] == 2
    assert metrics["eval_loss"]["fine_tuned"] == pytest.approx(trained["eval_loss"], rel=1e-3)
    assert (run / "eval" / "report.html").is_file() and (run / "eval" / "report.md").is_file()


def test_old_run_merges(old_run, tmp_path):
    run = Path(shutil.copytree(old_run, tmp_path / "run"))
    assert main(["merge", str(run)]) == 0
    assert (run / "merged_model" / "config.json").is_file()
    assert main(["chat", str(run / "merged_model"), "-q", "What is anemia?", "--max_new_tokens", "4"]) == 0


def test_old_run_resumes(old_run, tmp_path, capsys):
    """Cut the old run back to what a crash after checkpoint-2 leaves, then finish it with today's code."""
    run = Path(shutil.copytree(old_run, tmp_path / "run"))
    for name in ("checkpoint-4", "adapter", "metrics.json", "trainer_state.json", "loss_curve.png"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert "resuming from checkpoint-2" in capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["resumed_from"] == "checkpoint-2"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
