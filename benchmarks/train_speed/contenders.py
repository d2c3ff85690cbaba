"""The trainers being compared, each built on the same random model, tokenizer and rows (child side).

Every builder takes (spec, model, tokenizer, out) and returns (trainer, settings it ran with).
"""

from __future__ import annotations

import os
import tempfile

from .common import LORA_TARGETS, QWEN25_15B


def build_random_model(layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN25_15B, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    return model


def spec_lora():
    """The specification's LoRA settings (written here, not taken from medlora)."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=LORA_TARGETS)


def build_reference(spec, model, tok, out):
    """The specification's recipe through plain HF Trainer + PEFT, independent of medlora's training code
    (medlora's filter_training_kwargs only maps argument names to what the installed transformers accepts)."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medlora.training.trainer import filter_training_kwargs

    model.config.use_cache = False
    model = get_peft_model(model, spec_lora())
    kwargs, dropped = filter_training_kwargs(dict(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=2e-4, weight_decay=0.0, lr_scheduler_type="cosine", warmup_ratio=0.03, optim="adamw_torch",
        max_steps=spec["warmup"] + spec["steps"], logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, fp16=False, bf16=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, seed=spec["seed"], disable_tqdm=True))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=spec["features"],
                      data_collator=collator, processing_class=tok)
    return trainer, {"training_arguments_dropped": dropped}


def build_medlora(spec, model, tok, out, **config):
    """medlora's default training path: whatever TrainConfig's defaults, prepare_model and build_trainer do
    today (``config``: fields to override, e.g. precision="fp32" for its path on CPUs without native bf16)."""
    import torch

    from medlora.config import build_config
    from medlora.cpu import resolve_precision
    from medlora.training.recipe import prepare_model
    from medlora.training.trainer import build_trainer

    steps = spec["warmup"] + spec["steps"]
    # Checkpoints every save_steps optimizer steps are part of a real run; with the benchmark's short steps
    # they would land inside the timed window far more often, so none is written (save_steps past max_steps).
    cfg = build_config(output_dir=str(out), max_seq_len=spec["seq"], gradient_accumulation_steps=spec["grad_accum"],
                       max_steps=steps, save_steps=steps + 1, **config)
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)  # as medlora.training.recipe.run does
    # precision and checkpointing as the CLI's train command picks them
    peft_model, _, plan = prepare_model(cfg, model, resolve_precision(cfg.precision))
    trainer, dropped = build_trainer(cfg, peft_model, tok, spec["features"], None, out, plan, progress=False)
    trainer.args.disable_tqdm = True
    settings = {k: v for k, v in cfg.to_dict().items() if k != "system_prompt"}
    return trainer, {**settings, "resolved": plan.to_dict(), "training_arguments_dropped": dropped}


def trl_dataset(spec):
    """The same rows as prompt/completion conversations (TRL tokenises them itself)."""
    from datasets import Dataset

    system = {"role": "system", "content": spec["system_prompt"]}
    return Dataset.from_list([{"prompt": [system, {"role": "user", "content": r["question"]}],
                               "completion": [{"role": "assistant", "content": r["answer"]}]}
                              for r in spec["rows"]])


def trl_config(spec, out, tuned: bool):
    """(SFTConfig, the error SFTConfig's pure defaults raised on this machine or None)."""
    from trl import SFTConfig

    kwargs = dict(output_dir=str(out), max_steps=spec["warmup"] + spec["steps"], report_to="none",
                  gradient_accumulation_steps=spec["grad_accum"], save_strategy="no", disable_tqdm=True)
    if tuned:
        return SFTConfig(**kwargs, bf16=False, fp16=False, per_device_train_batch_size=1, max_length=spec["seq"]), None
    # As shipped, SFTConfig turns bf16 on, and TrainingArguments then refuses to start on a machine without an
    # accelerator unless use_cpu=True. Record that, then apply the fix its own error message asks for.
    try:
        return SFTConfig(**kwargs), None
    except ValueError as e:
        return SFTConfig(**kwargs, use_cpu=True), f"ValueError: {str(e).splitlines()[0]}"


def build_trl(spec, model, tok, out, tuned: bool):
    from trl import SFTTrainer

    cfg, shipped_error = trl_config(spec, out, tuned)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=trl_dataset(spec), processing_class=tok,
                         peft_config=spec_lora())
    keys = ("bf16", "fp16", "per_device_train_batch_size", "max_length", "gradient_checkpointing",
            "gradient_checkpointing_kwargs", "completion_only_loss", "assistant_only_loss", "packing",
            "padding_free", "learning_rate", "logging_steps", "loss_type", "use_cpu")
    settings = {k: getattr(cfg, k, None) for k in keys}
    if shipped_error:
        settings["error_with_pure_defaults"] = shipped_error
    return trainer, settings


BUILDERS = {
    "reference": build_reference,
    "medlora": build_medlora,
    "medlora_fp32": lambda spec, model, tok, out: build_medlora(spec, model, tok, out, precision="fp32"),
    "medlora_int8": lambda spec, model, tok, out: build_medlora(spec, model, tok, out, precision="int8"),
    "trl_tuned": lambda spec, model, tok, out: build_trl(spec, model, tok, out, tuned=True),
    "trl_shipped": lambda spec, model, tok, out: build_trl(spec, model, tok, out, tuned=False),
}


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
