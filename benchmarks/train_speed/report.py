"""Per-contender summaries, ratios, goals, load and notes: the report dict saved as train_speed.json."""

from __future__ import annotations

from .common import FULL_SIZE_LAYERS, QWEN25_15B, TRL_SHIPPED_BATCH
from .flops import FLOPS_FORMULA, flops_model, flops_per_token_gflop, training_flops

BASELINES = ("reference", "trl_tuned", "trl_shipped")


def unmeasured_summary(res: dict, steps: list, summary: dict) -> dict:
    """A contender without measured steps (killed): a speed bound from its unfinished micro-batch, and its
    warm-up steps, labelled as such."""
    mb = res.get("unfinished_micro_batch")
    if mb and mb.get("running_s"):
        summary["unfinished_micro_batch"] = mb
        summary["tokens_per_s_upper_bound"] = round(mb["tokens"] / mb["running_s"], 2)
    if steps:
        secs = sum(s["seconds"] for s in steps)
        summary["warmup_only_s_per_step"] = round(secs / len(steps), 1)
        summary["warmup_only_tokens_per_s"] = round(sum(s["tokens"] for s in steps) / secs, 2)
    return summary


def summarise(res: dict, warmup: int, fm_layers: int, peaks: dict) -> dict:
    steps = res.get("steps") or []
    measured = [s for s in steps if s["step"] > warmup]
    summary = {"steps_completed": len(steps), "steps_measured": len(measured)}
    if not measured:
        return unmeasured_summary(res, steps, summary)
    secs = sum(s["seconds"] for s in measured)
    toks = sum(s["tokens"] for s in measured)
    seqs = [n for s in measured for n in s["seq_lens"]]
    fl = training_flops(flops_model(fm_layers, res.get("gradient_checkpointing", True)), seqs)
    summary.update({
        "tokens_per_s": round(toks / secs, 2),
        "s_per_step": round(secs / len(measured), 2),
        "measured_tokens": toks, "measured_seconds": round(secs, 2), "measured_sequences": len(seqs),
        "mean_tokens_per_sequence": round(toks / len(seqs), 1),
        "padding_fraction": round(1 - toks / max(1, sum(s["padded_tokens"] for s in measured)), 3),
        "per_step_seconds": [round(s["seconds"], 2) for s in measured],
        # share of its threads' time the contender actually got on a CPU: 1.0 = all threads ran all the time;
        # well below 1 means other processes took cores (OpenMP threads then wait at barriers)
        "cpu_share": round(sum(s.get("cpu_seconds", 0) for s in measured) /
                           sum(s["seconds"] * s.get("threads", 1) for s in measured), 2)
        if all("cpu_seconds" in s for s in measured) else None,
        "model_gflops_per_s": round(fl["model_flops"] / secs / 1e9, 2),
        "executed_gflops_per_s": round(fl["executed_flops"] / secs / 1e9, 2),
        "model_flops_per_token": round(fl["model_flops_per_token"] / 1e9, 3),
    })
    for key, peak in peaks.items():
        if peak:
            summary[f"mfu_vs_{key}"] = round(fl["model_flops"] / secs / (peak * 1e9), 4)
            summary[f"hfu_vs_{key}"] = round(fl["executed_flops"] / secs / (peak * 1e9), 4)
    return summary


def summary_peaks(peaks: dict) -> dict:
    """The fp32 peaks the summaries' MFU columns use."""
    return {"theoretical": peaks["theoretical"]["gflops"], "empirical": peaks["empirical"]["gflops"]}


def tokens_per_s(results: dict, name: str):
    """A killed contender still counts if it finished measured steps; flagged as partial in the notes."""
    r = results.get(name)
    return r["summary"].get("tokens_per_s") if r else None


def ratios_of(results: dict) -> dict:
    """medlora's tokens/s over each baseline's; bounds where a baseline has no measured step."""
    ratios, med = {}, tokens_per_s(results, "medlora")
    for n in BASELINES:
        if n in results and "medlora" in results:
            ratios[f"vs_{n}"] = round(med / tokens_per_s(results, n), 2) if med and tokens_per_s(results, n) else None
    for key, suffix in (("tokens_per_s_upper_bound", "_at_least"), ("warmup_only_tokens_per_s", "_warmup_step_only")):
        for n in BASELINES:
            x = results.get(n, {}).get("summary", {}).get(key)
            if med and ratios.get(f"vs_{n}") is None and x:
                ratios[f"vs_{n}{suffix}"] = round(med / x, 2)
    for key in ("fp32", "int8"):
        mine = tokens_per_s(results, f"medlora_{key}")
        if mine:
            for n in ("reference", "trl_tuned") + (("medlora_fp32",) if key == "int8" else ()):
                if tokens_per_s(results, n):
                    ratios[f"{key}_vs_{n}"] = round(mine / tokens_per_s(results, n), 2)
    return ratios


def goals_of(results: dict, ratios: dict, args, machine: dict | None = None) -> dict:
    """Issue 5's goals: >= 2.0x reference, >= 1.5x TRL tuned, peak RSS < 20 GB (and issue 14's for int8, and for
    the fastest path on a CPU with native bf16)."""
    goals = int8_goals(results, ratios, machine or {}) | native_bf16_goal(results, machine or {})
    if goals and args.layers != FULL_SIZE_LAYERS:
        goals["note"] = f"measured with --layers {args.layers}; the goals apply to the full-size model"
    if not (tokens_per_s(results, "medlora") and "medlora" in results):
        return goals
    for key, name, target in (("vs_reference", "reference", 2), ("vs_trl_tuned", "TRL tuned", 1.5)):
        if ratios.get(key) is not None:
            goals[f">= {target:.1f}x {name}"] = f"{ratios[key]}x ({'met' if ratios[key] >= target else 'not met'})"
    rss = results["medlora"].get("peak_rss_gb")
    goals[f"peak RSS < 20 GB at seq {args.seq}"] = f"{rss} GB ({'met' if rss and rss < 20 else 'not met'})"
    if args.layers != FULL_SIZE_LAYERS:
        goals["note"] = f"measured with --layers {args.layers}; the goals apply to the full-size model"
    return goals


def int8_goals(results: dict, ratios: dict, machine: dict) -> dict:
    """Issue 14's goals for --precision int8 on a CPU without native bf16: >= 2.0x reference (stretch 2.5x), peak
    RSS at most half of the fp32 path's. On a CPU with native bf16 the figures are shown, marked as not that goal's
    measurement (they say nothing about a CPU without it)."""
    goals = {}
    # the goal is for CPUs without native bf16: measured on one with it, the ratio is no evidence for it
    where = " (goal for CPUs without native bf16; this one has it)" if machine.get("native_bf16") else ""
    if ratios.get("int8_vs_reference") is not None:
        r = ratios["int8_vs_reference"]
        verdict = f"{'met' if r >= 2 else 'not met'}{', stretch 2.5x met' if r >= 2.5 else ''}"
        goals[f"int8 >= 2.0x reference{where}"] = f"{r}x ({'not applicable' if where else verdict})"
    rss8, rss32 = (results.get(n, {}).get("peak_rss_gb") for n in ("medlora_int8", "medlora_fp32"))
    if rss8 and rss32:
        verdict = "not applicable" if where else ("met" if rss8 <= rss32 / 2 else "not met")
        goals[f"int8 peak RSS <= half of fp32's{where}"] = f"{rss8} GB vs {rss32} GB ({verdict})"
    return goals


def native_bf16_goal(results: dict, machine: dict) -> dict:
    """Issue 14's goal on a CPU with native bf16: the fastest medlora path (whichever of the default, fp32 and
    int8 contenders ran) >= 3.5x the reference."""
    ref = tokens_per_s(results, "reference")
    mine = {n: tokens_per_s(results, n) for n in ("medlora", "medlora_fp32", "medlora_int8")}
    mine = {n: v for n, v in mine.items() if v}
    if not (machine.get("native_bf16") and ref and mine):
        return {}
    best = max(mine, key=mine.get)
    r = round(mine[best] / ref, 2)
    return {"fastest medlora path >= 3.5x reference (native bf16 CPU)":
            f"{r}x, {best} ({'met' if r >= 3.5 else 'not met'})"}


def load_of(results: dict, load_start, load_end) -> dict:
    """Whether other processes competed for the cores, and the note that says so."""
    others = [r.get("other_load_cores") for r in results.values() if r.get("other_load_cores") is not None]
    shares = [r["summary"].get("cpu_share") for r in results.values() if r["summary"].get("cpu_share")]
    busy = max(others, default=0) >= 0.25 or min(shares, default=1) < 0.9
    spread = []
    for n, r in results.items():
        v = [x["tokens_per_s"] for x in r.get("all_rounds", []) if x.get("tokens_per_s")]
        if len(v) > 1:
            spread.append(f"{n} {min(v)}-{max(v)}")
    note = (f"loadavg at start {tuple(round(x, 2) for x in load_start)}, at end "
            f"{tuple(round(x, 2) for x in load_end)}; CPU used by other processes while each contender ran: "
            + ", ".join(f"{n} {r.get('other_load_cores')} cores (CPU share {r['summary'].get('cpu_share')})"
                        for n, r in results.items())
            + ("; round-to-round spread of tokens/s: " + ", ".join(spread) if spread else "")
            + (". **The machine was busy: other processes competed for the cores, so absolute numbers are low "
               "and ratios are noisier than on an idle machine.**" if busy else ". The machine was otherwise idle."))
    return {"start": load_start, "end": load_end, "busy": busy, "note": note}


def general_notes(args) -> list[str]:
    return [
        "medlora runs with TrainConfig defaults except output_dir, max_seq_len (= --seq), gradient_accumulation_steps, "
        "max_steps and save_steps (set past max_steps so that no checkpoint save lands in the timed steps), and, "
        "as `medlora train` does, with its loaded libraries frozen out of the garbage collector "
        "(medlora.allocator.freeze_loaded_objects).",
        f"Each contender runs in its own subprocess, sequentially ({args.rounds} interleaved round(s); the table "
        "shows each contender's fastest run, every round is in the JSON under all_rounds), on the same data (identical rows; "
        "the batch-1 contenders also get the same row order, since they share the sampler seed 42).",
        "reference and medlora see the tokens of medlora.data.encode_frame; TRL tokenises the same rows itself "
        "(prompt/completion conversational format, same system prompt), so its token counts can differ slightly; "
        "tokens/s normalises for that.",
        "TRL 1.x patches the model with a chunked 'fused LM head' (no full logits tensor); on CPU it scores every "
        "position, not only the completion ones (only Triton devices skip masked positions).",
    ]


def trl_shipped_notes(shipped: dict, machine: dict, shipped_error: str | None) -> list[str]:
    notes = []
    shipped_error = (shipped.get("settings") or {}).get("error_with_pure_defaults") or shipped_error
    if shipped_error:
        notes.append("TRL as shipped does not start on a CPU-only machine: SFTConfig() with its defaults raises "
                     f"'{shipped_error}'. The benchmark then adds use_cpu=True, the fix the message asks for, and "
                     "measures that.")
    ws = shipped["summary"]
    if ws.get("warmup_only_tokens_per_s"):
        notes.append(f"TRL as shipped finished only warm-up step(s) before its timeout: "
                     f"{ws['warmup_only_tokens_per_s']} tokens/s, {ws['warmup_only_s_per_step']} s/step over them "
                     "(one-time costs included, so this slightly understates it); the ratio "
                     "`vs_trl_shipped_warmup_step_only` uses that number.")
    notes.append("TRL as shipped = SFTConfig defaults except output_dir, max_steps, report_to, save_strategy, "
                 "disable_tqdm, grad accumulation (and use_cpu, see above): bf16 autocast (SFTConfig turns bf16 on by default, also on "
                 f"CPUs; this CPU has avx512_bf16: {machine['flags']['avx512_bf16']}), "
                 f"per_device_train_batch_size {TRL_SHIPPED_BATCH}, max_length 1024, gradient checkpointing on. "
                 "Its tokens/s count real (non-padding) tokens only: padding is waste it pays for.")
    return notes


def same_settings_note(results: dict) -> list[str]:
    """When medlora ran with the reference's precision, checkpointing and batch, a ratio near 1 is expected."""
    med_r, ref_r = results.get("medlora"), results.get("reference")
    if not (med_r and ref_r and med_r.get("ok") and ref_r.get("ok")):
        return []

    def eff(r):
        e = (r.get("settings") or {}).get("effective", {})
        return e.get("bf16"), r.get("gradient_checkpointing"), e.get("per_device_train_batch_size")

    if eff(med_r) != eff(ref_r):
        return []
    return ["medlora's default path ran with the reference's precision, checkpointing and batch size "
            f"(bf16 {eff(med_r)[0]}, gradient checkpointing {eff(med_r)[1]}, batch {eff(med_r)[2]}): "
            "unless other speed work has landed, a ratio near 1 is expected and the difference from 1 "
            "shows the measurement noise (see the round-to-round spread)."]


def notes_of(args, machine: dict, peaks: dict, results: dict, shipped_error: str | None) -> list[str]:
    notes = general_notes(args)
    if "trl_shipped" in results:
        notes += trl_shipped_notes(results["trl_shipped"], machine, shipped_error)
    if peaks["empirical"]["gflops"] > peaks["theoretical"]["gflops"]:
        notes.append(f"The measured torch.mm rate ({peaks['empirical']['gflops']} GFLOP/s) beats the theoretical "
                     f"peak at the reported clock ({peaks['theoretical']['gflops']} GFLOP/s): the cores run above the "
                     "'cpu MHz' the hypervisor reports (boost), so the theoretical % overstates utilisation; the "
                     "torch.mm column is the tighter bound.")
    notes += same_settings_note(results)
    if args.layers != FULL_SIZE_LAYERS:
        notes.append(f"Reduced model (--layers {args.layers}): use only for iteration; quote full-size numbers.")
    notes += [f"{n}: {r.get('error')} (log: {r.get('log')})" for n, r in results.items() if not r.get("ok")]
    notes += [f"partial result, {n}: {r.get('error')}; its tokens/s come from the {r['summary']['steps_measured']} "
              "measured step(s) it finished" for n, r in results.items()
              if not r.get("ok") and r["summary"].get("tokens_per_s")]
    return notes


def build_report(args, command, started, finished, machine, versions, peaks, data_summary, results,
                 load_start, load_end, shipped_error) -> dict:
    ratios = ratios_of(results)
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "spec", "result", "progress")},
        "machine": machine, "versions": versions, "peak": peaks,
        "load": load_of(results, load_start, load_end),
        "data": data_summary,
        "model": {**QWEN25_15B, "num_hidden_layers": args.layers, "init": "random (torch.manual_seed(0))"},
        "model_parameters": next((r["model_parameters"] for r in results.values() if r.get("model_parameters")), 0),
        "flops_formula": FLOPS_FORMULA,
        "flops_per_token_gflop_at_mean_len": flops_per_token_gflop(args.layers,
                                                                   int(data_summary["tokens_per_row_mean"])),
        "results": {n: {k: v for k, v in r.items() if k not in ("steps",)} | {"steps": r.get("steps")}
                    for n, r in results.items()},
        "ratios": ratios, "goals": goals_of(results, ratios, args, machine),
        "notes": notes_of(args, machine, peaks, results, shipped_error),
        "total_wall_s": round((finished - started).total_seconds(), 1),
    }
