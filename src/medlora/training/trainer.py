"""The Hugging Face Trainer as medlora drives it: the specification's TrainingArguments (filtered against
the installed transformers), the answer-only loss, medlora's collator and progress bar."""

from __future__ import annotations

import inspect
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..config import TrainConfig
from ..cpu import SpeedPlan
from ..data import make_collator
from ..errors import MedloraError, log
from . import distributed
from .callbacks import SampleProgress
from .losses import accepts_logits_to_keep, answer_only_loss

# Some arguments were renamed across transformers releases: the first name the installed
# TrainingArguments accepts wins (transformers 5 folded warmup_ratio into a float warmup_steps,
# and renamed gradient_checkpointing to activation_checkpointing and no_cuda to use_cpu).
RENAMED = {
    "warmup_ratio": ("warmup_ratio", "warmup_steps"),
    "gradient_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
    "use_cpu": ("use_cpu", "no_cuda"),
}


def check_optimizer(name: str) -> None:
    """--optim names an optimizer the Trainer knows and can build here, checked before any model loads (the
    Trainer would only find out after the base model's eval). Asks transformers itself, so the list never drifts."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(output_dir=scratch, optim=name, use_cpu=True, report_to="none")
            Trainer.get_optimizer_cls_and_kwargs(args)
    except ValueError:
        raise MedloraError(f"--optim {name}: not an optimizer that transformers knows; for example adamw_torch (the "
                           "default), adamw_torch_fused, adafactor, sgd, adagrad, rmsprop") from None
    except ImportError as e:
        raise MedloraError(f"--optim {name} needs a package that is not installed ({str(e).splitlines()[0]})") \
            from None


def filter_training_kwargs(kwargs: dict, accepted: set[str] | None = None) -> tuple[dict, list[str]]:
    """Keep only the kwargs the installed TrainingArguments accepts; return (kept, dropped names)."""
    if accepted is None:
        accepted = set(inspect.signature(TrainingArguments.__init__).parameters) - {"self"}
    kept, dropped = {}, []
    for key, value in kwargs.items():
        name = next((n for n in RENAMED.get(key, (key,)) if n in accepted), None)
        if name is None:
            dropped.append(key)
        else:
            kept[name] = value
    return kept, dropped


def training_arguments(cfg: TrainConfig, out: Path, plan: SpeedPlan) -> tuple[TrainingArguments, list[str]]:
    """The specification's TrainingArguments with this run's precision and checkpointing, filtered against
    the installed transformers; returns (arguments, names it did not accept)."""
    import transformers

    wanted = dict(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=1,
        # the user's effective batch, shared by the processes (distributed.check_divides made sure it divides)
        gradient_accumulation_steps=cfg.gradient_accumulation_steps // distributed.world_size(),
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
        bf16=plan.precision == "bf16",  # autocast; the base weights are already bf16 (recipe.build_model)
        gradient_checkpointing=plan.gradient_checkpointing,
        # Non-reentrant checkpointing: the reentrant kind recomputes the forward inside an autograd.Function that
        # DDP's gradient hooks cannot see through (LoRA weights marked ready twice, or never), and it gives no
        # gradient to weights whose block inputs (frozen embeddings) do not require grad.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=False,
        **distributed.ddp_arguments(distributed.world_size() > 1),
    )
    kwargs, dropped = filter_training_kwargs(wanted)
    if dropped:
        log(f"transformers {transformers.__version__} TrainingArguments does not accept {', '.join(dropped)}; ignored")
    return TrainingArguments(**kwargs), dropped


class AnswerOnlyTrainer(Trainer):
    """HF Trainer whose training loss runs the LM head on the answer positions only (losses.py); models
    without ``logits_to_keep`` get the Trainer's own loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_only = accepts_logits_to_keep(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs or not self.answer_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            # evaluation: each row's own mean, as one process computes it (the Trainer's count would be gathered
            # across processes, mixing other ranks' rows into this row's divisor)
            num_items_in_batch = None
        loss = answer_only_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the answer tokens of every process's micro-batches; DDP then averages the
            # gradients over the processes, which this factor undoes (as Trainer.compute_loss does)
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


def build_trainer(cfg: TrainConfig, model, tokenizer, train_features: list[dict], eval_features: list[dict] | None,
                  out: Path, plan: SpeedPlan, progress: bool = True) -> tuple[AnswerOnlyTrainer, list[str]]:
    """The Trainer for one run, with medlora's collator and progress bar. Returns (trainer, dropped args)."""
    args, dropped = training_arguments(cfg, out, plan)
    trainer = AnswerOnlyTrainer(model=model, args=args, train_dataset=train_features, eval_dataset=eval_features,
                                data_collator=make_collator(tokenizer), processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(SampleProgress())
    return trainer, dropped
