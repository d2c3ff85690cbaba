"""Model resolution (bundled offline model, local folder, unreachable hub) and LoRA target detection."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from medlora.errors import MedloraError
from medlora.cpu import cpu_has_native_bf16
from medlora.model import SMOLLM2, find_lora_targets, resolve_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


def tiny(config_cls, **kw):
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, **kw)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("config_cls", [Qwen2Config, LlamaConfig])
def test_targets_detected_on_qwen2_and_llama(config_cls):
    model = tiny(config_cls)
    assert find_lora_targets(model) == ALL
    assert "lm_head" not in find_lora_targets(model)


def test_no_projection_layers_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(MedloraError, match="--target_modules"):
        find_lora_targets(model)


def test_bundled_model_resolves_offline(smol_dir, tokenizer):
    assert resolve_model(SMOLLM2) == str(smol_dir)
    assert (smol_dir / "model.safetensors").is_file()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"


def test_unreachable_hub_names_the_offline_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(MedloraError, match="hub is unreachable.*--model smollm2-135m"):
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")
    # not declared offline, but the endpoint refuses connections: the same clear error, at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(MedloraError, match="hub is unreachable.*--model smollm2-135m"):
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")


def test_local_folder_errors(tmp_path):
    with pytest.raises(MedloraError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(MedloraError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_cpu_bf16_detection_reads_cpu_flags():
    from medlora.cpu import cpu_flags

    assert cpu_has_native_bf16() == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def test_busy_elsewhere_sees_another_process_now_and_not_this_one():
    """llama.cpp's thread count leaves out the cores other processes keep busy *now* (the 1-minute load average
    still counted a training run that had just ended): a spinning child shows, this process's own work does not."""
    import subprocess
    import sys
    import threading
    import time

    from medlora.cpu import busy_elsewhere, usable_cpus
    from medlora.inference.llamacpp import default_threads

    assert 1 <= default_threads() <= usable_cpus()
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass\n"  # bounded: 20 s at most
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # the child is running
        assert busy_elsewhere(0.5) >= 0.5
    finally:
        child.kill()
        child.wait()
    stop = time.time() + 0.6

    def spin_here():
        while time.time() < stop:
            pass

    mine = threading.Thread(target=spin_here)
    mine.start()
    quiet = busy_elsewhere(0.5)  # this process spins one core meanwhile; other pytest workers may run too
    mine.join()
    assert quiet < usable_cpus()  # never counts this process's own core on top of the others
