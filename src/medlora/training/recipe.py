"""`medlora train`: the specification's CPU LoRA recipe as a sequence of named phases.

    preflight    everything that can fail on user input, before a model is loaded
    load_data    tokenise the split with the model's chat template, answer-only labels
    build_model  base model in this CPU's precision, LoRA on the projections, the speed plan
    open_run     create the run folder, write config.yaml and run_info.json
    train        base eval loss, then the Trainer (checkpoints, resume, Ctrl-C)
    finish       final eval, adapter, loss curve, optional merge, metrics.json last
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

from .. import __version__
from ..allocator import describe as describe_allocator
from ..allocator import release_freed_memory
from ..config import RESUMABLE_CHANGES, TrainConfig
from ..cpu import (SpeedPlan, cpu_has_native_bf16, cpu_summary, int8_hint, precision_reason,
                   resolve_checkpointing, resolve_precision)
from ..data import DataReport, EncodedSplit, encode_frame, split
from ..errors import Interrupted, MedloraError, log
from ..files import check_output_location, crash_point, file_sha256
from ..model import check_lora_targets, find_lora_targets, load_model, load_tokenizer, resolve_model
from ..rundir import RunDir, claim_output_dir
from . import distributed
from .callbacks import CheckpointGuard, FiniteLoss, Interrupt, SampleProgress
from .dropout import use_lora_dropout
from .inputs import read_data
from .int8 import parameter_counts, quantize_frozen_linears
from .lighter import add_lora_in_place, lighten_activations
from .losses import accepts_logits_to_keep
from .stopping import Stopped, signals_stop, stopped_here, stopped_outside_training
from .trainer import build_trainer, check_optimizer


@dataclass
class Job:
    """What preflight established: the checked configuration, its data, and where the run goes."""

    cfg: TrainConfig
    table: tuple  # (DataFrame, DataReport) of cfg.data
    data_sha256: str
    run: RunDir
    resume_from: Path | None  # the newest complete checkpoint, when resuming
    extending: bool = False   # resuming a finished run with a larger --max_steps
    steps_done: bool = False  # resume_from is the last step already (killed while writing the final artifacts)


@dataclass
class PreparedData:
    report: DataReport
    train: EncodedSplit
    evals: EncodedSplit


@dataclass
class Outcome:
    """What training produced, for the finishing phase."""

    train_loss: float
    seconds: float
    tokens_before: int  # tokens seen before this process started (a resumed run's earlier work)


# ---------------------------------------------------------------- phases

def preflight(cfg: TrainConfig, resume: str | Path | None, claimed: Path | None = None) -> Job:
    """Validate the data, the run folder and (when resuming) its checkpoints, before any model loads.
    ``claimed``: the folder rank 0 claimed and locked (the other ranks of a distributed run neither claim nor lock)."""
    table = read_data(cfg)  # fast fail on a bad CSV before even resolving the model
    check_optimizer(cfg.optim)
    cfg = replace(cfg, data=str(Path(cfg.data).resolve()))  # saved absolute: --resume works from anywhere
    sha = file_sha256(cfg.data)
    if not resume:
        check_output_location(Path(cfg.output_dir))
        run = RunDir(claimed) if claimed is not None else claim_output_dir(cfg.output_dir)  # before any slow work
        return Job(cfg, table, sha, run, None)
    run = RunDir(resume)
    check_output_location(run.path)
    saved = run.read_info().get("data_sha256")
    if saved and saved != sha:
        raise MedloraError(f"{cfg.data} changed since this run started; resuming would train on different rows")
    done = run.read_metrics().get("train_steps")
    extending = done is not None and cfg.max_steps > done
    if done is not None and not extending:
        raise MedloraError(f"{run}: this run already finished ({done} optimizer steps); nothing was changed. To "
                           f"train it further, give a larger step count: medlora train --resume {run.shell} "
                           f"--max_steps N (N > {done})")
    resume_from = run.latest_complete_checkpoint()
    if resume_from is None:
        raise MedloraError(f"{run}: no complete checkpoint to resume from; start a new run instead")
    try:  # same size as recorded but damaged (a disk error): the Trainer would fail on it with a traceback
        json.loads(run.trainer_state_file(resume_from).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise MedloraError(f"{resume_from}: its {run.trainer_state_file(resume_from).name} is damaged; move that "
                           "checkpoint folder away to resume from the one before it") from None
    state = run.trainer_state(resume_from)
    target = cfg.max_steps if cfg.max_steps > 0 else state.get("max_steps")
    steps_done = bool(target) and state.get("global_step", 0) >= target
    if claimed is None:
        run.lock_or_fail()
    return Job(cfg, table, sha, run, resume_from, extending, steps_done)


def preflight_ranks(cfg: TrainConfig, resume: str | Path | None) -> Job:
    """Distributed: rank 0 alone runs the checks that claim and lock the run folder, then every rank learns its
    name (a new run's folder may have been made unique) or rank 0's error."""
    distributed.check_same_settings(cfg.to_dict())
    if distributed.is_main():
        try:
            job = preflight(cfg, resume)
        except MedloraError as e:
            distributed.broadcast((None, str(e)))
            raise
        distributed.broadcast((str(job.run.path), None))
        distributed.note_run_dir(job.run.path)
        return job
    path, error = distributed.broadcast(None)
    if error is not None:
        raise MedloraError(error)
    return preflight(cfg, resume, claimed=Path(path))


def prepare_data(cfg: TrainConfig, tokenizer, table: tuple) -> PreparedData:
    """Split, cap and tokenise ``table`` (load_qa_csv's result for cfg.data)."""
    df, report = table
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
    log(f"data: {report.rows_kept} usable rows ({report.dropped_empty} dropped: empty question/answer); "
        f"train {len(train.examples)}, eval {len(evals.examples)}; "
        f"{train.truncated + evals.truncated} answers truncated at {cfg.max_seq_len} tokens; "
        f"{train.skipped_long_prompt + evals.skipped_long_prompt} rows skipped (prompt too long)")
    return PreparedData(report, train, evals)


def apply_lora(cfg: TrainConfig, model):
    """Wrap a base model with the run's LoRA config; returns (peft_model, target names).
    The adapter weights stay fp32 whatever the base model's dtype (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    targets = cfg.target_modules or find_lora_targets(model)
    check_lora_targets(model, targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      bias="none", task_type="CAUSAL_LM", target_modules=targets)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise MedloraError(f"LoRA setup failed for target_modules={targets}: {str(e).splitlines()[0]}") from None
    use_lora_dropout(peft_model)  # the same dropout, its mask drawn with a fraction of the random numbers
    return peft_model, list(targets)


def prepare_model(cfg: TrainConfig, model, precision: str) -> tuple:
    """Base model -> (peft_model, targets, SpeedPlan) for a resolved ``precision`` ('fp32', 'bf16' or 'int8')."""
    if precision == "bf16" and model.dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)  # frozen base weights in bf16: half the memory traffic and RAM
    model, targets = apply_lora(cfg, model)
    if precision == "int8":
        # after LoRA is in place, so only the frozen base linears (LoRA's base_layer) turn int8; module names,
        # the adapter's state dict and checkpoints stay those of an fp32 run
        quantize_frozen_linears(model)
        model.float()  # what stays a parameter (norms, biases, LoRA) in fp32, whatever dtype the weights were stored in
        lighten_activations(model)  # same arithmetic, fewer saved activations (lighter.py)
    else:
        add_lora_in_place(model)  # LoRA's product added into the base output in place (lighter.py)
    release_freed_memory()  # what loading and converting freed (jemalloc keeps freed pages otherwise)
    checkpointing, why = resolve_checkpointing(cfg.gradient_checkpointing, model.config, cfg.max_seq_len,
                                               cfg.per_device_train_batch_size, precision)
    return model, targets, SpeedPlan(precision, checkpointing, why, accepts_logits_to_keep(model),
                                     precision_reason(cfg.precision, precision))


def build_model(cfg: TrainConfig, source: str) -> tuple:
    """Load the base model in this run's precision and put LoRA on it: (peft_model, targets, plan)."""
    precision = resolve_precision(cfg.precision)
    # int8: the weights as stored (bf16 for Qwen2.5), since they are quantised anyway; the build then peaks at
    # about the bf16 model's size, not the fp32 one's (6.2 GB for Qwen2.5-1.5B)
    dtype = {"bf16": torch.bfloat16, "int8": "auto"}.get(precision, torch.float32)
    base = load_model(source, cfg.trust_remote_code, dtype=dtype, allow_pickle_weights=cfg.allow_pickle_weights)
    model, targets, plan = prepare_model(cfg, base, precision)
    trainable, total = parameter_counts(model)  # int8 runs hold the frozen linears outside nn.Parameters
    log(f"LoRA on {', '.join(targets)}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%)")
    log(f"precision {precision} ({'native bf16 on this CPU' if cpu_has_native_bf16() else 'no native bf16'}"
        f"{'' if cfg.precision == 'auto' else ', set by --precision'}); gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'} ({plan.gradient_checkpointing_why}); "
        f"memory allocator: {describe_allocator()}")
    hint = int8_hint(cfg.precision, precision)
    if hint:
        log(hint)
    return model, targets, plan


def run_info(job: Job, source: str, data: PreparedData, targets: list[str], model, plan: SpeedPlan) -> dict:
    import peft
    import transformers

    trainable, total = parameter_counts(model)
    info = {
        "medlora_version": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "model": job.cfg.model,
        "model_source": source,
        "data": str(Path(job.cfg.data).resolve()),
        "data_sha256": job.data_sha256,
        "data_rows_read": data.report.rows_read,
        "data_rows_dropped_empty": data.report.dropped_empty,
        "train_rows": len(data.train.examples),
        "eval_rows": len(data.evals.examples),
        "truncated_answers": data.train.truncated + data.evals.truncated,
        "skipped_long_prompt": data.train.skipped_long_prompt + data.evals.skipped_long_prompt,
        "target_modules": list(targets),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_summary(),
        "allocator": describe_allocator(),
        **plan.to_dict(),
    }
    if job.resume_from is not None:
        previous = job.run.read_info()
        info["created"] = previous.get("created", info["created"])
        info["resumed"] = datetime.now().isoformat(timespec="seconds")
    return info


def open_run(job: Job, info: dict) -> None:
    """Check the disk has room, then create the run folder (only now: bad input never leaves one behind)."""
    cfg, run = job.cfg, job.run
    # a checkpoint holds the adapter and two Adam moments (fp32); keep save_total_limit + 1 while rotating
    need = (info["trainable_parameters"] * 4 * 3 * (cfg.save_total_limit + 2)
            + (info["total_parameters"] * 4 if cfg.merge_model else 0))
    check_output_location(run.path, need)
    if job.resume_from is None and run.path != Path(cfg.output_dir):
        log(f"{cfg.output_dir} exists and is not empty (or another run is starting there); writing to {run} instead")
    saved = run.read_config() if job.resume_from is not None else cfg
    changed = [f"{k} {getattr(cfg, k)} (was {getattr(saved, k)})" for k in RESUMABLE_CHANGES
               if getattr(cfg, k) != getattr(saved, k)]
    if changed:
        log(f"resuming with {', '.join(changed)}")
    if job.resume_from is None or job.extending or changed:
        run.write_config(cfg)
    if job.extending:
        log(f"extending the finished run from {run.read_metrics().get('train_steps')} to {cfg.max_steps} steps")
    run.write_info(info)


def train(job: Job, trainer, n_eval: int) -> tuple[dict, Outcome]:
    """Base eval loss (LoRA B starts at zero, so this is exactly the base model), then train.
    Returns (base eval metrics, outcome); raises Interrupted after a Ctrl-C checkpoint."""
    run, main = job.run, distributed.is_main()
    base = distributed.broadcast(run.read_base_eval())  # every rank evaluates, or none: evaluate is collective
    if base is None:
        log(f"evaluating the base model on {n_eval} eval rows")
        crash_point("base_eval")
        base = trainer.evaluate(metric_key_prefix="base_eval")  # distributed: each rank a shard, losses gathered
        distributed.after_evaluate_before_train(trainer)
        if main:
            run.write_base_eval(base)
    if job.resume_from is not None:
        if main:
            run.remove_checkpoints_after(job.resume_from)
        log(f"resuming from {job.resume_from.name}")
    interrupt = Interrupt(terminate=not distributed.active())  # Interrupt says why a worker leaves SIGTERM alone
    guard = (distributed.DistributedCheckpointGuard if distributed.active() else CheckpointGuard)(interrupt)
    finite = FiniteLoss()
    trainer.add_callback(guard)
    trainer.add_callback(finite)
    tokens_before = run.trainer_state(job.resume_from).get("num_input_tokens_seen", 0) if job.resume_from else 0
    if job.steps_done:  # every step is in the checkpoint: load it and finish, never train past max_steps
        return base, restore_finished_steps(job, trainer)
    started = time.time()
    with interrupt:
        try:
            result = trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
        finally:
            for callback in trainer.callback_handler.callbacks:
                if isinstance(callback, SampleProgress):
                    callback.close()
    seconds = time.time() - started
    if finite.bad_step is not None:
        last = run.latest_complete_checkpoint()
        kept = f"the last good checkpoint is {last.name}" if last else "no checkpoint was saved before it"
        raise MedloraError(f"training stopped at step {finite.bad_step}: the loss became {finite.bad_value} "
                           f"(not a finite number); {kept}. Start a new run with a lower --learning_rate")
    if interrupt.requested:
        code = interrupt.exit_code
        if trainer.state.global_step == 0:
            raise Interrupted("stopped before the first optimizer step; nothing to resume (start the run again)", code)
        ckpt = guard.save_interrupted(trainer)  # distributed: every rank stopped after the same sample
        raise Interrupted(f"stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved "
                          f"in {ckpt}. Resume with: medlora train --resume {run.shell}", code)
    return base, Outcome(result.training_loss, seconds, tokens_before)


def restore_finished_steps(job: Job, trainer) -> Outcome:
    """A run killed after its last optimizer step (while writing the adapter or metrics.json): take the
    adapter weights and the log history from its final checkpoint."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import TrainerState

    log(f"{job.resume_from.name} holds the run's last step; writing the final artifacts without training further")
    set_peft_model_state_dict(trainer.model, load_peft_weights(str(job.resume_from)))
    trainer.state = TrainerState.load_from_json(str(job.run.trainer_state_file(job.resume_from)))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return Outcome(sum(losses) / len(losses) if losses else float("nan"), 0.0, trainer.state.num_input_tokens_seen)


def finish(job: Job, trainer, model, tokenizer, base: dict, outcome: Outcome, plan: SpeedPlan,
           n_eval: int) -> dict | None:
    """Final eval, then the artifacts, each written atomically; metrics.json last (None on ranks other than 0)."""
    from .plots import plot_loss_curve

    cfg, run = job.cfg, job.run
    log(f"evaluating the fine-tuned model on {n_eval} eval rows")
    crash_point("final_eval")
    final = trainer.evaluate()  # distributed: the last collective; then rank 0 alone writes the artifacts
    if not distributed.is_main():
        return None
    run.write_adapter(model, tokenizer)
    trainer.save_state()
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": outcome.train_loss,
        "train_steps": trainer.state.global_step,
        "train_samples": trainer.state.global_step * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size,
        "train_seconds": round(outcome.seconds, 2),
        "train_tokens": tokens,
        "train_tokens_per_second": (round((tokens - outcome.tokens_before) / outcome.seconds, 2)
                                    if outcome.seconds else None),
        "eval_loss": final["eval_loss"],
        "eval_perplexity": math.exp(min(final["eval_loss"], 50)),
        "base_eval_loss": base["base_eval_loss"],
        "base_eval_perplexity": math.exp(min(base["base_eval_loss"], 50)),
        "eval_rows": n_eval,
        "eval_precision": plan.precision,  # `medlora eval` recomputes these in fp32
        "resumed_from": job.resume_from.name if job.resume_from else None,
    }
    plot_loss_curve(trainer.state.log_history, run.loss_curve)
    if cfg.merge_model:
        from ..export.merge import merge_run

        log("merging the adapter into the base weights")
        # a bf16 run merges into a freshly loaded fp32 base, as `medlora merge` does: bf16 would round the
        # update away (an int8 run has no fp32 base weights in memory); an fp32 run merges the model it has
        merge_run(run, model if plan.precision == "fp32" else None, trust_remote_code=cfg.trust_remote_code)
    run.write_metrics(metrics)  # last: its presence means the run finished
    return metrics


# ---------------------------------------------------------------- the recipe

def run(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train (or, with ``resume``, continue the run in that folder); returns the run folder. In a torchrun worker
    (RANK/WORLD_SIZE set), this process trains its share and rank 0 writes the run folder."""
    ranks = distributed.setup(cfg.num_threads, cfg.gradient_accumulation_steps)
    job = None
    try:
        with signals_stop(enabled=not ranks):
            job = preflight_ranks(cfg, resume) if ranks else preflight(cfg, resume)
            return _run(job)
    except BaseException as e:
        if ranks and distributed.is_peer_lost(e):  # a peer died: one line, and no waiting on it
            distributed.peer_lost(e, job.run if job else cfg.output_dir)
        if job is not None:
            # a new run stopped before its first complete checkpoint cannot be resumed: what it wrote goes (one
            # process only: a distributed run's launcher reports on the folder)
            discarded = not ranks and job.resume_from is None and job.run.discard_unstarted()
            job.run.unlock(remove_if_unused=True)  # a run that failed before writing anything leaves no folder
            message = stopped_here(job.run, e)
            if message:  # a full disk or no memory left after hours of training: one line, and what to do
                raise MedloraError(message) from None
            if isinstance(e, (KeyboardInterrupt, Stopped)):
                raise stopped_outside_training(job.run, e, discarded) from None
        raise
    finally:
        if job is not None:
            job.run.unlock()
        distributed.shutdown()


def _run(job: Job) -> Path:
    from transformers import set_seed

    cfg = job.cfg
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    data = prepare_data(cfg, tokenizer, job.table)

    torch.set_num_threads(distributed.threads_per_process(cfg.num_threads))  # the cores, split between processes
    set_seed(cfg.seed)  # python, numpy, torch
    model, targets, plan = build_model(cfg, source)
    info = run_info(job, source, data, targets, model, plan)

    trainer, dropped = build_trainer(cfg, model, tokenizer, data.train.features(), data.evals.features(),
                                     job.run.path, plan, progress=distributed.is_main())
    info["training_arguments_dropped"] = dropped
    info["processes"] = distributed.world_size()  # this session's; a resumed run may use another count
    if distributed.is_main():
        open_run(job, info)

    n_eval = len(data.evals.examples)
    base, outcome = train(job, trainer, n_eval)
    metrics = finish(job, trainer, model, tokenizer, base, outcome, plan, n_eval)
    if metrics is None:  # a rank other than 0: rank 0 writes the artifacts
        return job.run.path
    speed = metrics["train_tokens_per_second"]  # None where this session trained no step (all in the checkpoint)
    log(f"eval loss {base['base_eval_loss']:.4f} (base) -> {metrics['eval_loss']:.4f} (fine-tuned)"
        + (f"; {speed} tokens/s" if speed is not None else ""))
    log(f"done: {job.run}")
    print(job.run)
    return job.run.path
