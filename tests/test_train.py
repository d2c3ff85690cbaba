"""End-to-end training on the real bundled model and sample: artifacts, learning, merge, MedQuAD smoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medlora.cli import main
from medlora.config import build_config
from medlora.cpu import cpu_flags, cpu_has_native_bf16

pytestmark = pytest.mark.slow


def test_run_folder_artifacts(trained_run):
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "trainer_state.json", "metrics.json", "config.yaml",
                 "run_info.json", "loss_curve.png", "merged_model/config.json", "merged_model/model.safetensors"):
        assert (trained_run / name).is_file(), name
    assert not any(p.name.endswith(".tmp") for p in trained_run.iterdir())
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["train_steps"] == 12 and metrics["train_tokens"] > 12 * 150
    assert {"train_loss", "eval_loss", "base_eval_loss", "eval_perplexity"} <= set(metrics)
    state = json.loads((trained_run / "trainer_state.json").read_text())
    assert sum("loss" in h for h in state["log_history"]) == 12  # logged every optimizer step
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    assert info["eval_rows"] == 6 and info["train_rows"] == 144
    assert (trained_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_saved_config_reruns_the_same_configuration(trained_run, sample_csv):
    cfg = build_config(yaml_path=str(trained_run / "config.yaml"))
    assert cfg.data == str(sample_csv) and cfg.max_steps == 12 and cfg.learning_rate == 1e-3
    assert cfg.model == "smollm2-135m" and cfg.max_eval_samples is None
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["lora_r"] == 8


def _eval_loss(model, tokenizer, cfg):
    """Mean answer-token loss over the eval rows, computed here independently of the Trainer."""
    from medlora.data import encode_frame, load_qa_csv, split

    df, _ = load_qa_csv(cfg.data)
    _, eval_df = split(df, cfg.test_size, cfg.seed)
    enc = encode_frame(tokenizer, eval_df, cfg.system_prompt, cfg.max_seq_len)
    losses = []
    with torch.no_grad():
        for ex in enc.examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            losses.append(out.loss.item())
    return sum(losses) / len(losses)


def test_training_lowers_eval_loss_against_the_base_model(trained_run, smol_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = build_config(yaml_path=str(trained_run / "config.yaml"))
    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    base_loss = _eval_loss(base, tokenizer, cfg)
    tuned = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    tuned_loss = _eval_loss(tuned, tokenizer, cfg)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    rel = 1e-3 if metrics["eval_precision"] == "fp32" else 1e-2  # training evaluates in its own precision
    assert metrics["base_eval_loss"] == pytest.approx(base_loss, rel=rel)
    assert metrics["eval_loss"] == pytest.approx(tuned_loss, rel=rel)
    assert tuned_loss < base_loss - 0.05, (base_loss, tuned_loss)


def test_merged_model_matches_adapter_model(trained_run, smol_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(trained_run / "merged_model", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = tokenizer("<|im_start|>user\nWhat causes gout?<|im_end|>\n<|im_start|>assistant\n",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = adapter_model(input_ids=ids).logits
        m = merged(input_ids=ids).logits
    assert (a - m).abs().max().item() < 1e-4
    # and the adapter really changed the model (a merge of a zero adapter would pass trivially)
    with torch.no_grad():
        with adapter_model.disable_adapter():
            b = adapter_model(input_ids=ids).logits
    assert (a - b).abs().max().item() > 1e-2


def test_merge_command_rebuilds_merged_model(trained_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("merged_model"))
    assert main(["merge", str(run)]) == 0
    assert (run / "merged_model" / "model.safetensors").is_file()
    assert main(["merge", str(tmp_path)]) == 2


def test_second_run_into_same_folder_is_not_overwritten(trained_run, sample_csv, tiny_model_dir, capsys):
    before = (trained_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(trained_run),
                 "--max_steps", "1", "--gradient_accumulation_steps", "1", "--max_eval_samples", "2"]) == 0
    assert (trained_run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    out, err = capsys.readouterr()
    new_dir = out.strip().splitlines()[-1]
    assert new_dir.startswith(str(trained_run) + "-") and (new_dir and __import__("os").path.isdir(new_dir))
    # --precision auto: fp32 where the CPU has no native bf16, else bf16; the log names int8 where it was faster
    # on that CPU class (not on CPUs with AMX)
    precision = json.loads((Path(new_dir) / "run_info.json").read_text())["precision"]
    assert precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    amx = bool(cpu_flags() & {"amx_bf16", "amx_int8"})
    assert ("--precision int8 trained the 1.5B model 1.7x faster than fp32" in err) == (precision == "fp32")
    assert ("--precision int8 trained the 1.5B model 1.25x faster than bf16" in err) == (precision == "bf16" and not amx)
    assert err.count("--precision int8 trained") <= 1


def test_medquad_smoke_run(medquad_csv, tiny_model_dir, tmp_path):
    """The whole of MedQuAD through the pipeline (read, split, tokenise with SmolLM2's tokenizer, train, eval);
    the tiny model, since what is tested here is the data path at full size, not learning."""
    out = tmp_path / "medquad"
    assert main(["train", "--data", str(medquad_csv), "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_steps", "5", "--gradient_accumulation_steps", "1", "--max_eval_samples", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 5 and metrics["eval_rows"] == 4
    info = json.loads((out / "run_info.json").read_text())
    assert info["data_rows_read"] == 15566 and info["truncated_answers"] > 0
