"""Loading a fine-tuned run (adapter on its base, or a merged folder) and generating answers.

Presets follow the specification: greedy for comparisons and evaluation, sampling for demos.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_SYSTEM_PROMPT, MedloraError, load_yaml
from .data import chat_messages
from .model import load_model, load_tokenizer, resolve_model

PRESETS = {
    "greedy": {"do_sample": False, "max_new_tokens": 256},
    "sample": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05,
               "max_new_tokens": 256},
}


def generation_kwargs(mode: str = "greedy", **overrides) -> dict:
    if mode not in PRESETS:
        raise MedloraError(f"unknown mode {mode!r}; choose greedy or sample")
    kwargs = dict(PRESETS[mode])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if not kwargs.get("do_sample"):
        for k in ("temperature", "top_p", "top_k"):
            kwargs.pop(k, None)
    return kwargs


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    system_prompt: str
    description: str


def is_run_dir(path: Path) -> bool:
    return (path / "adapter" / "adapter_config.json").is_file() and (path / "config.yaml").is_file()


def load_for_inference(run_dir: str | None = None, model: str | None = None,
                       trust_remote_code: bool = False) -> Loaded:
    """A run folder (adapter on its base model), a merged/HF model folder, or a base model by name."""
    from .config import TrainConfig

    if run_dir is None:
        if model is None:
            raise MedloraError("give a run folder or --model")
        source = resolve_model(model)
        tok = load_tokenizer(source, trust_remote_code)
        return Loaded(load_model(source, trust_remote_code).eval(), tok, DEFAULT_SYSTEM_PROMPT, f"base model {model}")

    path = Path(run_dir)
    if not path.exists():
        raise MedloraError(f"{path}: no such folder")
    if is_run_dir(path):
        from peft import PeftModel

        cfg = load_yaml(path / "config.yaml")
        base_name = model or cfg.get("model") or TrainConfig.model
        source = resolve_model(base_name)
        tok = load_tokenizer(str(path / "adapter"), trust_remote_code)
        base = load_model(source, trust_remote_code)
        peft_model = PeftModel.from_pretrained(base, str(path / "adapter"))
        return Loaded(peft_model.eval(), tok, cfg.get("system_prompt") or DEFAULT_SYSTEM_PROMPT,
                      f"{path} (adapter on {base_name})")
    if (path / "config.json").is_file():  # merged_model/ or any HF folder
        tok = load_tokenizer(str(path), trust_remote_code)
        prompt = DEFAULT_SYSTEM_PROMPT
        run_cfg = path.parent / "config.yaml"
        if path.name == "merged_model" and run_cfg.is_file():
            prompt = load_yaml(run_cfg).get("system_prompt") or prompt
        return Loaded(load_model(str(path), trust_remote_code).eval(), tok, prompt, f"{path}")
    raise MedloraError(f"{path}: not a medlora run (no adapter/ and config.yaml) and not a model folder (no config.json)")


def generate(loaded: Loaded, messages: list[dict], gen: dict, stream=None, seed: int | None = None) -> str:
    """Generate one assistant turn. ``stream`` is a file to print tokens to as they come (or None)."""
    from transformers import TextStreamer, set_seed

    tok = loaded.tokenizer
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if seed is not None:
        set_seed(seed)
    streamer = None
    if stream is not None:
        class _Streamer(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                print(text, end="" if not stream_end else "\n", file=stream, flush=True)

        streamer = _Streamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = loaded.model.generate(**enc, **gen, pad_token_id=tok.pad_token_id, streamer=streamer)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer(loaded: Loaded, question: str, gen: dict, system_prompt: str | None = None, stream=None,
           seed: int | None = None) -> str:
    return generate(loaded, chat_messages(system_prompt or loaded.system_prompt, question), gen, stream, seed)


def chat_repl(loaded: Loaded, gen: dict, system_prompt: str | None = None, seed: int | None = None) -> None:
    """Interactive multi-turn chat. Ctrl-C stops the current answer; Ctrl-D or /exit quits; /reset clears."""
    system = system_prompt or loaded.system_prompt
    history: list[dict] = [{"role": "system", "content": system}]
    print(f"medlora chat: {loaded.description}. /reset clears the history, /exit or Ctrl-D quits, "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            question = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history = history[:1]
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": question})
        print("assistant> ", end="", flush=True)
        try:
            reply = generate(loaded, history, gen, stream=sys.stdout, seed=seed)
            history.append({"role": "assistant", "content": reply})
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            history.pop()


def run_info(run_dir: str | Path) -> dict:
    p = Path(run_dir) / "run_info.json"
    return json.loads(p.read_text()) if p.is_file() else {}
