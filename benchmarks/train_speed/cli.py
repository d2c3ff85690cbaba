"""Options, the parent's run (data, peaks, the contenders in rounds, the report) and --render."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import __doc__ as PACKAGE_DOC
from .common import COMMAND, CONTENDERS, DEFAULT_DATA, HERE, ROOT, TRL_SHIPPED_BATCH, log


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=PACKAGE_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="decoder layers (28 = Qwen2.5-1.5B; fewer for iteration)")
    p.add_argument("--seq", type=int, default=512, help="max_seq_len (medlora/reference) and TRL tuned max_length")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps excluded from the measurement")
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimizer step (all contenders)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--rounds", type=int, default=1, help="run reference/medlora/trl_tuned this many times, "
                   "interleaved, and keep each one's fastest run (robust to other jobs on the machine); "
                   "trl_shipped runs once")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contender (0: none); a contender "
                   "past it is killed and reported as timed out")
    p.add_argument("--max_rss_gb", type=float, default=20.0, help="kill a contender whose RSS passes this "
                   "(protects the machine); reported as such")
    p.add_argument("--medlora_allocator", choices=("auto", "system", "jemalloc"), default="auto",
                   help="auto: medlora_int8 runs on the allocator `medlora train --precision int8` picks (jemalloc "
                   "where the system has it), the rest on the system's malloc, as `medlora train` runs them; "
                   "system: every medlora contender on the system's malloc; jemalloc: every medlora contender on "
                   "jemalloc (to see whether fp32 or bf16 should re-execute on it too)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MedQuAD CSV")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the row shuffle")
    p.add_argument("--out_dir", default=str(HERE / "results"), help="where train_speed.{md,json} go")
    p.add_argument("--workdir", help="keep children's logs/progress here (default: a temp dir, removed)")
    p.add_argument("--render", metavar="JSON", help="only rebuild the report from a saved train_speed.json")
    for hidden in ("--child", "--spec", "--result", "--progress"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p


def contenders(only: str | None) -> list[str]:
    """The contenders --only names, in run order; exits on an unknown name or a missing trl."""
    names = [n.strip() for n in (only or ",".join(CONTENDERS)).split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        sys.exit(f"unknown contender(s) {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    names = [n for n in CONTENDERS if n in names]
    if any(n.startswith("trl") for n in names):
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL contenders need trl: pip install -r benchmarks/requirements.txt (or --only reference,medlora)")
    return names


def run_rounds(names: list[str], spec_path: Path, workdir: Path, args, peaks: dict) -> dict[str, list[dict]]:
    """Rounds interleave the contenders (A B C A B C ...), so a burst of load from other processes hits them
    alike, and each contender keeps its fastest run. TRL as shipped (minutes per step) runs once, last."""
    from .report import summarise, summary_peaks
    from .runner import run_child

    runs: dict[str, list[dict]] = {}
    schedule = [(rnd, n) for rnd in range(args.rounds) for n in names
                if n != "trl_shipped" or rnd == args.rounds - 1]
    for rnd, name in schedule:
        log(f"running {name}, round {rnd + 1}/{args.rounds} (timeout {args.timeout or 'none'} s) ...")
        r = run_child(name, spec_path, workdir, args, tag=f".r{rnd + 1}" if args.rounds > 1 else "")
        r["round"] = rnd + 1
        r["summary"] = summarise(r, args.warmup, args.layers, summary_peaks(peaks))
        runs.setdefault(name, []).append(r)
        s = r["summary"]
        log(f"{name}: {'ok' if r.get('ok') else r.get('error')}; tokens/s {s.get('tokens_per_s')}, "
            f"s/step {s.get('s_per_step')}, peak RSS {r.get('peak_rss_gb')} GB, wall {r['wall_s']} s, "
            f"CPU share {s.get('cpu_share')}, other load {r.get('other_load_cores')} cores")
    return runs


def best_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each contender's fastest successful run (else its last), with every round listed under all_rounds."""
    results = {}
    for name, rounds in runs.items():
        ok = [r for r in rounds if r.get("ok")]
        best = max(ok, key=lambda r: r["summary"].get("tokens_per_s") or 0) if ok else rounds[-1]
        best["all_rounds"] = [{"round": r["round"], "ok": bool(r.get("ok")), "error": r.get("error"),
                               "tokens_per_s": r["summary"].get("tokens_per_s"),
                               "s_per_step": r["summary"].get("s_per_step"),
                               "cpu_share": r["summary"].get("cpu_share"),
                               "other_load_cores": r.get("other_load_cores"), "peak_rss_gb": r.get("peak_rss_gb")}
                              for r in rounds]
        best["peak_rss_gb_max_over_rounds"] = max((r.get("peak_rss_gb") or 0) for r in rounds)
        results[name] = best
    return results


def parent_main(args) -> int:
    import psutil  # noqa: F401 - fail early if missing

    from .contenders import trl_shipped_default_error
    from .data import prepare_data
    from .machine import machine_info, peaks as measure_peaks, versions
    from .markdown import write_reports
    from .report import build_report

    names = contenders(args.only)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medlora-bench-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, RAM {machine['ram_gb']} GB; "
        f"flags {', '.join(k for k, v in machine['flags'].items() if v) or 'none'}; load {load_start}")
    batch_max = TRL_SHIPPED_BATCH if "trl_shipped" in names else 1
    spec_path, data_summary = prepare_data(args, max(32, (args.warmup + args.steps) * args.grad_accum * batch_max),
                                           workdir)
    log(f"data: {data_summary['rows_selected']} rows, mean {data_summary['tokens_per_row_mean']} tokens")
    peaks = measure_peaks(machine)
    log(f"fp32 peak: theoretical {peaks['theoretical']['gflops']} GFLOP/s, torch.mm {peaks['empirical']['gflops']}")
    results = best_runs(run_rounds(names, spec_path, workdir, args, peaks))
    report = build_report(args, f"{COMMAND} " + " ".join(sys.argv[1:]), started, datetime.now(timezone.utc),
                          machine, versions(), peaks, data_summary, results, load_start, os.getloadavg(),
                          trl_shipped_default_error() if "trl_shipped" in names else None)
    out_dir = Path(args.out_dir)
    write_reports(report, out_dir)
    log(f"wrote {out_dir / 'train_speed.md'} and {out_dir / 'train_speed.json'} "
        f"({report['total_wall_s']} s in all); ratios {report['ratios']}")
    print((out_dir / "train_speed.md").read_text())
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def render_main(args) -> int:
    """Rebuild train_speed.{md,json} from a saved train_speed.json (same measurements, current report code)."""
    from .contenders import trl_shipped_default_error
    from .markdown import write_reports
    from .report import build_report, summarise, summary_peaks

    old = json.loads(Path(args.render).read_text())
    saved = argparse.Namespace(**old["args"])
    for k, v in vars(args).items():  # options added since the run keep their defaults
        if not hasattr(saved, k):
            setattr(saved, k, v)
    peaks, results = old["peak"], old["results"]
    for r in results.values():
        r["summary"] = summarise(r, saved.warmup, saved.layers, summary_peaks(peaks))
    started = datetime.fromisoformat(old["date"])
    finished = started + timedelta(seconds=old.get("total_wall_s", 0))
    report = build_report(saved, old["command"], started, finished, old["machine"], old["versions"], peaks,
                          old["data"], results, tuple(old["load"]["start"]), tuple(old["load"]["end"]),
                          trl_shipped_default_error() if "trl_shipped" in results else None)
    report["rendered"] = f"re-rendered {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {args.render}"
    out_dir = Path(args.out_dir)
    write_reports(report, out_dir)
    log(f"wrote {out_dir / 'train_speed.md'} and {out_dir / 'train_speed.json'}; ratios {report['ratios']}")
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.child:
        from .child import child_main

        return child_main(args.child, args.spec, args.result, args.progress)
    if args.render:
        return render_main(args)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.layers < 1 or args.steps < 1 or args.warmup < 0 or args.grad_accum < 1 or args.seq < 16:
        p.error("need --layers >= 1, --steps >= 1, --warmup >= 0, --grad_accum >= 1, --seq >= 16")
    return parent_main(args)
