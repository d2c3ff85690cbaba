"""`medlora merge`: the base weights with the LoRA update folded in, as a plain HF model folder."""

from __future__ import annotations

from pathlib import Path

from ..model import load_run_model
from ..files import atomic_dir
from ..rundir import RunDir


def merge_and_save(peft_model, tokenizer, out: Path) -> Path:
    """Fold the LoRA weights into the base weights and save a plain HF model folder (atomically)."""
    merged = peft_model.merge_and_unload()

    def write(tmp):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out, write)


def merge_run(run: RunDir, peft_model=None, trust_remote_code: bool = False) -> Path:
    """Write RUN/merged_model/. ``peft_model``: the run's fp32 model already in memory; else the adapter
    is loaded onto a fresh fp32 copy of its base model."""
    if peft_model is None:
        peft_model, tokenizer, _ = load_run_model(run, trust_remote_code=trust_remote_code)
    else:
        from ..model import load_tokenizer

        tokenizer = load_tokenizer(str(run.adapter_dir), trust_remote_code)
    return merge_and_save(peft_model, tokenizer, run.merged_dir)
