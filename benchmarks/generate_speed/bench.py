"""Parent: prepare the models once (random LoRA adapter, merged GGUF exports), run every contender in its own
process one after another, write JSON + a Markdown table. Child (``--child``): load one contender, time it.

Measured per contender: greedy decode tokens/s over a 128-token answer (end-of-turn ignored, so every contender
decodes the same number of tokens), time to first token for a ~300-token prompt (prefill + one token), and the
child's peak RSS (VmHWM). Never pass/fail: the ratios are against today's path in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.train_speed.common import LORA_TARGETS, QWEN25_15B
from benchmarks.train_speed.machine import machine_info

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("smollm2-135m", "qwen2.5-1.5b-arch")
CONTENDERS = ("hf_unmerged", "hf_merged", "llamacpp_f16", "llamacpp_q8_0", "llamacpp_q4_0")
TODAY, DEFAULT = "hf_unmerged", "llamacpp_q8_0"  # what chat/eval did before --backend; what auto runs now
QUESTION = "What are the symptoms of iron deficiency anemia, and when should I see a doctor?"


def log(msg: str) -> None:
    print(f"[generate_speed {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def long_prompt(tok, n_tokens: int) -> list[dict]:
    """A chat whose prompt is about ``n_tokens`` tokens: bundled sample answers as context, then a question."""
    import pandas as pd

    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    answers = pd.read_csv(ROOT / "data" / "sample_medical_qa.csv")["Answer"]
    context, i = "", 0
    while True:
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": f"Notes:\n{context}\n\nQuestion: {QUESTION}"}]
        if len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)) >= n_tokens or i >= len(answers):
            return messages
        context += answers[i] + "\n"
        i += 1


# ---------------------------------------------------------------- preparation (parent, cached in --workdir)

def prepare(model: str, workdir: Path, quants: list[str]) -> dict:
    """The base model folder, a random non-zero LoRA adapter for it, and the merged model as GGUF files."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from medlora.export.gguf import write_gguf
    from medlora.model import load_tokenizer, smollm2_folder

    home = workdir / model
    tok = load_tokenizer(str(smollm2_folder()))
    base = smollm2_folder() if model == "smollm2-135m" else home / "base"
    if not (base / "config.json").is_file():  # Qwen2.5-1.5B shapes, random weights; SmolLM2's tokenizer
        log(f"building {model} with random weights in {base} (once)")
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(Qwen2Config(**{**QWEN25_15B, "use_cache": True}), dtype=torch.float32)
        net.save_pretrained(base)
        tok.save_pretrained(base)
        del net
    adapter = home / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(1)
        net = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
        get_peft_model(net, lora).save_pretrained(adapter)
        del net
    ggufs = {q: home / f"merged-{q}.gguf" for q in quants}
    missing = [q for q, p in ggufs.items() if not p.is_file()]
    if missing:
        net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        adapter).merge_and_unload()
        for q in missing:
            log(f"exporting {model} (adapter merged) to {q}")
            write_gguf(net, tok, ggufs[q], q, name=model)
        del net
    return {"base": str(base), "adapter": str(adapter), "gguf": {q: str(p) for q, p in ggufs.items()}}


# ---------------------------------------------------------------- one contender (child)

def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_hf(paths: dict, merged: bool, messages: list[dict], new_tokens: int, threads: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from medlora.model import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(paths["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32),
                                      paths["adapter"])
    if merged:
        model = model.merge_and_unload()
    model.eval()

    class Clock(BaseStreamer):  # generate() calls put() with the prompt first, then once per new token
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def once(msgs, n):
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=clock,
                           pad_token_id=tok.pad_token_id)
        new = clock.times[1:]
        return {"prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": len(new), "ttft_s": new[0] - t0,
                "decode_tokens_per_s": (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else None}

    once([{"role": "user", "content": "Hi"}], 4)  # warm-up
    return {"decode": once([{"role": "user", "content": QUESTION}], new_tokens), "prefill": once(messages, 1)}


def run_llamacpp(paths: dict, quant: str, messages: list[dict], new_tokens: int, threads: int) -> dict:
    from medlora.inference.llamacpp import load_llamacpp_backend

    backend = load_llamacpp_backend(paths["gguf"][quant], threads=threads)

    def once(msgs, n):
        prompt = backend.tokenize(backend.format_prompt(msgs))
        t0 = time.perf_counter()
        reply = backend._call("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                                              "ignore_eos": True, "cache_prompt": False})
        wall = time.perf_counter() - t0
        t = reply["timings"]
        per_token = t["predicted_ms"] / max(t["predicted_n"], 1) / 1000
        return {"prompt_tokens": len(prompt), "new_tokens": t["predicted_n"], "wall_s": wall,
                "ttft_s": t["prompt_ms"] / 1000 + per_token, "decode_tokens_per_s": t["predicted_per_second"]}

    once([{"role": "user", "content": "Hi"}], 4)  # warm-up
    return {"decode": once([{"role": "user", "content": QUESTION}], new_tokens), "prefill": once(messages, 1)}


def child(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    from medlora.model import load_tokenizer

    messages = long_prompt(load_tokenizer(spec["paths"]["base"]), spec["prompt_tokens"])
    t0 = time.perf_counter()
    if args.child.startswith("hf_"):
        out = run_hf(spec["paths"], args.child == "hf_merged", messages, spec["new_tokens"], spec["threads"])
    else:
        out = run_llamacpp(spec["paths"], args.child.removeprefix("llamacpp_"), messages, spec["new_tokens"],
                           spec["threads"])
    out.update(peak_rss_gb=round(vm_hwm_gb(), 3), seconds=round(time.perf_counter() - t0, 1))
    Path(args.result).write_text(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------- report

def table(results: dict) -> str:
    lines = ["| model | contender | decode tokens/s | x today | time to first token (prompt tokens) | peak RSS GB |",
             "|---|---|---:|---:|---:|---:|"]
    for model, rows in results.items():
        today = (rows.get(TODAY) or {}).get("decode", {}).get("decode_tokens_per_s")
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {name} | failed: {r['error'][:80]} | | | |")
                continue
            tps = r["decode"]["decode_tokens_per_s"]
            ratio = f"{tps / today:.1f}x" if today else ""
            label = name + (" (today)" if name == TODAY else " (default)" if name == DEFAULT else "")
            lines.append(f"| {model} | {label} | {tps:.1f} | {ratio} | {r['prefill']['ttft_s']:.2f} s "
                         f"({r['prefill']['prompt_tokens']}) | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate_speed", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default="/tmp/medlora-generate-speed", help="cached models and exports")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--timeout", type=float, default=1200, help="seconds per contender")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    models = [m for m in args.models.split(",") if m]
    contenders = [c for c in args.only.split(",") if c]
    bad = [x for x in models if x not in MODELS] + [x for x in contenders if x not in CONTENDERS]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quants = sorted({c.removeprefix("llamacpp_") for c in contenders if c.startswith("llamacpp_")})
    machine = machine_info()
    log(f"CPU: {machine['cpu_model']}; flags: {', '.join(f for f, on in machine['flags'].items() if on)}; "
        f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    results: dict = {}
    for model in models:
        paths = prepare(model, workdir, quants)
        results[model] = {}
        for name in contenders:
            spec = workdir / f"{model}-{name}.spec.json"
            out = workdir / f"{model}-{name}.result.json"
            out.unlink(missing_ok=True)
            spec.write_text(json.dumps({"paths": paths, "new_tokens": args.new_tokens, "threads": args.threads,
                                        "prompt_tokens": args.prompt_tokens}))
            log(f"{model}: {name} (load average {os.getloadavg()[0]:.2f})")
            cmd = [sys.executable, "-m", "benchmarks.generate_speed", "--child", name, "--spec", str(spec),
                   "--result", str(out)]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout, capture_output=True, text=True)
                error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                error = f"timed out after {args.timeout:.0f} s"
            results[model][name] = {"error": error} if error else json.loads(out.read_text())
            if not error:
                r = results[model][name]
                log(f"  {r['decode']['decode_tokens_per_s']:.1f} tokens/s, time to first token "
                    f"{r['prefill']['ttft_s']:.2f} s, peak RSS {r['peak_rss_gb']:.2f} GB")
    report = {"date": datetime.now().isoformat(timespec="seconds"), "machine": machine,
              "load_average_after": os.getloadavg()[0],
              "settings": {k: getattr(args, k) for k in ("new_tokens", "prompt_tokens", "threads")},
              "today": TODAY, "default": DEFAULT, "results": results}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generate_speed.json").write_text(json.dumps(report, indent=2))
    flags = ", ".join(f for f, on in machine["flags"].items() if on)
    md = (f"# Generation speed\n\n{machine['cpu_model']} ({flags}), {args.threads} threads, "
          f"{report['date']}. Greedy, {args.new_tokens} new tokens; time to first token for a "
          f"~{args.prompt_tokens}-token prompt. `x today` = decode tokens/s / {TODAY}'s.\n\n{table(results)}\n")
    (out_dir / "generate_speed.md").write_text(md)
    print(md)
    return 0
