"""One contender in its own process: build it, time every optimizer step, write the result (child side).

Run by the parent as ``python -m benchmarks.train_speed --child NAME --spec ... --result ... --progress ...``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import PreTrainedModel, TrainerCallback


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


def find_pretrained(model):
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    return None


def checkpointing_on(model) -> bool:
    base = find_pretrained(model) if model is not None else None
    if base is None:
        return False
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(base)):
            return bool(getattr(base, attr))
    return False


def describe_allocator() -> str:
    from medlora.allocator import describe

    return describe()


def effective_settings(trainer, model) -> dict:
    """What the trainer actually runs with, read from its arguments and the model."""
    a = trainer.args
    return {
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "bf16": bool(a.bf16), "fp16": bool(a.fp16), "max_steps": a.max_steps,
        "gradient_checkpointing_arg": bool(getattr(a, "gradient_checkpointing", False)),
        "trainer_class": type(trainer).__name__,
        "frozen_weights_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
        # --precision int8 holds the frozen linears outside nn.Parameters (medlora.training.int8.Int8Linear)
        "int8_linears": sum(type(m).__name__ == "Int8Linear" for m in model.modules()),
        "allocator": describe_allocator(),
    }


def reset_peak_rss(result: dict) -> None:
    """Every contender's model is built in fp32 (then cast, where a contender trains bf16 weights): the build
    peak is not training memory, so VmHWM restarts here from the current RSS (Linux: clear_refs 5)."""
    result["build_peak_rss_gb"] = round(vm_hwm_gb(), 2)
    try:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        result["peak_rss_reset_after_build"] = True
    except OSError:
        result["peak_rss_reset_after_build"] = False


def micro_batch_lengths(inputs) -> list[int]:
    """Real (non-padding) tokens of each sequence in one micro-batch."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [int(x) for x in mask.sum(-1).tolist()]
    if "position_ids" in inputs:  # padding-free: one row, sequences restart at position 0
        pos = inputs["position_ids"].view(-1).tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return [b - a for a, b in zip(starts, starts[1:])]
    return [int(inputs["input_ids"].shape[-1])] * int(inputs["input_ids"].shape[0])


def count_tokens(trainer, prog) -> dict:
    """Wrap this trainer instance's training_step (works for any Trainer subclass) to count the tokens of the
    current optimizer step; returns the running counts, which the timing callback reads and resets."""
    pending = {"tokens": 0, "seqs": [], "padded": 0, "micro": 0}
    orig_step = trainer.training_step

    def counting_step(model_, inputs, *a_, **k_):
        lens = micro_batch_lengths(inputs)
        pending["tokens"] += sum(lens)
        pending["seqs"].extend(lens)
        pending["padded"] += int(inputs["input_ids"].numel())
        pending["micro"] += 1
        prog.write(json.dumps({"micro_batch_start": pending["micro"], "step": trainer.state.global_step + 1,
                               "tokens": sum(lens), "t": time.time()}) + "\n")
        return orig_step(model_, inputs, *a_, **k_)

    trainer.training_step = counting_step
    return pending


class Timing(TrainerCallback):
    """Times every optimizer step (wall and CPU time) and records its tokens into ``steps``."""

    def __init__(self, result: dict, steps: list, pending: dict, prog, t0: float):
        self.result, self.steps, self.pending, self.prog, self.t0 = result, steps, pending, prog, t0

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.result["gradient_checkpointing"] = checkpointing_on(model)
        self.t, self.cpu = time.perf_counter(), time.process_time()
        self.result["train_begin_after_s"] = round(self.t - self.t0, 1)

    def on_step_end(self, args, state, control, **kw):
        now, cpu, p = time.perf_counter(), time.process_time(), self.pending
        rec = {"step": state.global_step, "seconds": now - self.t, "tokens": p["tokens"],
               "cpu_seconds": cpu - self.cpu, "threads": torch.get_num_threads(),
               "seq_lens": list(p["seqs"]), "padded_tokens": p["padded"], "micro_batches": p["micro"],
               "rss_gb": round(vm_hwm_gb(), 2)}
        self.steps.append(rec)
        self.prog.write(json.dumps(rec) + "\n")
        p.update(tokens=0, seqs=[], padded=0, micro=0)
        self.t, self.cpu = now, cpu


def build(name: str, spec: dict, out: Path, result: dict, t0: float):
    """Tokenizer, random model and the contender's trainer; records build times and settings in ``result``."""
    from medlora.model import load_tokenizer

    from .contenders import BUILDERS, build_random_model

    tok = load_tokenizer(spec["tokenizer_dir"])
    model = build_random_model(spec["layers"])
    result["model_build_s"] = round(time.perf_counter() - t0, 1)
    result["model_parameters"] = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    if name not in BUILDERS:
        raise ValueError(name)
    trainer, settings = BUILDERS[name](spec, model, tok, out)
    result["trainer_build_s"] = round(time.perf_counter() - t1, 1)
    result["settings"] = {**settings, "effective": effective_settings(trainer, model)}
    return trainer


def train_and_time(trainer, result: dict, prog, t0: float) -> None:
    reset_peak_rss(result)
    pending = count_tokens(trainer, prog)
    steps: list[dict] = []
    trainer.add_callback(Timing(result, steps, pending, prog, t0))
    # gradient checkpointing is switched on inside train(); read it again after the first step
    trainer.train()
    result["gradient_checkpointing"] = checkpointing_on(trainer.model) or result.get("gradient_checkpointing", False)
    result["steps"] = steps


def child_main(name: str, spec_path: str, result_path: str, progress_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    result: dict = {"name": name, "ok": False}
    prog = open(progress_path, "a", buffering=1)
    try:
        if name.startswith("medlora"):  # as `medlora train` runs: its libraries loaded, then frozen out of the gc
            import medlora.training.recipe  # noqa: F401
            from medlora.allocator import freeze_loaded_objects

            freeze_loaded_objects()
        t0 = time.perf_counter()
        trainer = build(name, spec, out, result, t0)
        prog.write(json.dumps({"settings": result["settings"], "model_parameters": result["model_parameters"],
                               "model_build_s": result["model_build_s"]}, default=str) + "\n")
        train_and_time(trainer, result, prog, t0)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        result["peak_rss_gb"] = round(vm_hwm_gb(), 2)
        Path(result_path).write_text(json.dumps(result))
        shutil.rmtree(out, ignore_errors=True)
        prog.close()
    return 0 if result["ok"] else 1
