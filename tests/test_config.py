"""Defaults from the specification, YAML + CLI precedence, validation, Jupyter-safe parsing,
the TrainingArguments filter and the collision-safe output folder."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from transformers import TrainingArguments

from medlora.cli import build_parser, main, parse_args
from medlora.config import TrainConfig, build_config, save_config
from medlora.errors import MedloraError
from medlora.prompts import DEFAULT_SYSTEM_PROMPT
from medlora.rundir import unique_output_dir
from medlora.training.trainer import filter_training_kwargs


def parse_train(argv):
    return build_config(parse_args(build_parser(), ["train", *argv]))


def test_defaults_match_specification():
    c = TrainConfig()
    assert c.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (c.test_size, c.seed, c.max_seq_len) == (0.05, 42, 512)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.target_modules) == (8, 16, 0.05, None)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (1, 16)
    assert (c.learning_rate, c.weight_decay, c.num_train_epochs, c.max_steps) == (2e-4, 0.0, 1.0, -1)
    assert (c.warmup_ratio, c.lr_scheduler_type, c.optim) == (0.03, "cosine", "adamw_torch")
    assert c.dataloader_num_workers == 0 and c.merge_model is False
    # issue 5 replaced the specification's fixed fp32 + checkpointing with choices made per machine (test_speed.py)
    assert (c.precision, c.gradient_checkpointing) == ("auto", "auto")
    for phrase in ("educational", "doctor", "emergency"):
        assert phrase in c.system_prompt


def test_every_field_has_a_flag_and_cli_beats_yaml(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 1e-4\nlora_r: 4\nlr_scheduler_type: linear\ntarget_modules: [q_proj, v_proj]\n")
    c = parse_train(["--config", str(cfg_file), "--lora_r", "16", "--max-steps", "7", "--no-gradient_checkpointing"])
    assert c.learning_rate == 1e-4  # YAML's "1e-4" is a string to PyYAML; coerced to float
    assert c.lora_r == 16 and c.max_steps == 7 and c.gradient_checkpointing == "off"
    assert c.lr_scheduler_type == "linear" and c.target_modules == ["q_proj", "v_proj"]
    c2 = parse_train(["--target_modules", "q_proj,k_proj", "--system_prompt", "Be brief."])
    assert c2.target_modules == ["q_proj", "k_proj"] and c2.system_prompt == "Be brief."
    flags = {s for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions for s in a.option_strings}
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in flags


def test_saved_config_round_trips(tmp_path):
    c = parse_train(["--data", "x.csv", "--lora_r", "4", "--learning_rate", "3e-4"])
    save_config(c, tmp_path / "config.yaml")
    assert build_config(yaml_path=str(tmp_path / "config.yaml")) == c
    assert TrainConfig().system_prompt == DEFAULT_SYSTEM_PROMPT


def test_unknown_yaml_key_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-4\n")
    with pytest.raises(MedloraError, match="unknown option.*learning_rat"):
        build_config(yaml_path=str(bad))
    with pytest.raises(MedloraError, match="lora_r: expected int"):
        parse_train(["--lora_r", "eight"])


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "0"], "learning_rate must be > 0"),
    (["--test_size", "1.5"], "test_size"),
    (["--lora_r", "0"], "lora_r"),
    (["--lora_dropout", "1"], "lora_dropout"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--max_steps", "0"], "max_steps"),
    (["--warmup_ratio", "-0.1"], "warmup_ratio"),
])
def test_range_checks(argv, message):
    with pytest.raises(MedloraError, match=message):
        parse_train(argv)


def test_jupyter_kernel_argument_is_ignored():
    c = parse_train(["--lora_r", "4", "-f", "/root/.local/share/jupyter/runtime/kernel-1a2b.json"])
    assert c.lora_r == 4
    c = parse_train(["--f=/tmp/kernel-xyz.json", "--seed", "7"])
    assert c.seed == 7


def test_typo_in_a_flag_is_an_error_not_a_silent_default(capsys):
    assert main(["train", "--data", "x.csv", "--learing_rate", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "medlora: error: unknown argument --learing_rate; did you mean --learning_rate?"


def test_checkpointing_and_precision_flags(tmp_path):
    assert parse_train(["--gradient_checkpointing"]).gradient_checkpointing == "on"
    assert parse_train(["--gradient-checkpointing", "auto"]).gradient_checkpointing == "auto"
    assert parse_train(["--no-gradient-checkpointing"]).gradient_checkpointing == "off"
    assert parse_train(["--precision", "fp32"]).precision == "fp32"
    old_run = tmp_path / "old.yaml"  # config.yaml of a run from before issue 5
    old_run.write_text("gradient_checkpointing: true\n")
    assert parse_train(["--config", str(old_run)]).gradient_checkpointing == "on"
    with pytest.raises(MedloraError, match="gradient_checkpointing: expected one of auto, on, off"):
        parse_train(["--gradient_checkpointing", "sometimes"])
    with pytest.raises(MedloraError, match=r"argument --precision: invalid choice: 'fp16' \(choose from"):
        parse_train(["--precision", "fp16"])


def test_training_kwargs_filter_against_installed_signature():
    accepted = set(inspect.signature(TrainingArguments.__init__).parameters)
    kept, dropped = filter_training_kwargs({"learning_rate": 1e-4, "warmup_ratio": 0.03,
                                            "surely_not_an_argument": 1, "gradient_checkpointing": True})
    assert dropped == ["surely_not_an_argument"]
    assert set(kept) <= accepted and kept["learning_rate"] == 1e-4
    assert 0.03 in kept.values() and True in kept.values()
    TrainingArguments(output_dir="/tmp/medlora-filter-test", **kept)  # what survives is really accepted


def test_training_kwargs_filter_maps_renamed_arguments():
    old = {"output_dir", "warmup_ratio", "gradient_checkpointing", "no_cuda"}
    kept, dropped = filter_training_kwargs({"warmup_ratio": 0.1, "gradient_checkpointing": True, "use_cpu": True,
                                            "fp16": False}, accepted=old)
    assert kept == {"warmup_ratio": 0.1, "gradient_checkpointing": True, "no_cuda": True} and dropped == ["fp16"]
    new = {"warmup_steps", "activation_checkpointing", "use_cpu"}
    kept, _ = filter_training_kwargs({"warmup_ratio": 0.1, "gradient_checkpointing": True, "use_cpu": True},
                                     accepted=new)
    assert kept == {"warmup_steps": 0.1, "activation_checkpointing": True, "use_cpu": True}


def test_output_dir_collision_gets_timestamped_sibling(tmp_path):
    target = tmp_path / "run"
    assert unique_output_dir(target) == target  # absent
    target.mkdir()
    assert unique_output_dir(target) == target  # empty
    (target / "adapter").mkdir()
    other = unique_output_dir(target)
    assert other != target and other.parent == tmp_path and other.name.startswith("run-") and not other.exists()
    other.mkdir()
    (other / "x").write_text("x")
    third = unique_output_dir(target)
    assert third not in (target, other) and not third.exists()


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "medlora", "train", "--data", str(tmp_path / "none.csv")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"medlora: error: {tmp_path / 'none.csv'}: file not found"]
