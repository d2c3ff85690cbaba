#!/usr/bin/env python
"""CPU LoRA training speed: medlora's default path against the reference recipe and TRL's SFTTrainer.

One run measures, on the same machine and the same data, tokens/s (trained tokens, prompt included),
seconds per optimizer step and peak RSS for:

  reference    the specification's settings through plain HF Trainer + PEFT, written here (fp32,
               gradient checkpointing on with use_reentrant=False, batch 1, answer-only labels)
  trl_shipped  TRL SFTTrainer + PEFT LoRA, completion-only loss, SFTConfig defaults (bf16 autocast on,
               batch 8, max_length 1024, gradient checkpointing on)
  trl_tuned    the same, tuned for this CPU: fp32, batch 1, max_length = --seq, its default checkpointing
  medlora      medlora.train.prepare_model + medlora.train.build_trainer with TrainConfig defaults
  medlora_fp32 the same with precision="fp32": medlora's default path on CPUs without native bf16

The model is the Qwen2.5-1.5B architecture with random weights (identical FLOPs, no download); the data
are real MedQuAD rows tokenised with the bundled SmolLM2 tokenizer through medlora.data.encode_frame.
Each contender runs in its own subprocess, so its peak RSS is its own. Results go to
benchmarks/results/train_speed.{md,json}.

    python benchmarks/train_speed.py                    # full size, all four contenders
    python benchmarks/train_speed.py --layers 2         # quick variant for iteration
    python benchmarks/train_speed.py --only reference,medlora --steps 3 --warmup 1 --grad_accum 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medquad.csv"
CONTENDERS = ("reference", "medlora", "medlora_fp32", "trl_tuned", "trl_shipped")  # run order: slowest-to-fail last
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
TRL_SHIPPED_BATCH = 8  # TrainingArguments' per_device_train_batch_size default (SFTConfig keeps it)

# Qwen2.5-1.5B(-Instruct) architecture: same shapes, hence the same FLOPs, as the real model.
QWEN25_15B = dict(
    hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0, use_cache=False,
)


def log(msg: str) -> None:
    print(f"[train_speed {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ==================================================================== machine facts and peak FLOP/s

def cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    for line in first.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def machine_info() -> dict:
    import psutil

    ci = cpuinfo()
    flags = set(ci.get("flags", "").split())
    mem = psutil.virtual_memory()
    out = {
        "cpu_model": ci.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": ci.get("vendor_id"),
        "cpu_family": int(ci["cpu family"]) if "cpu family" in ci else None,
        "cpu_model_number": int(ci["model"]) if ci.get("model", "").isdigit() else None,
        "cpu_mhz": float(ci["cpu MHz"]) if "cpu MHz" in ci else None,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "hypervisor": "hypervisor" in flags,
        "ram_gb": round(mem.total / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    return out


def microarchitecture(m: dict) -> tuple[str, int, str]:
    """(name, fp32 FLOPs per cycle per core, assumption) for the detected CPU."""
    fam, model, vendor, flags = m.get("cpu_family"), m.get("cpu_model_number"), m.get("cpu_vendor"), m["flags"]
    if vendor == "AuthenticAMD" and fam == 25:
        zen4 = model is not None and (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF)
        if zen4:
            return ("Zen 4", 32, "Zen 4 executes AVX-512 as 2x256-bit: 2 FMA pipes x 8 fp32 lanes x 2 FLOPs per FMA "
                                 "= 32 fp32 FLOPs/cycle/core (the same as AVX2)")
        return ("Zen 3", 32, "Zen 3 AVX2+FMA: 2 FMA pipes x 8 fp32 lanes x 2 FLOPs per FMA = 32 fp32 FLOPs/cycle/core")
    if vendor == "AuthenticAMD" and fam == 26:
        return ("Zen 5", 64, "Zen 5 (server cores) with full 512-bit datapath: 2 FMA pipes x 16 fp32 lanes x 2 = 64 "
                             "FLOPs/cycle/core; desktop/mobile parts execute AVX-512 as 2x256-bit (32)")
    if flags.get("avx512f"):
        return ("AVX-512", 64, "AVX-512 with 2 FMA units: 2 x 16 fp32 lanes x 2 = 64 FLOPs/cycle/core "
                               "(parts with one 512-bit FMA unit reach half)")
    if flags.get("avx2") and flags.get("fma"):
        return ("AVX2+FMA", 32, "AVX2 with 2 FMA units: 2 x 8 fp32 lanes x 2 = 32 FLOPs/cycle/core")
    return ("SSE", 8, "no AVX2/FMA: assumed 8 fp32 FLOPs/cycle/core")


def theoretical_peak(m: dict) -> dict:
    name, per_cycle, assumption = microarchitecture(m)
    cores = m.get("physical_cores") or m.get("logical_cpus") or 1
    ghz = (m.get("cpu_mhz") or 0) / 1000
    peak = cores * ghz * 1e9 * per_cycle
    return {
        "microarchitecture": name,
        "flops_per_cycle_per_core": per_cycle,
        "cores": cores,
        "clock_ghz": round(ghz, 3),
        "gflops": round(peak / 1e9, 1),
        "formula": f"{cores} cores x {ghz:.3f} GHz x {per_cycle} fp32 FLOPs/cycle/core",
        "assumption": assumption + "; clock = 'cpu MHz' of /proc/cpuinfo (nominal clock under a hypervisor; "
                                   "boost clocks, if any, are not visible, so the real peak may be higher)",
    }


def empirical_peak(n: int = 4096, reps: int = 5, dtype: str = "float32") -> dict:
    """Best of `reps` torch.mm of n x n in `dtype`, all threads."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"gflops": round(2 * n**3 / best / 1e9, 1), "method": f"best of {reps} {dtype} torch.mm {n}x{n}, "
            f"{torch.get_num_threads()} threads (2*n^3 FLOPs)", "seconds": round(best, 3)}


# ==================================================================== model FLOPs per token

def flops_model(layers: int, gradient_checkpointing: bool, lora_r: int = 8) -> dict:
    """Per-token FLOPs of one LoRA training micro-step on the Qwen2.5-1.5B shapes (attention separate)."""
    h, inter, v = QWEN25_15B["hidden_size"], QWEN25_15B["intermediate_size"], QWEN25_15B["vocab_size"]
    kv = h // QWEN25_15B["num_attention_heads"] * QWEN25_15B["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    layer_params = sum(i * o for i, o in shapes)
    lora_params = sum(lora_r * (i + o) for i, o in shapes)
    return {"layer_linear_params": layer_params * layers, "lm_head_params": h * v,
            "lora_params": lora_params * layers, "layers": layers, "hidden": h,
            "gradient_checkpointing": gradient_checkpointing}


def training_flops(fm: dict, seq_lens: list[int], gradient_checkpointing: bool | None = None) -> dict:
    """FLOPs of training on sequences of the given lengths.

    forward  = 2*(N_layers + N_lm_head + N_lora) per token + causal attention 2*L*d*s*(s+1) per sequence
               (QK^T and AV: 2 matmuls x 2 FLOPs x d per (query, key) pair, s(s+1)/2 pairs under the causal mask)
    backward = activation gradients only for the frozen weights: 2*(N_layers + N_lm_head) per token
               + LoRA input and weight gradients 2*2*N_lora + attention backward 2x its forward
    recompute (gradient checkpointing): + the decoder layers' forward once more (not the LM head)
    'model' FLOPs = forward + backward (the useful work, identical for every contender);
    'executed' FLOPs add the recompute where the contender checkpoints.
    """
    gc = fm["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    tokens = sum(seq_lens)
    L, d = fm["layers"], fm["hidden"]
    attn_fwd = sum(2 * L * d * s * (s + 1) for s in seq_lens)
    layers_fwd = 2 * fm["layer_linear_params"] * tokens + 2 * fm["lora_params"] * tokens + attn_fwd
    head_fwd = 2 * fm["lm_head_params"] * tokens
    fwd = layers_fwd + head_fwd
    bwd = 2 * (fm["layer_linear_params"] + fm["lm_head_params"]) * tokens + 4 * fm["lora_params"] * tokens + 2 * attn_fwd
    model = fwd + bwd
    executed = model + (layers_fwd if gc else 0)
    return {"tokens": tokens, "model_flops": model, "executed_flops": executed,
            "model_flops_per_token": model / tokens if tokens else 0.0}


# ==================================================================== data (parent)

def prepare_data(args, n_rows: int, workdir: Path) -> tuple[Path, dict]:
    """Deterministic rows of MedQuAD, tokenised through medlora.data.encode_frame; written for the children."""
    import numpy as np

    from medlora.config import DEFAULT_SYSTEM_PROMPT
    from medlora.data import encode_frame, load_qa_csv
    from medlora.model import load_tokenizer, smollm2_folder

    tok_dir = str(smollm2_folder())
    tok = load_tokenizer(tok_dir)
    df, report = load_qa_csv(args.data)
    order = np.random.default_rng(args.data_seed).permutation(len(df))
    rows, feats, lens, prompt_lens, truncated = [], [], [], [], 0
    for i in order:
        one = df.iloc[[int(i)]]
        enc = encode_frame(tok, one, DEFAULT_SYSTEM_PROMPT, args.seq)
        if not enc.examples:  # prompt alone longer than --seq
            continue
        ex = enc.examples[0]
        rows.append({"question": one["Question"].iloc[0], "answer": one["Answer"].iloc[0], "csv_row": int(i)})
        feats.append({k: ex[k] for k in ("input_ids", "attention_mask", "labels")})
        lens.append(len(ex["input_ids"]))
        prompt_lens.append(ex["prompt_len"])
        truncated += bool(ex["truncated"])
        if len(rows) == n_rows:
            break
    spec = {"rows": rows, "features": feats, "tokenizer_dir": tok_dir, "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "seq": args.seq, "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
            "grad_accum": args.grad_accum, "seed": 42}
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    summary = {
        "csv": str(Path(args.data).resolve()), "csv_rows_usable": report.rows_kept, "rows_selected": len(rows),
        "selection": f"first {len(rows)} rows of np.random.default_rng({args.data_seed}).permutation(usable rows) "
                     f"whose prompt fits --seq",
        "tokenizer": "bundled SmolLM2-135M-Instruct (medlora.model.smollm2_folder)",
        "tokens_per_row_mean": round(sum(lens) / len(lens), 1), "tokens_per_row_min": min(lens),
        "tokens_per_row_max": max(lens), "prompt_tokens_mean": round(sum(prompt_lens) / len(prompt_lens), 1),
        "answers_truncated_at_seq": truncated,
    }
    return path, summary


# ==================================================================== child: one contender

def build_random_model(layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN25_15B, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    return model


def training_args_kwargs(wanted: dict) -> dict:
    """Map names renamed across transformers versions to what the installed TrainingArguments accepts."""
    import dataclasses

    from transformers import TrainingArguments

    accepted = {f.name for f in dataclasses.fields(TrainingArguments)}
    renamed = {"gradient_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
               "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
               "warmup_ratio": ("warmup_ratio", "warmup_steps"), "use_cpu": ("use_cpu", "no_cuda")}
    out = {}
    for k, v in wanted.items():
        name = next((n for n in renamed.get(k, (k,)) if n in accepted), None)
        if name is not None:
            out[name] = v
    return out


def build_reference(spec, model, tok, out):
    """The specification's recipe, written independently of medlora's code."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=LORA_TARGETS))
    args = TrainingArguments(**training_args_kwargs(dict(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=2e-4, weight_decay=0.0, lr_scheduler_type="cosine", warmup_ratio=0.03, optim="adamw_torch",
        max_steps=spec["warmup"] + spec["steps"], logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, fp16=False, bf16=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, seed=spec["seed"], disable_tqdm=True)))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return Trainer(model=model, args=args, train_dataset=spec["features"], data_collator=collator,
                   processing_class=tok)


def build_medlora(spec, model, tok, out, **config):
    """medlora's default training path: whatever TrainConfig's defaults and build_trainer do today
    (``config``: fields to override, e.g. precision="fp32" for its path on CPUs without native bf16)."""
    import torch

    from medlora.config import TrainConfig
    from medlora.train import build_trainer, prepare_model

    import dataclasses

    overrides = dict(output_dir=str(out), max_seq_len=spec["seq"], gradient_accumulation_steps=spec["grad_accum"],
                     max_steps=spec["warmup"] + spec["steps"], **config)
    if "save_steps" in {f.name for f in dataclasses.fields(TrainConfig)}:
        # Checkpoints every save_steps optimizer steps are part of a real run (every 32 samples by default); with
        # the benchmark's short steps they would land inside the timed window far more often, so none is written.
        overrides["save_steps"] = spec["warmup"] + spec["steps"] + 1
    cfg = TrainConfig(**overrides)
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)  # as medlora.train.run does
    peft_model, _, speed = prepare_model(cfg, model)  # precision and checkpointing as medlora.train.run picks them
    trainer, _ = build_trainer(cfg, peft_model, tok, spec["features"], None, out, speed, progress=False)
    trainer.args.disable_tqdm = True
    return trainer, {**{k: v for k, v in cfg.to_dict().items() if k not in ("system_prompt",)}, "resolved": speed}


def build_trl(spec, model, tok, out, tuned: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    sys_prompt = spec["system_prompt"]
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": sys_prompt},
                                        {"role": "user", "content": r["question"]}],
                             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in spec["rows"]])
    kwargs = dict(output_dir=str(out), max_steps=spec["warmup"] + spec["steps"], report_to="none",
                  gradient_accumulation_steps=spec["grad_accum"], save_strategy="no", disable_tqdm=True)
    shipped_error = None
    if tuned:
        kwargs.update(bf16=False, fp16=False, per_device_train_batch_size=1, max_length=spec["seq"])
        cfg = SFTConfig(**kwargs)
    else:
        # As shipped, SFTConfig turns bf16 on, and TrainingArguments then refuses to start on a machine without an
        # accelerator unless use_cpu=True. Record that, then apply the fix its own error message asks for.
        try:
            cfg = SFTConfig(**kwargs)
        except ValueError as e:
            shipped_error = f"ValueError: {str(e).splitlines()[0]}"
            cfg = SFTConfig(**kwargs, use_cpu=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=LORA_TARGETS)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
    keys = ("bf16", "fp16", "per_device_train_batch_size", "max_length", "gradient_checkpointing",
            "gradient_checkpointing_kwargs", "completion_only_loss", "assistant_only_loss", "packing",
            "padding_free", "learning_rate", "logging_steps", "loss_type", "use_cpu")
    settings = {k: getattr(cfg, k, None) for k in keys}
    if shipped_error:
        settings["error_with_pure_defaults"] = shipped_error
    return trainer, settings


def vm_hwm_gb() -> float:
    """Peak RSS of this process's own address space (VmHWM).

    ru_maxrss is not used: Linux carries the pre-exec RSS of the forked parent into the child's
    ru_maxrss, so every child would report at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def checkpointing_on(model) -> bool:
    base = find_pretrained(model) if model is not None else None
    if base is None:
        return False
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(base)):
            return bool(getattr(base, attr))
    return False


def find_pretrained(model):
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    return None


def child_main(name: str, spec_path: str, result_path: str, progress_path: str) -> int:
    import torch
    from transformers import TrainerCallback

    from medlora.model import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    result: dict = {"name": name, "ok": False}
    prog = open(progress_path, "a", buffering=1)
    try:
        t0 = time.perf_counter()
        tok = load_tokenizer(spec["tokenizer_dir"])
        model = build_random_model(spec["layers"])
        result["model_build_s"] = round(time.perf_counter() - t0, 1)
        result["model_parameters"] = sum(p.numel() for p in model.parameters())
        t1 = time.perf_counter()
        settings = {}
        if name == "reference":
            trainer = build_reference(spec, model, tok, out)
        elif name == "medlora":
            trainer, settings = build_medlora(spec, model, tok, out)
        elif name == "medlora_fp32":
            trainer, settings = build_medlora(spec, model, tok, out, precision="fp32")
        elif name in ("trl_tuned", "trl_shipped"):
            trainer, settings = build_trl(spec, model, tok, out, tuned=name == "trl_tuned")
        else:
            raise ValueError(name)
        result["trainer_build_s"] = round(time.perf_counter() - t1, 1)
        a = trainer.args
        result["settings"] = {**settings, "effective": {
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "bf16": bool(a.bf16), "fp16": bool(a.fp16), "max_steps": a.max_steps,
            "gradient_checkpointing_arg": bool(getattr(a, "gradient_checkpointing", False)),
            "trainer_class": type(trainer).__name__,
            "frozen_weights_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
        }}

        prog.write(json.dumps({"settings": result["settings"], "model_parameters": result["model_parameters"],
                               "model_build_s": result["model_build_s"]}, default=str) + "\n")

        # Every contender's model is built in fp32 (then cast, where a contender trains bf16 weights): the build
        # peak is not training memory, so VmHWM restarts here from the current RSS (Linux: clear_refs 5).
        result["build_peak_rss_gb"] = round(vm_hwm_gb(), 2)
        try:
            import gc

            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
            result["peak_rss_reset_after_build"] = True
        except OSError:
            result["peak_rss_reset_after_build"] = False

        # tokens per micro-batch: wrap this trainer instance's training_step (works for any Trainer subclass)
        pending = {"tokens": 0, "seqs": [], "padded": 0, "micro": 0}
        orig_step = trainer.training_step

        def counting_step(model_, inputs, *a_, **k_):
            mask = inputs.get("attention_mask")
            if mask is not None:
                lens = [int(x) for x in mask.sum(-1).tolist()]
            elif "position_ids" in inputs:  # padding-free: one row, sequences restart at position 0
                pos = inputs["position_ids"].view(-1).tolist()
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                lens = [b - a for a, b in zip(starts, starts[1:])]
            else:
                lens = [int(inputs["input_ids"].shape[-1])] * int(inputs["input_ids"].shape[0])
            pending["tokens"] += sum(lens)
            pending["seqs"].extend(lens)
            pending["padded"] += int(inputs["input_ids"].numel())
            pending["micro"] += 1
            prog.write(json.dumps({"micro_batch_start": pending["micro"], "step": trainer.state.global_step + 1,
                                   "tokens": sum(lens), "t": time.time()}) + "\n")
            return orig_step(model_, inputs, *a_, **k_)

        trainer.training_step = counting_step
        steps: list[dict] = []

        class Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                result["gradient_checkpointing"] = checkpointing_on(model)
                self.t, self.cpu = time.perf_counter(), time.process_time()
                result["train_begin_after_s"] = round(self.t - t0, 1)

            def on_step_end(self, args, state, control, **kw):
                now, cpu = time.perf_counter(), time.process_time()
                rec = {"step": state.global_step, "seconds": now - self.t, "tokens": pending["tokens"],
                       "cpu_seconds": cpu - self.cpu, "threads": torch.get_num_threads(),
                       "seq_lens": list(pending["seqs"]), "padded_tokens": pending["padded"],
                       "micro_batches": pending["micro"],
                       "rss_gb": round(vm_hwm_gb(), 2)}
                steps.append(rec)
                prog.write(json.dumps(rec) + "\n")
                pending.update(tokens=0, seqs=[], padded=0, micro=0)
                self.t, self.cpu = now, cpu

        trainer.add_callback(Timing())
        # gradient checkpointing is switched on inside train(); read it again after the first step
        trainer.train()
        result["gradient_checkpointing"] = checkpointing_on(trainer.model) or result.get("gradient_checkpointing", False)
        result["steps"] = steps
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        result["peak_rss_gb"] = round(vm_hwm_gb(), 2)
        Path(result_path).write_text(json.dumps(result))
        shutil.rmtree(out, ignore_errors=True)
    return 0 if result["ok"] else 1


# ==================================================================== parent: run children, aggregate

def cpu_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def run_child(name: str, spec_path: Path, workdir: Path, args, tag: str = "") -> dict:
    import psutil

    result_path, progress_path = workdir / f"{name}{tag}.result.json", workdir / f"{name}{tag}.progress.jsonl"
    log_path = workdir / f"{name}{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--spec", str(spec_path),
           "--result", str(result_path), "--progress", str(progress_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load0, busy0, t0 = os.getloadavg(), cpu_busy_seconds(), time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak_polled, child_cpu, outcome = 0, 0.0, None
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = sum(p.memory_info().rss for p in procs)
            child_cpu = max(child_cpu, sum(sum(p.cpu_times()[:2]) for p in procs))
            peak_polled = max(peak_polled, rss)
        except psutil.Error:
            pass
        elapsed = time.time() - t0
        if args.timeout and elapsed > args.timeout:
            outcome = f"timed out after {args.timeout:.0f} s"
        elif peak_polled > args.max_rss_gb * 2**30:
            outcome = f"killed: RSS passed --max_rss_gb {args.max_rss_gb} GB"
        if outcome:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    wall = time.time() - t0
    busy1, load1 = cpu_busy_seconds(), os.getloadavg()
    res: dict = {"name": name, "ok": False}
    if result_path.exists():
        res = json.loads(result_path.read_text())
    elif progress_path.exists():  # killed: keep the steps it finished
        lines = [json.loads(line) for line in progress_path.read_text().splitlines() if line.strip()]
        res["steps"] = [x for x in lines if "seconds" in x]
        for x in lines:
            if "settings" in x:  # what it was running with, recorded before training
                res.update(x)
        started = [x for x in lines if "micro_batch_start" in x]
        if started and outcome:  # the micro-batch it was in when killed: a bound on its speed
            last = started[-1]
            res["unfinished_micro_batch"] = {"tokens": last["tokens"], "running_s": round(time.time() - last["t"], 1),
                                             "step": last["step"]}
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


def summarise(res: dict, warmup: int, fm_layers: int, peaks: dict) -> dict:
    steps = res.get("steps") or []
    measured = [s for s in steps if s["step"] > warmup]
    summary = {"steps_completed": len(steps), "steps_measured": len(measured)}
    if not measured:
        mb = res.get("unfinished_micro_batch")
        if mb and mb.get("running_s"):
            summary["unfinished_micro_batch"] = mb
            summary["tokens_per_s_upper_bound"] = round(mb["tokens"] / mb["running_s"], 2)
        if steps:  # only warm-up steps finished (e.g. killed): report them, labelled
            summary["warmup_only_s_per_step"] = round(sum(s["seconds"] for s in steps) / len(steps), 1)
            summary["warmup_only_tokens_per_s"] = round(sum(s["tokens"] for s in steps) /
                                                        sum(s["seconds"] for s in steps), 2)
        return summary
    secs = sum(s["seconds"] for s in measured)
    toks = sum(s["tokens"] for s in measured)
    seqs = [n for s in measured for n in s["seq_lens"]]
    gc = res.get("gradient_checkpointing", True)
    fl = training_flops(flops_model(fm_layers, gc), seqs)
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


LABELS = {
    "reference": "reference (HF Trainer + PEFT, spec settings)",
    "medlora": "medlora default path",
    "medlora_fp32": "medlora with --precision fp32 (its default path on CPUs without native bf16)",
    "trl_tuned": "TRL SFTTrainer, tuned for CPU (fp32, bs 1, max_length = seq)",
    "trl_shipped": "TRL SFTTrainer, as shipped (bf16, bs 8, max_length 1024)",
}


def dtype_label(eff: dict) -> str:
    if not eff:
        return "—"
    if not eff.get("bf16"):
        return "fp32"
    return "bf16 weights + autocast" if eff.get("frozen_weights_dtype") == "torch.bfloat16" else "bf16 autocast"


def fmt(x, nd=2):
    return "—" if x is None else f"{x:,.{nd}f}"


def write_reports(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    m, a, p = report["machine"], report["args"], report["peak"]
    lines = [
        "# medlora training speed benchmark",
        "",
        f"{report['date']} · `{report['command']}`",
        "",
        f"Model: Qwen2.5-1.5B architecture, random weights, **{a['layers']} layer(s)**"
        + (" (full size)" if a["layers"] == 28 else " (reduced: not the headline numbers)")
        + f", {report['model_parameters']:,} parameters. Data: {report['data']['rows_selected']} MedQuAD rows, "
        f"mean {report['data']['tokens_per_row_mean']} tokens (SmolLM2 tokenizer, max_seq_len {a['seq']}). "
        f"{a['warmup']} warm-up step(s) excluded, {a['steps']} measured; gradient accumulation {a['grad_accum']}.",
        "",
        "| contender | status | tokens/s | s/step | seq/step | tok/seq | peak RSS GB | grad ckpt | dtype | "
        "CPU share | model GFLOP/s | % fp32 peak (theor.) | % fp32 peak (mm) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        s = r["summary"]
        eff = (r.get("settings") or {}).get("effective", {})
        status = "ok" if r.get("ok") else (r.get("error") or "failed")
        if not r.get("ok") and s.get("warmup_only_s_per_step"):
            status += f" ({s['steps_completed']} warm-up step(s) done: {s['warmup_only_s_per_step']} s/step)"
        elif not r.get("ok") and s.get("steps_measured"):
            status += f" (partial: {s['steps_measured']} measured step(s))"
        if not r.get("ok") and s.get("tokens_per_s_upper_bound") is not None:
            mb = s["unfinished_micro_batch"]
            status += (f"; its micro-batch of step {mb['step']} ({mb['tokens']} tokens) was still running after "
                       f"{mb['running_s']:.0f} s: < {s['tokens_per_s_upper_bound']} tokens/s")
        seq_step = (s["measured_sequences"] / s["steps_measured"]) if s.get("steps_measured") else None
        lines.append(
            f"| {LABELS.get(name, name)} | {status} | {fmt(s.get('tokens_per_s'))} | {fmt(s.get('s_per_step'), 1)} | "
            f"{fmt(seq_step, 0)} | {fmt(s.get('mean_tokens_per_sequence'), 0)} | {fmt(r.get('peak_rss_gb'))} | "
            f"{'on' if r.get('gradient_checkpointing') else ('off' if 'gradient_checkpointing' in r else '—')} | "
            f"{dtype_label(eff)} | {fmt(s.get('cpu_share'))} | "
            f"{fmt(s.get('model_gflops_per_s'), 1)} | "
            f"{fmt(100 * s['mfu_vs_theoretical'], 1) if s.get('mfu_vs_theoretical') else '—'} | "
            f"{fmt(100 * s['mfu_vs_empirical'], 1) if s.get('mfu_vs_empirical') else '—'} |")
    lines += ["", "**medlora / contender (tokens/s):** " + (", ".join(
        f"`{k}` = {v if v is not None else 'n/a'}" for k, v in report["ratios"].items()) or "n/a"), ""]
    goals = report.get("goals")
    if goals:
        lines += ["**Goals** (full size): " + "; ".join(f"{k}: {v}" for k, v in goals.items()), ""]
    lines += [
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}, "
        f"{p['theoretical']['microarchitecture']}), {m['physical_cores']} cores / {m['logical_cpus']} logical, "
        f"{m['cpu_mhz']} MHz{', under a hypervisor' if m['hypervisor'] else ''}",
        f"- flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items()),
        f"- RAM {m['ram_gb']} GB; Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- load: {report['load']['note']}",
        "",
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
    ] + ([f"- bf16 peak, measured: {p['empirical_bf16']['method']} = {p['empirical_bf16']['gflops']} GFLOP/s "
          "(native bf16 dot products)."] if p.get("empirical_bf16") else []) + [
        "- model FLOPs (the same useful work for every contender): " + report["flops_formula"],
        "- CPU share = the contender's process CPU time / (wall time x torch threads) over the measured steps: "
        "1.00 means its threads had the cores to themselves; lower means other processes took cores (and the "
        "OpenMP threads then wait for each other), so its tokens/s are depressed.",
        "- % peak = model FLOP/s / peak FLOP/s (MFU-style; executed FLOP/s including the checkpointing recompute "
        "is in the JSON as `hfu_vs_*`). TRL as shipped and medlora on a CPU with native bf16 run bf16 matmuls, whose peak is higher (see the measured "
        "bf16 torch.mm peak above, where the CPU has native bf16), so their fp32-peak fractions are only indicative.",
        "",
        "## Notes",
        "",
    ]
    lines += [f"- {n}" for n in report["notes"]]
    (out_dir / "train_speed.md").write_text("\n".join(lines) + "\n")


def parent_main(args) -> int:
    import psutil  # noqa: F401 - fail early if missing

    names = [n.strip() for n in (args.only or ",".join(CONTENDERS)).split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        sys.exit(f"unknown contender(s) {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    names = [n for n in CONTENDERS if n in names]
    if any(n.startswith("trl") for n in names):
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL contenders need trl: pip install -r benchmarks/requirements.txt (or --only reference,medlora)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medlora-train-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, RAM {machine['ram_gb']} GB; "
        f"load {load_start}")
    batch_max = TRL_SHIPPED_BATCH if "trl_shipped" in names else 1
    n_rows = max(32, (args.warmup + args.steps) * args.grad_accum * batch_max)
    spec_path, data_summary = prepare_data(args, n_rows, workdir)
    log(f"data: {data_summary['rows_selected']} rows, mean {data_summary['tokens_per_row_mean']} tokens")
    peaks = {"theoretical": theoretical_peak(machine), "empirical": empirical_peak()}
    from medlora.model import cpu_has_native_bf16

    if cpu_has_native_bf16():
        peaks["empirical_bf16"] = empirical_peak(dtype="bfloat16")  # for reading the bf16 contenders' numbers
    log(f"fp32 peak: theoretical {peaks['theoretical']['gflops']} GFLOP/s, torch.mm {peaks['empirical']['gflops']}")

    import peft
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        versions["trl"] = None
    try:
        import medlora

        versions["medlora"] = getattr(medlora, "__version__", None)
    except ImportError:
        pass

    # Rounds interleave the contenders (A B C A B C ...), so a burst of load from other processes hits them
    # alike, and each contender keeps its fastest run. TRL as shipped (minutes per step) runs once, last.
    runs: dict[str, list[dict]] = {}
    schedule = [(rnd, n) for rnd in range(args.rounds) for n in names
                if n != "trl_shipped" or rnd == args.rounds - 1]
    for rnd, name in schedule:
        log(f"running {name}, round {rnd + 1}/{args.rounds} (timeout {args.timeout or 'none'} s) ...")
        r = run_child(name, spec_path, workdir, args, tag=f".r{rnd + 1}" if args.rounds > 1 else "")
        r["round"] = rnd + 1
        r["summary"] = summarise(r, args.warmup, args.layers, {"theoretical": peaks["theoretical"]["gflops"],
                                                               "empirical": peaks["empirical"]["gflops"]})
        runs.setdefault(name, []).append(r)
        s = r["summary"]
        log(f"{name}: {'ok' if r.get('ok') else r.get('error')}; tokens/s {s.get('tokens_per_s')}, "
            f"s/step {s.get('s_per_step')}, peak RSS {r.get('peak_rss_gb')} GB, wall {r['wall_s']} s, "
            f"CPU share {s.get('cpu_share')}, other load {r.get('other_load_cores')} cores")
    results = {}
    for name in names:
        ok = [r for r in runs[name] if r.get("ok")]
        best = max(ok, key=lambda r: r["summary"].get("tokens_per_s") or 0) if ok else runs[name][-1]
        best["all_rounds"] = [{"round": r["round"], "ok": bool(r.get("ok")), "error": r.get("error"),
                               "tokens_per_s": r["summary"].get("tokens_per_s"),
                               "s_per_step": r["summary"].get("s_per_step"),
                               "cpu_share": r["summary"].get("cpu_share"),
                               "other_load_cores": r.get("other_load_cores"), "peak_rss_gb": r.get("peak_rss_gb")}
                              for r in runs[name]]
        best["peak_rss_gb_max_over_rounds"] = max((r.get("peak_rss_gb") or 0) for r in runs[name])
        results[name] = best

    shipped_error = trl_shipped_default_error() if "trl_shipped" in names else None
    report = build_report(args, "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]), started,
                          datetime.now(timezone.utc), machine, versions, peaks, data_summary, results,
                          load_start, os.getloadavg(), shipped_error)
    out_dir = Path(args.out_dir)
    write_reports(report, out_dir)
    log(f"wrote {out_dir / 'train_speed.md'} and {out_dir / 'train_speed.json'} "
        f"({report['total_wall_s']} s in all); ratios {report['ratios']}")
    print((out_dir / "train_speed.md").read_text())
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def trl_shipped_default_error() -> str | None:
    """What SFTConfig with pure defaults says on this machine (it refuses bf16 without an accelerator)."""
    try:
        from trl import SFTConfig

        with tempfile.TemporaryDirectory() as tmp:
            SFTConfig(output_dir=tmp, report_to="none")
    except ValueError as e:
        return f"ValueError: {str(e).splitlines()[0]}"
    except Exception:  # noqa: BLE001 - trl missing or other trouble: nothing to report
        return None
    return None


def build_report(args, command, started, finished, machine, versions, peaks, data_summary, results,
                 load_start, load_end, shipped_error) -> dict:
    def tps(n):  # a killed contender still counts if it finished measured steps; flagged as partial
        r = results.get(n)
        return r["summary"].get("tokens_per_s") if r else None

    ratios, partial = {}, []
    med = tps("medlora")
    for n in ("reference", "trl_tuned", "trl_shipped"):
        if n in results and "medlora" in results:
            ratios[f"vs_{n}"] = round(med / tps(n), 2) if med and tps(n) else None
    for n in ("reference", "trl_tuned", "trl_shipped"):
        ub = results.get(n, {}).get("summary", {}).get("tokens_per_s_upper_bound")
        if med and ratios.get(f"vs_{n}") is None and ub:
            ratios[f"vs_{n}_at_least"] = round(med / ub, 2)
    for n in ("reference", "trl_tuned", "trl_shipped"):
        w = results.get(n, {}).get("summary", {}).get("warmup_only_tokens_per_s")
        if med and ratios.get(f"vs_{n}") is None and w:
            ratios[f"vs_{n}_warmup_step_only"] = round(med / w, 2)
    fp32 = tps("medlora_fp32")
    if fp32:
        for n in ("reference", "trl_tuned"):
            if tps(n):
                ratios[f"fp32_vs_{n}"] = round(fp32 / tps(n), 2)
    for n, r in results.items():
        if not r.get("ok") and r["summary"].get("tokens_per_s"):
            partial.append(f"{n}: {r.get('error')}; its tokens/s come from the {r['summary']['steps_measured']} "
                           "measured step(s) it finished")
    goals = {}
    if med and "medlora" in results:
        if ratios.get("vs_reference") is not None:
            goals[">= 2.0x reference"] = f"{ratios['vs_reference']}x ({'met' if ratios['vs_reference'] >= 2 else 'not met'})"
        if ratios.get("vs_trl_tuned") is not None:
            goals[">= 1.5x TRL tuned"] = f"{ratios['vs_trl_tuned']}x ({'met' if ratios['vs_trl_tuned'] >= 1.5 else 'not met'})"
        rss = results["medlora"].get("peak_rss_gb")
        goals[f"peak RSS < 20 GB at seq {args.seq}"] = f"{rss} GB ({'met' if rss and rss < 20 else 'not met'})"
        if args.layers != 28:
            goals["note"] = f"measured with --layers {args.layers}; the goals apply to the full-size model"

    others = [r.get("other_load_cores") for r in results.values() if r.get("other_load_cores") is not None]
    shares = [r["summary"].get("cpu_share") for r in results.values() if r["summary"].get("cpu_share")]
    busy = max(others, default=0) >= 0.25 or min(shares, default=1) < 0.9
    load_note = (f"loadavg at start {tuple(round(x, 2) for x in load_start)}, at end "
                 f"{tuple(round(x, 2) for x in load_end)}; CPU used by other processes while each contender ran: "
                 + ", ".join(f"{n} {r.get('other_load_cores')} cores (CPU share {r['summary'].get('cpu_share')})"
                             for n, r in results.items())
                 + "; round-to-round spread of tokens/s: "
                 + ", ".join(f"{n} {min(v)}-{max(v)}" for n, r in results.items()
                             if len(v := [x["tokens_per_s"] for x in r.get("all_rounds", []) if x.get("tokens_per_s")]) > 1)
                 + (". **The machine was busy: other processes competed for the cores, so absolute numbers are low "
                    "and ratios are noisier than on an idle machine.**" if busy else ". The machine was otherwise idle."))
    notes = [
        "medlora runs with TrainConfig defaults except output_dir, max_seq_len (= --seq), gradient_accumulation_steps, "
        "max_steps and save_steps (set past max_steps so that no checkpoint save lands in the timed steps).",
        f"Each contender runs in its own subprocess, sequentially ({args.rounds} interleaved round(s); the table "
        "shows each contender's fastest run, every round is in the JSON under all_rounds), on the same data (identical rows; "
        "the batch-1 contenders also get the same row order, since they share the sampler seed 42).",
        "reference and medlora see the tokens of medlora.data.encode_frame; TRL tokenises the same rows itself "
        "(prompt/completion conversational format, same system prompt), so its token counts can differ slightly; "
        "tokens/s normalises for that.",
        "TRL 1.x patches the model with a chunked 'fused LM head' (no full logits tensor); on CPU it scores every "
        "position, not only the completion ones (only Triton devices skip masked positions).",
    ]
    if "trl_shipped" in results:
        shipped = results["trl_shipped"].get("settings") or {}
        shipped_error = shipped.get("error_with_pure_defaults") or shipped_error
        if shipped_error:
            notes.append("TRL as shipped does not start on a CPU-only machine: SFTConfig() with its defaults raises "
                         f"'{shipped_error}'. The benchmark then adds use_cpu=True, the fix the message asks for, and "
                         "measures that.")
        ws = results["trl_shipped"]["summary"]
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
    if peaks["empirical"]["gflops"] > peaks["theoretical"]["gflops"]:
        notes.append(f"The measured torch.mm rate ({peaks['empirical']['gflops']} GFLOP/s) beats the theoretical "
                     f"peak at the reported clock ({peaks['theoretical']['gflops']} GFLOP/s): the cores run above the "
                     "'cpu MHz' the hypervisor reports (boost), so the theoretical % overstates utilisation; the "
                     "torch.mm column is the tighter bound.")
    med_r, ref_r = results.get("medlora"), results.get("reference")
    if med_r and ref_r and med_r.get("ok") and ref_r.get("ok"):
        eff = lambda r: ((r.get("settings") or {}).get("effective", {}).get("bf16"), r.get("gradient_checkpointing"),
                         (r.get("settings") or {}).get("effective", {}).get("per_device_train_batch_size"))
        if eff(med_r) == eff(ref_r):
            notes.append("medlora's default path ran with the reference's precision, checkpointing and batch size "
                         f"(bf16 {eff(med_r)[0]}, gradient checkpointing {eff(med_r)[1]}, batch {eff(med_r)[2]}): "
                         "unless other speed work has landed, a ratio near 1 is expected and the difference from 1 "
                         "shows the measurement noise (see the round-to-round spread).")
    if args.layers != 28:
        notes.append(f"Reduced model (--layers {args.layers}): use only for iteration; quote full-size numbers.")
    for n, r in results.items():
        if not r.get("ok"):
            notes.append(f"{n}: {r.get('error')} (log: {r.get('log')})")
    notes += [f"partial result, {p}" for p in partial]

    return {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "spec", "result", "progress")},
        "machine": machine, "versions": versions, "peak": peaks,
        "load": {"start": load_start, "end": load_end, "busy": busy, "note": load_note},
        "data": data_summary,
        "model": {**QWEN25_15B, "num_hidden_layers": args.layers, "init": "random (torch.manual_seed(0))"},
        "model_parameters": next((r["model_parameters"] for r in results.values() if r.get("model_parameters")), 0),
        "flops_formula": " ".join(training_flops.__doc__.split()),
        "flops_per_token_gflop_at_mean_len": round(training_flops(
            flops_model(args.layers, False), [int(data_summary["tokens_per_row_mean"])])["model_flops_per_token"] / 1e9, 3),
        "results": {n: {k: v for k, v in r.items() if k not in ("steps",)} | {"steps": r.get("steps")}
                    for n, r in results.items()},
        "ratios": ratios, "goals": goals, "notes": notes,
        "total_wall_s": round((finished - started).total_seconds(), 1),
    }


def render_main(args) -> int:
    """Rebuild train_speed.{md,json} from a saved train_speed.json (same measurements, current report code)."""
    old = json.loads(Path(args.render).read_text())
    saved = argparse.Namespace(**old["args"])
    for k, v in vars(args).items():  # options added since the run keep their defaults
        if not hasattr(saved, k):
            setattr(saved, k, v)
    peaks = old["peak"]
    results = old["results"]
    for r in results.values():
        r["summary"] = summarise(r, saved.warmup, saved.layers, {"theoretical": peaks["theoretical"]["gflops"],
                                                                 "empirical": peaks["empirical"]["gflops"]})
    started = datetime.fromisoformat(old["date"])
    finished = started + timedelta(seconds=old.get("total_wall_s", 0))
    names = list(results)
    report = build_report(saved, old["command"], started, finished, old["machine"], old["versions"], peaks,
                          old["data"], results, tuple(old["load"]["start"]), tuple(old["load"]["end"]),
                          trl_shipped_default_error() if "trl_shipped" in names else None)
    report["rendered"] = f"re-rendered {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {args.render}"
    out_dir = Path(args.out_dir)
    write_reports(report, out_dir)
    log(f"wrote {out_dir / 'train_speed.md'} and {out_dir / 'train_speed.json'}; ratios {report['ratios']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MedQuAD CSV")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the row shuffle")
    p.add_argument("--out_dir", default=str(HERE / "results"), help="where train_speed.{md,json} go")
    p.add_argument("--workdir", help="keep children's logs/progress here (default: a temp dir, removed)")
    p.add_argument("--render", metavar="JSON", help="only rebuild the report from a saved train_speed.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec, args.result, args.progress)
    if args.render:
        return render_main(args)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.layers < 1 or args.steps < 1 or args.warmup < 0 or args.grad_accum < 1 or args.seq < 16:
        p.error("need --layers >= 1, --steps >= 1, --warmup >= 0, --grad_accum >= 1, --seq >= 16")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
