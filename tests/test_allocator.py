"""`medlora train --precision int8` from the command line re-executes itself once on jemalloc where the system
has it (medlora.allocator); other precisions, and an in-process caller of medlora.cli.main, keep the process's
allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medlora import allocator

needs_jemalloc = pytest.mark.skipif(allocator.jemalloc_path() is None,
                                    reason="no libjemalloc.so.2 here (make setup installs libjemalloc2 as root)")


@needs_jemalloc
def test_preloaded_env_adds_jemalloc_once_and_keeps_the_users_settings():
    path, base = allocator.jemalloc_path(), {"PATH": os.environ.get("PATH", "")}
    env = allocator.preloaded_env(base)
    assert env["LD_PRELOAD"] == path and env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert allocator.preloaded_env(env) is None  # never twice, even if the library failed to load
    assert allocator.preloaded_env({**base, "LD_PRELOAD": path}) is None
    assert allocator.preloaded_env({**base, "MEDLORA_ALLOCATOR": "system"}) is None
    mine = allocator.preloaded_env({**base, "LD_PRELOAD": "/opt/libfoo.so", "MALLOC_CONF": "narenas:1"})
    assert mine["LD_PRELOAD"] == f"{path}:/opt/libfoo.so" and mine["MALLOC_CONF"] == "narenas:1"



@needs_jemalloc
def test_training_benchmark_children_get_the_allocator_asked_for(monkeypatch):
    """benchmarks/train_speed: by default only medlora_int8 runs on jemalloc, as `medlora train` runs it;
    --medlora_allocator system puts none on it, jemalloc every medlora contender (never the reference)."""
    from argparse import Namespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    for name in ("LD_PRELOAD", "MALLOC_CONF", allocator.ENV, allocator._REEXECUTED):
        monkeypatch.delenv(name, raising=False)
    from benchmarks.train_speed.runner import child_env

    names = ("reference", "trl_tuned", "medlora", "medlora_fp32", "medlora_int8")
    preloaded = {choice: [allocator.jemalloc_path() in child_env(n, Namespace(medlora_allocator=choice))
                          .get("LD_PRELOAD", "") for n in names] for choice in ("auto", "system", "jemalloc")}
    assert preloaded == {"auto": [False, False, False, False, True], "system": [False] * 5,
                         "jemalloc": [False, False, True, True, True]}

def test_fp32_runs_and_in_process_runs_keep_this_processes_allocator(tiny_run):
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["allocator"].split(" (")[0] == ("jemalloc" if allocator.active() == "jemalloc" else "system malloc")


@pytest.mark.slow
@needs_jemalloc
def test_train_from_the_command_line_runs_on_jemalloc(sample_csv, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.ENV)}
    proc = subprocess.run([sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model",
                           str(tiny_model_dir), "--output_dir", str(out), "--precision", "int8", "--max_steps", "1",
                           "--gradient_accumulation_steps", "1", "--max_eval_samples", "2"],
                          capture_output=True, text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["allocator"] == f"jemalloc (MALLOC_CONF={allocator.JEMALLOC_CONF})"
    assert info["precision"] == "int8" and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "memory allocator: jemalloc" in proc.stderr + proc.stdout  # the training log says so too


def test_only_a_medlora_process_keeps_its_loaded_libraries_out_of_the_garbage_collector(sample_csv, tiny_model_dir,
                                                                                     tmp_path, monkeypatch):
    """`medlora train` from the command line moves what it has loaded out of the collector's sight (gc.freeze) before
    it trains; cli.main called in a caller's own process (a notebook) freezes nothing of the caller's."""
    import gc

    import medlora.training.recipe as recipe
    from medlora.cli import main

    frozen = []
    monkeypatch.setattr(recipe, "run", lambda cfg, resume=None: frozen.append(gc.get_freeze_count()))
    args = ["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
            "--precision", "fp32"]
    before = gc.get_freeze_count()
    assert main(args) == 0 and frozen[0] <= before  # in the caller's process: nothing more frozen (some freed)
    import weakref

    class Node:
        pass

    garbage = Node()
    garbage.me = garbage  # a reference cycle that nothing refers to any more: only a collection frees it
    freed = weakref.ref(garbage)
    del garbage
    monkeypatch.setattr(sys, "argv", ["medlora", *args])
    gc.disable()  # no automatic collection: only main() can free the cycle
    try:
        assert main() == 0  # as the `medlora` command runs it
    finally:
        gc.enable()
    assert frozen[1] > frozen[0] + 1000  # everything alive: what the test process made since its own freeze
    assert freed() is None  # collected first, not frozen (kept forever) with the rest
