"""Ollama's Modelfile beside an exported GGUF: the chat format as a Go template, the run's system prompt, the stop
tokens and medlora's sampling preset. A Modelfile medlora did not write is never replaced."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MedloraError, log
from ..rundir import MODELFILE

_CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                    '{{ end }}<|im_start|>assistant\n')


MODELFILE_MARK = "# written by medlora export"


def modelfile_text(gguf_file: str, chat_template: str, system_prompt: str, vocab: dict) -> str:
    """An Ollama Modelfile: the GGUF, the chat format as a Go template (ChatML), the run's system prompt, the
    stop tokens and medlora's sampling preset."""
    from ..inference.backend import PRESETS
    from ..inference.llamacpp import HF_DEFAULT_TOP_K

    if '"""' in system_prompt:
        raise MedloraError(f'the system prompt contains """, which an Ollama {MODELFILE} cannot quote')
    lines = [f"{MODELFILE_MARK}: ollama create NAME -f THIS_FILE",
             "# medlora's emergency guard does not run in Ollama: its notice for red-flag messages (crushing chest",
             "# pain, thoughts of suicide, ...) comes only from medlora chat or medlora serve",
             f"FROM ./{gguf_file}"]
    if "<|im_start|>" in chat_template and "<|im_end|>" in vocab:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
    else:
        log(f"the chat template is not ChatML; the {MODELFILE} leaves the template to Ollama (it reads the GGUF's)")
    lines.append(f'SYSTEM """{system_prompt}"""')
    for stop in ("<|im_end|>", "<|endoftext|>"):
        if stop in vocab:
            lines.append(f'PARAMETER stop "{stop}"')
    sample = PRESETS["sample"]
    # top_k, min_p and repeat_last_n too: Ollama's own defaults (40, 0.05 in newer versions, 64) differ from
    # medlora's sampling preset (transformers' top_k 50, no min_p, the repetition penalty over the whole context:
    # repeat_last_n -1 in Ollama's terms)
    lines += [f"PARAMETER temperature {sample.temperature}", f"PARAMETER top_p {sample.top_p}",
              f"PARAMETER top_k {HF_DEFAULT_TOP_K}", "PARAMETER min_p 0",
              f"PARAMETER repeat_penalty {sample.repetition_penalty}",
              "PARAMETER repeat_last_n -1", f"PARAMETER num_predict {sample.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def _ours(path: Path) -> bool:
    """A Modelfile that medlora wrote (today's, with its mark, or an older one: a single FROM ./X.gguf first)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:300]
    except OSError:
        return False
    first = head.split("\n", 1)[0]
    return first.startswith(MODELFILE_MARK) or (first.startswith("FROM ./") and first.endswith(".gguf"))


def write_modelfile(gguf_path: Path, tokenizer, system_prompt: str, tag: str = "") -> Path | None:
    """Ollama's Modelfile beside the GGUF (Modelfile-checkpoint-N for a checkpoint's: the run's own stays). A
    Modelfile there that medlora did not write is left alone: this one is then NAME.Modelfile. None (with one
    line) where the system prompt cannot be written into a Modelfile; the GGUF stands without it."""
    try:
        text = modelfile_text(gguf_path.name, tokenizer.chat_template or "", system_prompt, tokenizer.get_vocab())
    except MedloraError as e:
        log(f"warning: no {MODELFILE} written: {e}; {gguf_path} is complete (llama.cpp, or write a {MODELFILE} "
            "by hand)")
        return None
    path = gguf_path.with_name(MODELFILE + tag)
    if path.exists() and not _ours(path):
        path = gguf_path.with_suffix("." + MODELFILE)
        log(f"{gguf_path.parent / (MODELFILE + tag)} is not medlora's: leaving it as it is, writing {path}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
