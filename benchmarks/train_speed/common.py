"""Constants shared by the parent and the children, and the benchmark's log line."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
ROOT = HERE.parent                              # the repository
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medquad.csv"
COMMAND = "python -m benchmarks.train_speed"    # how the report names the command (run from ROOT)
# run order: slowest-to-fail last
CONTENDERS = ("reference", "medlora", "medlora_fp32", "medlora_int8", "trl_tuned", "trl_shipped")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
TRL_SHIPPED_BATCH = 8  # TrainingArguments' per_device_train_batch_size default (SFTConfig keeps it)
FULL_SIZE_LAYERS = 28

# Qwen2.5-1.5B(-Instruct) architecture: same shapes, hence the same FLOPs, as the real model.
QWEN25_15B = dict(
    hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0, use_cache=False,
)


def log(msg: str) -> None:
    print(f"[train_speed {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
