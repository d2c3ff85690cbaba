"""SIGKILL while an artifact is being written (a checkpoint, the final adapter, metrics.json): the run resumes
and finishes, and no reader ever sees a half-written artifact. The kill comes from medlora's fault-injection
point (MEDLORA_TEST_CRASH_AT), at the exact moment the file or folder is written but not yet in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from medlora.cli import main
from medlora.rundir import RunDir

pytestmark = pytest.mark.slow
STEPS = 6


def train_until_killed(sample_csv, model, out, point: str) -> None:
    cmd = [sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model", str(model),
           "--output_dir", str(out), "--max_steps", str(STEPS), "--gradient_accumulation_steps", "1",
           "--save_steps", "2", "--max_eval_samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "MEDLORA_TEST_CRASH_AT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("point, leftover", [
    ("checkpoint:checkpoint-4", "checkpoint-4"),   # checkpoint files written, completeness marker not
    ("dir:adapter", "adapter.tmp"),                # final adapter written, not yet renamed into place
    ("json:metrics.json", "metrics.json.tmp"),     # everything done but the last file
])
def test_killed_while_writing_resumes_and_nothing_half_written_is_read(point, leftover, sample_csv, tiny_model_dir,
                                                                       tmp_path, capsys):
    out = tmp_path / "run"
    train_until_killed(sample_csv, tiny_model_dir, out, point)
    assert (out / leftover).exists() and not (out / "metrics.json").exists()
    if point.startswith("checkpoint"):
        assert not (out / "adapter").exists()
    # readers see a run that is not finished, never a half-written one
    assert main(["chat", str(out), "-q", "hi", "--max_new_tokens", "2"]) == (0 if (out / "adapter").exists() else 2)
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    if point.startswith("checkpoint"):
        assert "skipping incomplete checkpoint checkpoint-4" in err and "resuming from checkpoint-2" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == STEPS
    assert not list(out.glob("*.tmp")) and not (out / ".medlora-lock").exists()
    assert main(["chat", str(out), "-q", "hi", "--max_new_tokens", "2"]) == 0
    assert RunDir(out).latest_complete_checkpoint().name == f"checkpoint-{STEPS}"
