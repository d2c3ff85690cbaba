"""`medlora train`: the specification's CPU LoRA recipe (data -> LoRA -> HF Trainer -> run folder)."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from . import __version__
from .config import Interrupted, MedloraError, TrainConfig, save_config
from .data import encode_frame, load_qa_csv, make_collator, split
from .model import cpu_has_native_bf16, find_lora_targets, load_model, load_tokenizer, resolve_model


def log(msg: str) -> None:
    print(f"medlora: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- compatibility helpers

# Some arguments were renamed across transformers releases: the first name the installed
# TrainingArguments accepts wins (transformers 5 folded warmup_ratio into a float warmup_steps,
# and renamed gradient_checkpointing to activation_checkpointing and no_cuda to use_cpu).
RENAMED = {
    "warmup_ratio": ("warmup_ratio", "warmup_steps"),
    "gradient_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
    "use_cpu": ("use_cpu", "no_cuda"),
}


def filter_training_kwargs(kwargs: dict, accepted: set[str] | None = None) -> tuple[dict, list[str]]:
    """Keep only the kwargs the installed TrainingArguments accepts; return (kept, dropped names)."""
    if accepted is None:
        from transformers import TrainingArguments

        accepted = set(inspect.signature(TrainingArguments.__init__).parameters) - {"self"}
    kept, dropped = {}, []
    for key, value in kwargs.items():
        name = next((n for n in RENAMED.get(key, (key,)) if n in accepted), None)
        if name is None:
            dropped.append(key)
        else:
            kept[name] = value
    return kept, dropped


def unique_output_dir(path: str | Path) -> Path:
    """The path itself if absent or empty, else a timestamped sibling (never overwrite a run)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{stamp}-{n}")
    return candidate


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir), then rename into place, so readers never see a half-written folder."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


# ---------------------------------------------------------------- checkpoints and interruption

COMPLETE = "medlora_complete.json"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def mark_complete(checkpoint: Path) -> None:
    """Record every file's size once the Trainer has finished writing the checkpoint."""
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != COMPLETE}
    write_json_atomic(checkpoint / COMPLETE, {"files": sizes})


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint counts only if its marker exists and every listed file still has its recorded size
    (a process killed while writing leaves no marker, or files that no longer match)."""
    try:
        sizes = json.loads((checkpoint / COMPLETE).read_text())["files"]
        return bool(sizes) and all((checkpoint / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    for ckpt in checkpoints(run_dir):
        if is_complete(ckpt):
            return ckpt
        log(f"skipping incomplete checkpoint {ckpt.name} (the process was stopped while writing it)")
    return None


class Interrupt:
    """First Ctrl-C: finish the current sample, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        log("Ctrl-C: saving a checkpoint after the current sample (press Ctrl-C again to quit without saving)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal
        import threading

        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)


def checkpoint_callback(interrupt: Interrupt):
    """Marks checkpoints complete, saves one at the end, and turns Ctrl-C into save-and-stop."""
    from transformers import TrainerCallback

    class CheckpointGuard(TrainerCallback):
        rng = None  # RNG states at the last optimizer step (what a checkpoint of that step must hold)

        def on_step_end(self, args, state, control, **kw):
            self.rng = _rng_snapshot()
            if state.global_step >= state.max_steps:
                control.should_save = True
            if interrupt.requested:
                control.should_save = control.should_training_stop = True

        def on_substep_end(self, args, state, control, **kw):
            if interrupt.requested:  # mid-accumulation: stop now; run() saves the last completed step
                control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return CheckpointGuard()


def _rng_snapshot() -> dict:
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def _rng_restore(snapshot: dict | None) -> None:
    import random

    import numpy as np

    if snapshot:
        random.setstate(snapshot["python"])
        np.random.set_state(snapshot["numpy"])
        torch.random.set_rng_state(snapshot["cpu"])


def save_interrupted_checkpoint(trainer, guard) -> Path:
    """Checkpoint the last completed optimizer step after a Ctrl-C mid-accumulation. The weights,
    optimizer and scheduler have not moved since that step; the RNG has, so it is rewound first."""
    ckpt = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not is_complete(ckpt):
        _rng_restore(guard.rng)
        trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own checkpoint writer
        mark_complete(ckpt)
    return ckpt


def check_output_location(path: Path, need_bytes: int = 0) -> None:
    """Fail before training if the run folder cannot be written or the disk is too full."""
    import tempfile

    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MedloraError(f"cannot create output_dir {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".medlora-write-test")
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise MedloraError(f"cannot write to output_dir {path} ({e.strerror})") from None
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise MedloraError(f"not enough free disk for {path}: need about {need_bytes / 1e9:.1f} GB for checkpoints "
                           f"and artifacts, {free / 1e9:.1f} GB free")


# ---------------------------------------------------------------- progress

def progress_callback():
    """Trainer's progress bar counts optimizer steps, which are 16 samples (minutes) apart on a CPU.
    This one counts samples, with ETA, tokens/s and the latest loss, and shows evaluation progress."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class SampleProgress(TrainerCallback):
        def __init__(self):
            self.bar = self.eval_bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps * args.gradient_accumulation_steps, unit="sample",
                            desc="training", dynamic_ncols=True, file=sys.stderr)
            self.start, self.tokens0 = time.time(), state.num_input_tokens_seen

        def _tick(self, state):
            self.bar.update(1)
            elapsed = max(time.time() - self.start, 1e-9)
            tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            post = {"step": f"{state.global_step}/{state.max_steps}", "tok/s": f"{tps:.1f}"}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            self.bar.set_postfix(post, refresh=False)

        def on_substep_end(self, args, state, control, **kw):
            self._tick(state)

        def on_step_end(self, args, state, control, **kw):
            self._tick(state)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        # evaluation: one forward pass per eval row, minutes on a CPU, so it gets a bar too
        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if self.eval_bar is None:
                self.eval_bar = tqdm(total=len(eval_dataloader), unit="row", desc="evaluating", leave=False,
                                     dynamic_ncols=True, file=sys.stderr)
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kw):
            if self.eval_bar is not None:
                self.eval_bar.close()
            self.eval_bar = None

    return SampleProgress()


# ---------------------------------------------------------------- artifacts

def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("medlora training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_and_save(peft_model, tokenizer, out: Path) -> Path:
    """Fold the LoRA weights into the base weights and save a plain HF model folder."""
    merged = peft_model.merge_and_unload()

    def write(tmp):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out, write)


# ---------------------------------------------------------------- speed (see benchmarks/README.md)

def resolve_precision(cfg: TrainConfig) -> str:
    """'bf16' or 'fp32' for this run: bf16 only where the CPU multiplies bf16 natively."""
    if cfg.precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if cfg.precision == "bf16" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 is emulated and many times "
            "slower than fp32 here")
    return cfg.precision


# Values kept for the backward pass per token and decoder layer without gradient checkpointing, in units of
# the activation element size: roughly the saved inputs of the 7 LoRA projections and their dropout copies,
# norms, attention and the MLP's intermediate tensors. Sized to over-estimate what was measured (Qwen2.5-1.5B
# architecture, fp32, 512 tokens: 7.4 GB above the weights, estimate 8.5 GB), so "auto" errs towards on.
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE = 34, 9
CHECKPOINTING_HEADROOM = 0.75  # use at most this share of the RAM that is free after the model is loaded


def activation_bytes(model_config, seq_len: int, batch: int, precision: str) -> int:
    """Estimated activation memory of one micro-batch of seq_len tokens, without gradient checkpointing."""
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    per_token_layer = ACT_PER_HIDDEN * hidden + ACT_PER_INTERMEDIATE * intermediate
    vocab_logits = 3 * model_config.vocab_size * 4  # a few fp32 rows of logits per answer token (loss + grad)
    elem = 2 if precision == "bf16" else 4
    return batch * seq_len * (model_config.num_hidden_layers * per_token_layer * elem + vocab_logits)


def resolve_checkpointing(cfg: TrainConfig, model_config, precision: str) -> tuple[bool, str]:
    """(use gradient checkpointing?, why). 'auto' turns it off when the longest micro-batch fits in free RAM."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "on", f"--gradient_checkpointing {cfg.gradient_checkpointing}"
    import psutil

    need = activation_bytes(model_config, cfg.max_seq_len, cfg.per_device_train_batch_size, precision)
    free = psutil.virtual_memory().available
    on = need > CHECKPOINTING_HEADROOM * free
    why = (f"auto: activations need ~{need / 1e9:.1f} GB at {cfg.max_seq_len} tokens, "
           f"{free / 1e9:.1f} GB of RAM free")
    return on, why


def answer_only_trainer_class():
    """HF Trainer whose training loss runs the LM head on the answer positions only.

    The plain path computes logits for every position (seq x 151,936 fp32 values for Qwen2.5, ~15% of the
    FLOPs) and then ignores the prompt's. transformers' causal LMs accept a boolean ``logits_to_keep``
    mask and project only those positions; the loss is the same token-summed cross-entropy divided by
    num_items_in_batch that the model's own loss function uses, so the numbers match the reference.
    """
    import torch.nn.functional as F
    from transformers import Trainer

    class _AnswerOnlyTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.answer_only = _accepts_logits_to_keep(self.model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "labels" not in inputs or not self.answer_only:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            targets = labels[:, 1:]  # position p predicts token p + 1
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != -100
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
            logits = outputs.logits.float()  # (answer tokens in the batch, vocab)
            if logits.dim() == 3:  # a model that ignored the mask scored every position
                logits = logits[keep]
            loss = F.cross_entropy(logits, targets[keep[:, :-1]], reduction="sum")
            n = num_items_in_batch if num_items_in_batch is not None else keep.sum()
            loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)
            return (loss, {"loss": loss}) if return_outputs else loss

    return _AnswerOnlyTrainer


def _accepts_logits_to_keep(model) -> bool:
    """Models from before transformers 4.50 (or custom code) lack the argument: they get the plain loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# ---------------------------------------------------------------- the recipe

def prepare_data(cfg: TrainConfig, tokenizer, loaded=None):
    """Split, cap and tokenise; ``loaded`` is an already-read (df, report) of cfg.data."""
    df, report = loaded or load_qa_csv(cfg.data)
    train_df, eval_df = split(df, cfg.test_size, cfg.seed)
    if cfg.max_train_samples:
        train_df = train_df.iloc[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        eval_df = eval_df.iloc[: cfg.max_eval_samples]
    train = encode_frame(tokenizer, train_df, cfg.system_prompt, cfg.max_seq_len, progress=len(train_df) > 2000)
    evals = encode_frame(tokenizer, eval_df, cfg.system_prompt, cfg.max_seq_len)
    if not train.examples:
        raise MedloraError(f"{cfg.data}: no training row fits max_seq_len={cfg.max_seq_len} (every prompt is longer)")
    if not evals.examples:
        raise MedloraError(f"{cfg.data}: no eval row fits max_seq_len={cfg.max_seq_len}")
    return report, train, evals


def apply_lora(cfg: TrainConfig, model):
    """Wrap a base model with the run's LoRA config; returns (peft_model, target names).
    The adapter weights stay fp32 whatever the base model's dtype (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    targets = cfg.target_modules or find_lora_targets(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      bias="none", task_type="CAUSAL_LM", target_modules=targets)
    try:
        return get_peft_model(model, lora), list(targets)
    except ValueError as e:
        raise MedloraError(f"LoRA setup failed for target_modules={targets}: {str(e).splitlines()[0]}") from None


def prepare_model(cfg: TrainConfig, model, precision: str | None = None) -> tuple:
    """Base model -> (peft_model, targets, speed settings): the precision and checkpointing this run uses
    (``precision``: already resolved by the caller, else resolved here)."""
    precision = precision or resolve_precision(cfg)
    if precision == "bf16" and model.dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)  # frozen base weights in bf16: half the memory traffic and RAM
    model, targets = apply_lora(cfg, model)
    checkpointing, why = resolve_checkpointing(cfg, model.config, precision)
    speed = {"precision": precision, "gradient_checkpointing": checkpointing, "gradient_checkpointing_why": why,
             "answer_only_lm_head": _accepts_logits_to_keep(model)}
    return model, targets, speed


def training_arguments(cfg: TrainConfig, out: Path, speed: dict | None = None):
    """The specification's TrainingArguments (with this run's precision and checkpointing), filtered
    against the installed transformers."""
    import transformers
    from transformers import TrainingArguments

    speed = speed or {"precision": "fp32", "gradient_checkpointing": True}
    wanted = dict(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        fp16=False,
        bf16=speed["precision"] == "bf16",  # autocast; the base weights are already bf16 (prepare_model)
        gradient_checkpointing=speed["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=False,
    )
    kwargs, dropped = filter_training_kwargs(wanted)
    if dropped:
        log(f"transformers {transformers.__version__} TrainingArguments does not accept {', '.join(dropped)}; ignored")
    return TrainingArguments(**kwargs), dropped


def build_trainer(cfg: TrainConfig, model, tokenizer, train_features: list[dict], eval_features: list[dict] | None,
                  out: Path, speed: dict | None = None, progress: bool = True):
    """HF Trainer (answer-only LM head) with medlora's collator and progress bar. Returns (trainer, dropped)."""
    from transformers.trainer_callback import ProgressCallback

    args, dropped = training_arguments(cfg, out, speed)
    trainer = answer_only_trainer_class()(model=model, args=args, train_dataset=train_features,
                                          eval_dataset=eval_features, data_collator=make_collator(tokenizer),
                                          processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(progress_callback())
    return trainer, dropped


def run(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train (or, with ``resume``, continue the run in that folder); returns the run folder."""
    if not cfg.data:
        raise MedloraError("--data is required (a CSV with columns qtype, Question, Answer)")
    import peft
    import transformers
    from transformers import set_seed

    # 1. everything that can fail on user input, before the model is loaded
    loaded = load_qa_csv(cfg.data)  # fast fail on a bad CSV before even resolving the model
    data_sha256 = file_sha256(cfg.data)
    out = Path(resume) if resume else unique_output_dir(cfg.output_dir)
    check_output_location(out)
    resume_from = None
    if resume:
        info = json.loads((out / "run_info.json").read_text()) if (out / "run_info.json").is_file() else {}
        if info.get("data_sha256") and info["data_sha256"] != data_sha256:
            raise MedloraError(f"{cfg.data} changed since this run started; resuming would train on different rows")
        resume_from = latest_complete_checkpoint(out)
        if resume_from is None:
            raise MedloraError(f"{out}: no complete checkpoint to resume from; start a new run instead")
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    report, train, evals = prepare_data(cfg, tokenizer, loaded)
    log(f"data: {report.rows_kept} usable rows ({report.dropped_empty} dropped: empty question/answer); "
        f"train {len(train.examples)}, eval {len(evals.examples)}; "
        f"{train.truncated + evals.truncated} answers truncated at {cfg.max_seq_len} tokens; "
        f"{train.skipped_long_prompt + evals.skipped_long_prompt} rows skipped (prompt too long)")

    # 2. CPU settings and seeds
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    set_seed(cfg.seed)  # python, numpy, torch

    # 3. model + LoRA
    precision = resolve_precision(cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, targets, speed = prepare_model(cfg, load_model(source, cfg.trust_remote_code, dtype=dtype,
                                                          allow_pickle_weights=cfg.allow_pickle_weights), precision)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA on {', '.join(targets)}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%)")
    log(f"precision {precision} ({'native bf16 on this CPU' if cpu_has_native_bf16() else 'no native bf16'}"
        f"{'' if cfg.precision == 'auto' else ', set by --precision'}); gradient checkpointing "
        f"{'on' if speed['gradient_checkpointing'] else 'off'} ({speed['gradient_checkpointing_why']})")
    # a checkpoint holds the adapter and two Adam moments (fp32); keep save_total_limit + 1 while rotating
    need = trainable * 4 * 3 * (cfg.save_total_limit + 2) + (total * 4 if cfg.merge_model else 0)
    check_output_location(out, need)

    # 4. run folder (created only now: bad input never leaves one behind)
    if not resume and str(out) != str(Path(cfg.output_dir)):
        log(f"{cfg.output_dir} exists and is not empty; writing to {out} instead")
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "medlora_version": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "model": cfg.model,
        "model_source": source,
        "data": str(Path(cfg.data).resolve()),
        "data_sha256": data_sha256,
        "data_rows_read": report.rows_read,
        "data_rows_dropped_empty": report.dropped_empty,
        "train_rows": len(train.examples),
        "eval_rows": len(evals.examples),
        "truncated_answers": train.truncated + evals.truncated,
        "skipped_long_prompt": train.skipped_long_prompt + evals.skipped_long_prompt,
        "target_modules": list(targets),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "torch_threads": torch.get_num_threads(),
        **speed,
    }
    if not resume:
        save_config(cfg, out / "config.yaml")
    trainer, dropped = build_trainer(cfg, model, tokenizer, train.features(), evals.features(), out, speed)
    info["training_arguments_dropped"] = dropped
    if resume and (out / "run_info.json").is_file():
        info["created"] = json.loads((out / "run_info.json").read_text()).get("created", info["created"])
        info["resumed"] = datetime.now().isoformat(timespec="seconds")
    write_json_atomic(out / "run_info.json", info)

    # 5. base eval loss (LoRA B starts at zero, so this is exactly the base model), train, eval
    base_file = out / "base_eval.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        log(f"evaluating the base model on {len(evals.examples)} eval rows")
        base = trainer.evaluate(metric_key_prefix="base_eval")
        write_json_atomic(base_file, base)
    if resume_from is not None:
        for stale in checkpoints(out):  # newer but incomplete: useless, and in the way of the new saves
            if int(stale.name.split("-")[-1]) > int(resume_from.name.split("-")[-1]):
                shutil.rmtree(stale)
        log(f"resuming from {resume_from.name}")
    interrupt = Interrupt()
    guard = checkpoint_callback(interrupt)
    trainer.add_callback(guard)
    tokens_before = json.loads((resume_from / "trainer_state.json").read_text()).get(
        "num_input_tokens_seen", 0) if resume_from else 0
    started = time.time()
    with interrupt:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - started
    if interrupt.requested:
        if trainer.state.global_step == 0:
            raise Interrupted("stopped before the first optimizer step; nothing to resume (start the run again)")
        ckpt = save_interrupted_checkpoint(trainer, guard)
        raise Interrupted(f"stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved "
                          f"in {ckpt}. Resume with: medlora train --resume {out}")
    log(f"evaluating the fine-tuned model on {len(evals.examples)} eval rows")
    final = trainer.evaluate()

    # 6. artifacts, each written under a temporary name and renamed into place
    atomic_dir(out / "adapter", lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    trainer.save_state()
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": result.training_loss,
        "train_steps": trainer.state.global_step,
        "train_samples": trainer.state.global_step * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size,
        "train_seconds": round(train_seconds, 2),
        "train_tokens": tokens,
        "train_tokens_per_second": round((tokens - tokens_before) / train_seconds, 2) if train_seconds else None,
        "eval_loss": final["eval_loss"],
        "eval_perplexity": math.exp(min(final["eval_loss"], 50)),
        "base_eval_loss": base["base_eval_loss"],
        "base_eval_perplexity": math.exp(min(base["base_eval_loss"], 50)),
        "eval_rows": len(evals.examples),
        "eval_precision": precision,  # `medlora eval` recomputes these in fp32
        "resumed_from": resume_from.name if resume_from else None,
    }
    plot_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    if cfg.merge_model:
        log("merging the adapter into the base weights")
        if precision == "bf16":  # merge into the fp32 base, as `medlora merge` does: bf16 would round the update away
            from .generate import load_for_inference

            del trainer, model
            loaded = load_for_inference(str(out))
            merge_and_save(loaded.model, loaded.tokenizer, out / "merged_model")
        else:
            merge_and_save(model, tokenizer, out / "merged_model")
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence means the run finished

    log(f"eval loss {base['base_eval_loss']:.4f} (base) -> {final['eval_loss']:.4f} (fine-tuned); "
        f"{metrics['train_tokens_per_second']} tokens/s")
    log(f"done: {out}")
    print(out)
    return out
