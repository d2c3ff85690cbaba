"""train_speed.md (the table, machine, method and notes) and train_speed.json from a report dict."""

from __future__ import annotations

import json
from pathlib import Path

from .common import FULL_SIZE_LAYERS

LABELS = {
    "reference": "reference (HF Trainer + PEFT, spec settings)",
    "medlora": "medlora default path",
    "medlora_fp32": "medlora with --precision fp32 (its default path on CPUs without native bf16)",
    "medlora_int8": "medlora with --precision int8 (int8 frozen base weights, fp32 LoRA)",
    "trl_tuned": "TRL SFTTrainer, tuned for CPU (fp32, bs 1, max_length = seq)",
    "trl_shipped": "TRL SFTTrainer, as shipped (bf16, bs 8, max_length 1024)",
}
TABLE_HEAD = [
    "| contender | status | tokens/s | s/step | seq/step | tok/seq | peak RSS GB | grad ckpt | dtype | allocator | "
    "CPU share | model GFLOP/s | % fp32 peak (theor.) | % fp32 peak (mm) |",
    "|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|",
]


def dtype_label(eff: dict) -> str:
    if not eff:
        return "—"
    if eff.get("int8_linears"):
        return "int8 frozen weights, fp32 activations"
    if not eff.get("bf16"):
        return "fp32"
    return "bf16 weights + autocast" if eff.get("frozen_weights_dtype") == "torch.bfloat16" else "bf16 autocast"


def fmt(x, nd=2):
    return "—" if x is None else f"{x:,.{nd}f}"


def pct(x) -> str:
    return fmt(100 * x, 1) if x else "—"


def status_of(r: dict) -> str:
    s = r["summary"]
    status = "ok" if r.get("ok") else (r.get("error") or "failed")
    if not r.get("ok") and s.get("warmup_only_s_per_step"):
        status += f" ({s['steps_completed']} warm-up step(s) done: {s['warmup_only_s_per_step']} s/step)"
    elif not r.get("ok") and s.get("steps_measured"):
        status += f" (partial: {s['steps_measured']} measured step(s))"
    if not r.get("ok") and s.get("tokens_per_s_upper_bound") is not None:
        mb = s["unfinished_micro_batch"]
        status += (f"; its micro-batch of step {mb['step']} ({mb['tokens']} tokens) was still running after "
                   f"{mb['running_s']:.0f} s: < {s['tokens_per_s_upper_bound']} tokens/s")
    return status


def table_row(name: str, r: dict) -> str:
    s = r["summary"]
    eff = (r.get("settings") or {}).get("effective", {})
    seq_step = (s["measured_sequences"] / s["steps_measured"]) if s.get("steps_measured") else None
    ckpt = "on" if r.get("gradient_checkpointing") else ("off" if "gradient_checkpointing" in r else "—")
    cells = [LABELS.get(name, name), status_of(r), fmt(s.get("tokens_per_s")), fmt(s.get("s_per_step"), 1),
             fmt(seq_step, 0), fmt(s.get("mean_tokens_per_sequence"), 0), fmt(r.get("peak_rss_gb")), ckpt,
             dtype_label(eff), (eff.get("allocator") or "—").split(" (")[0], fmt(s.get("cpu_share")), fmt(s.get("model_gflops_per_s"), 1),
             pct(s.get("mfu_vs_theoretical")), pct(s.get("mfu_vs_empirical"))]
    return "| " + " | ".join(cells) + " |"


def headline(report: dict) -> list[str]:
    a = report["args"]
    return [
        "# medlora training speed benchmark",
        "",
        f"{report['date']} · `{report['command']}`",
        "",
        f"Model: Qwen2.5-1.5B architecture, random weights, **{a['layers']} layer(s)**"
        + (" (full size)" if a["layers"] == FULL_SIZE_LAYERS else " (reduced: not the headline numbers)")
        + f", {report['model_parameters']:,} parameters. Data: {report['data']['rows_selected']} MedQuAD rows, "
        f"mean {report['data']['tokens_per_row_mean']} tokens (SmolLM2 tokenizer, max_seq_len {a['seq']}). "
        f"{a['warmup']} warm-up step(s) excluded, {a['steps']} measured; gradient accumulation {a['grad_accum']}.",
        "",
    ]


def results_lines(report: dict) -> list[str]:
    lines = TABLE_HEAD + [table_row(name, r) for name, r in report["results"].items()]
    lines += ["", "**medlora / contender (tokens/s):** " + (", ".join(
        f"`{k}` = {v if v is not None else 'n/a'}" for k, v in report["ratios"].items()) or "n/a"), ""]
    if report.get("goals"):
        lines += ["**Goals** (full size): " + "; ".join(f"{k}: {v}" for k, v in report["goals"].items()), ""]
    return lines


def machine_lines(report: dict) -> list[str]:
    m, p = report["machine"], report["peak"]
    flags = "- flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items())
    if "native_bf16" in m:  # reports written before this key existed render as they did
        flags += (f"; native bf16 matmuls (AVX512-BF16 or AMX): {'yes' if m['native_bf16'] else 'no'}"
                  f" (medlora's default precision here: {'bf16' if m['native_bf16'] else 'fp32'})")
    return [
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}, "
        f"{p['theoretical']['microarchitecture']}), {m['physical_cores']} cores / {m['logical_cpus']} logical, "
        f"{m['cpu_mhz']} MHz{', under a hypervisor' if m['hypervisor'] else ''}",
        flags,
        f"- RAM {m['ram_gb']} GB; Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- load: {report['load']['note']}",
        "",
    ]


def method_lines(report: dict) -> list[str]:
    p = report["peak"]
    lines = [
        "## How the numbers are computed",
        "",
        "- tokens/s = real (non-padding) tokens, prompt included, in the measured optimizer steps / their wall time "
        "(a step = grad_accum micro-batches + the optimizer step, timed by a TrainerCallback at each step end).",
        "- peak RSS = the child process's VmHWM while it trains, the model's resting memory included (each contender "
        "runs in a fresh process; VmHWM is reset through /proc/self/clear_refs once the model is built, because every "
        "model is built in fp32 first: the build peak is in the JSON as `build_peak_rss_gb`; `ru_maxrss` would "
        "inherit the forking parent's RSS). For a killed child, the parent's 0.5 s psutil poll of the child's RSS.",
        f"- fp32 peak, theoretical: {p['theoretical']['formula']} = {p['theoretical']['gflops']} GFLOP/s. "
        f"{p['theoretical']['assumption']}.",
        f"- fp32 peak, measured: {p['empirical']['method']} = {p['empirical']['gflops']} GFLOP/s.",
    ]
    if p.get("empirical_bf16"):
        lines.append(f"- bf16 peak, measured: {p['empirical_bf16']['method']} = {p['empirical_bf16']['gflops']} "
                     "GFLOP/s (native bf16 dot products).")
    return lines + [
        "- model FLOPs (the same useful work for every contender): " + report["flops_formula"],
        "- CPU share = the contender's process CPU time / (wall time x torch threads) over the measured steps: "
        "1.00 means its threads had the cores to themselves; lower means other processes took cores (and the "
        "OpenMP threads then wait for each other), so its tokens/s are depressed.",
        "- % peak = model FLOP/s / peak FLOP/s (MFU-style; executed FLOP/s including the checkpointing recompute "
        "is in the JSON as `hfu_vs_*`). TRL as shipped and medlora on a CPU with native bf16 run bf16 matmuls, whose "
        "peak is higher (see the measured bf16 torch.mm peak above, where the CPU has native bf16), so their "
        "fp32-peak fractions are only indicative.",
        "",
    ]


def write_reports(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = headline(report) + results_lines(report) + machine_lines(report) + method_lines(report)
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    (out_dir / "train_speed.md").write_text("\n".join(lines) + "\n")
