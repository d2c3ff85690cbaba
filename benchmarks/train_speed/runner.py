"""The parent's side of one contender run: start the child, watch its RSS and time, collect its result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT


def cpu_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def child_env(name: str, args) -> dict:
    """The child's environment: medlora_int8 runs on the allocator `medlora train --precision int8` re-executes
    itself on (medlora.allocator: jemalloc where the system has it) unless --medlora_allocator system; the others
    on the system's, as `medlora train` at other precisions and the scripts they stand for do, unless
    --medlora_allocator jemalloc, which puts every medlora contender on jemalloc."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    paths = [str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    choice = getattr(args, "medlora_allocator", "auto")
    if (choice == "auto" and name == "medlora_int8") or (choice == "jemalloc" and name.startswith("medlora")):
        from medlora.allocator import preloaded_env

        env = preloaded_env(env) or env
    return env


def watch(proc, args, t0: float) -> tuple[int, float, str | None]:
    """Poll the child every 0.5 s until it exits; kill it past --timeout or --max_rss_gb.
    Returns (peak RSS polled, CPU seconds of the child's processes, why it was killed or None)."""
    import psutil

    ps = psutil.Process(proc.pid)
    peak_polled, child_cpu, outcome = 0, 0.0, None
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            child_cpu = max(child_cpu, sum(sum(p.cpu_times()[:2]) for p in procs))
            peak_polled = max(peak_polled, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        if args.timeout and time.time() - t0 > args.timeout:
            outcome = f"timed out after {args.timeout:.0f} s"
        elif peak_polled > args.max_rss_gb * 2**30:
            outcome = f"killed: RSS passed --max_rss_gb {args.max_rss_gb} GB"
        if outcome:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    return peak_polled, child_cpu, outcome


def from_progress(name: str, progress_path: Path, outcome: str | None) -> dict:
    """A killed child's result, rebuilt from its progress lines: the steps it finished, its settings, and the
    micro-batch it was in when killed (a bound on its speed)."""
    res: dict = {"name": name, "ok": False}
    if not progress_path.exists():
        return res
    lines = [json.loads(line) for line in progress_path.read_text().splitlines() if line.strip()]
    res["steps"] = [x for x in lines if "seconds" in x]
    for x in lines:
        if "settings" in x:  # what it was running with, recorded before training
            res.update(x)
    started = [x for x in lines if "micro_batch_start" in x]
    if started and outcome:
        last = started[-1]
        res["unfinished_micro_batch"] = {"tokens": last["tokens"], "running_s": round(time.time() - last["t"], 1),
                                         "step": last["step"]}
    return res


def run_child(name: str, spec_path: Path, workdir: Path, args, tag: str = "") -> dict:
    result_path, progress_path = workdir / f"{name}{tag}.result.json", workdir / f"{name}{tag}.progress.jsonl"
    log_path = workdir / f"{name}{tag}.log"
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--child", name, "--spec", str(spec_path),
           "--result", str(result_path), "--progress", str(progress_path)]
    load0, busy0, t0 = os.getloadavg(), cpu_busy_seconds(), time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env(name, args), cwd=ROOT,
                                start_new_session=True)
    peak_polled, child_cpu, outcome = watch(proc, args, t0)
    wall = time.time() - t0
    busy1, load1 = cpu_busy_seconds(), os.getloadavg()
    res = json.loads(result_path.read_text()) if result_path.exists() else from_progress(name, progress_path, outcome)
    if outcome:
        res["ok"], res["error"] = False, outcome
    elif proc.returncode != 0 and not res.get("error"):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        res["error"] = f"exit code {proc.returncode}: {' | '.join(tail)}"[:500]
    res["peak_rss_polled_gb"] = round(peak_polled / 2**30, 2)
    res.setdefault("peak_rss_gb", res["peak_rss_polled_gb"])
    res["wall_s"] = round(wall, 1)
    # cores used by other processes while this contender ran (system busy time minus this child's CPU time)
    res["other_load_cores"] = round(max(0.0, (busy1 - busy0) - child_cpu) / wall, 2) if wall > 0 else None
    res["loadavg_start"], res["loadavg_end"] = [round(x, 2) for x in load0], [round(x, 2) for x in load1]
    res["log"] = str(log_path)
    if not res.get("ok"):
        res["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return res
